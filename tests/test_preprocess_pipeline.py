"""The Ray Data preprocessing pipeline, end to end on a real local Ray: two runs that check many things each.

1. Local images: real photos of 1, 2 and 3 people, unusual but valid images, every bad-input class (a degenerate
   image and a stage raising on one image included: rejects, the job goes on), existing captions; shards read back
   through the schema; accounting; manifest; the rejects' reasons; an interrupted run that train refuses until the
   rerun completes it.
2. A FastComposer tree on S3 (moto's real S3 HTTP server), malformed samples included, to S3 via the CLI, run
   twice: no duplicates.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_preprocess_library import _fastcomposer_tree, _malformed_samples, center_inside, expected_faces, tile

from facediffuser import faults
from facediffuser.data import io as dataio
from facediffuser.data.schema import REJECT_SCHEMA, Record, check_schema, decode_mask, to_table

pytestmark = pytest.mark.slow


def _read_table(uri: str):
    fs, path = dataio.resolve(uri)
    return pq.read_table(path, filesystem=fs)


def _shard_records(output: str) -> tuple[list[Record], list]:
    """Every shard file read back through the schema: each file passes check_schema and round-trips exactly."""
    records, schemas = [], []
    for _, uri in dataio.list_files(dataio.join(output, "shards"), (".parquet",)):
        table = _read_table(uri)
        check_schema(table.schema, uri)
        batch = [Record.from_row(row) for row in table.to_pylist()]
        assert to_table(batch).to_pylist() == table.to_pylist()  # Record ↔ row round trip is exact
        assert to_table(batch).schema.equals(table.schema.remove_metadata(), check_metadata=False)
        records += batch
        schemas.append(table.schema)
    return records, schemas


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, astronaut):
    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    photo = Image.fromarray(astronaut)
    photo.save(root / "one.jpg", quality=95)
    Image.fromarray(tile(astronaut, 2)).save(root / "two.jpg", quality=95)
    Image.fromarray(tile(astronaut, 3)).save(root / "sub" / "three.png")
    # unusual but valid
    photo.convert("L").save(root / "grey.jpg")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    (root / "cmyk.txt").write_text("a woman in an orange suit\n")  # an existing caption, kept and linked
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full(astronaut.shape[:2], 200, np.uint8)))
    rgba.save(root / "alpha.png")
    Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257).save(root / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": the stored pixels lie on their side
    photo.rotate(90, expand=True).save(root / "rotated.jpg", exif=exif, quality=95)
    # bad
    (root / "zero.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes((root / "one.jpg").read_bytes()[:4000])
    (root / "notes.png").write_text("this is not an image")
    Image.new("RGB", (1500, 1400), (90, 120, 150)).save(root / "huge.png")
    from skimage.data import coffee

    Image.fromarray(coffee()).save(root / "coffee.jpg")
    Image.fromarray(tile(astronaut, 5)).save(root / "five.jpg", quality=90)
    photo.save(root / "group.jpg")
    (root / "group.txt").write_text("two people at a launch")  # kept, but cannot be linked to one face
    Image.new("RGB", (300, 1), (200, 150, 120)).save(root / "line.png")  # one pixel high: the detector raised
    photo.save(root / "faulty.jpg")  # the segment stage raises on this one (the test-only fault hook)
    (root / "readme.md").write_text("ignored: not an image extension")
    return root


EXPECTED_REJECTS = {
    "zero.jpg": ("decode", "empty file"),
    "truncated.jpg": ("decode", "truncated"),
    "notes.png": ("decode", "not a decodable image"),
    "huge.png": ("decode", "exceeds the limit of 2000000 pixels"),
    "coffee.jpg": ("detect", "no face found"),
    "five.jpg": ("detect", "5 faces, more than --max-subjects 3"),
    "group.jpg": ("link", "group nouns people"),
    "line.png": ("decode", "short side 1 px, under --min-side 256 px (300×1)"),
    "faulty.jpg": ("segment", "raised InjectedFault: injected test fault at preprocess.segment=faulty.jpg"),
}


def test_pipeline_on_local_photos(ray_session, photo_dir, tmp_path, monkeypatch):
    from facediffuser.data.preprocess_config import PreprocessConfig
    from pipelines.preprocess import preprocess
    from pipelines.train_inputs import resolve_data

    monkeypatch.setenv(faults.ENV, "preprocess.segment=faulty.jpg")  # reaches the Ray workers through the runtime env
    output = tmp_path / "out"
    config = PreprocessConfig(
        input=str(photo_dir),
        output=str(output),
        max_pixels=2_000_000,
        batch_size=4,
        workers_per_stage=1,
        rows_per_shard=5,
        duplicate_distance=-1,  # most photos here are one picture in other encodings, each to be processed
    )
    manifest = preprocess(config)

    records, schemas = _shard_records(str(output))
    rejects = _read_table(str(output / "rejects" / "rejects.parquet"))
    assert rejects.schema.equals(REJECT_SCHEMA)
    inputs = {rel for rel, _ in dataio.list_files(str(photo_dir), dataio.IMAGE_EXTENSIONS)}
    # accounting: every input is written or rejected, exactly once
    assert sorted([r.id for r in records] + rejects.column("id").to_pylist()) == sorted(inputs)
    reasons = {row["id"]: (row["stage"], row["reason"]) for row in rejects.to_pylist()}
    assert reasons.keys() == EXPECTED_REJECTS.keys()
    for name, (stage, fragment) in EXPECTED_REJECTS.items():
        assert reasons[name][0] == stage and fragment in reasons[name][1], reasons[name]
    assert len(schemas) >= 2  # 8 rows, at most 5 per shard file (checked below)

    by_id = {r.id: r for r in records}
    assert set(by_id) == {
        "one.jpg",
        "two.jpg",
        "sub/three.png",
        "grey.jpg",
        "cmyk.jpg",
        "alpha.png",
        "deep16.png",
        "rotated.jpg",
    }
    for name, count in (("one.jpg", 1), ("two.jpg", 2), ("sub/three.png", 3)):
        record = by_id[name]
        assert record.source == str(photo_dir / name)
        assert (record.width, record.height) == (512 * count, 512)
        stored = np.asarray(Image.open(io.BytesIO(record.image)))
        assert stored.shape == (512, 512 * count, 3)
        assert len(record.subjects) == count
        for subject, target in zip(record.subjects, expected_faces(count)):
            assert center_inside(subject.face_box, target)  # detection on the face
            mask = decode_mask(subject.mask_png)
            x1, y1, x2, y2 = (round(v) for v in subject.face_box)
            assert mask.shape == (512, 512 * count) and mask[y1:y2, x1:x2].mean() > 0.8  # mask covers the face
            px1, py1, px2, py2 = subject.person_box
            assert px1 <= x1 and py1 <= y1 and px2 >= x2 and py2 >= y2  # person box holds the face box
            assert decode_mask(subject.face_mask_png)[(y1 + y2) // 2, (x1 + x2) // 2]
            assert subject.noun == "person" and record.caption[subject.noun_end - 6 : subject.noun_end] == "person"
        assert [s.noun_end for s in record.subjects] == sorted(s.noun_end for s in record.subjects)
    assert by_id["one.jpg"].caption == "a photo of a person"
    assert by_id["cmyk.jpg"].caption == "a woman in an orange suit"
    assert [(s.noun, s.noun_end) for s in by_id["cmyk.jpg"].subjects] == [("woman", 7)]
    for name in ("grey.jpg", "alpha.png", "deep16.png", "rotated.jpg"):  # converted, processed, face found
        (subject,) = by_id[name].subjects
        assert center_inside(subject.face_box, expected_faces(1)[0]), name  # rotated: EXIF applied upright

    counts = manifest["counts"]
    assert counts["input"] == len(inputs) == counts["written"] + counts["rejected"]
    assert (
        counts["written"],
        counts["decode"]["rejected"],
        counts["detect"]["rejected"],
        counts["segment"]["rejected"],
        counts["link"]["rejected"],
    ) == (8, 5, 2, 1, 1)
    # operators see the progress at Ray's metrics endpoint (pipelines/progress_metrics.py)
    from conftest import scrape_metrics

    def counted(found):  # written photos, and the one the segment stage rejected
        lines = found["ray_facediffuser_preprocess_items_total"]
        return any('outcome="written"' in line for line in lines) and any(
            'outcome="rejected"' in line and 'stage="segment"' in line for line in lines
        )

    assert counted(scrape_metrics(["ray_facediffuser_preprocess_items_total"], until=counted))
    on_disk = json.loads((output / "manifest.json").read_text())
    assert on_disk["counts"] == counts and on_disk["config"]["max_pixels"] == 2_000_000
    assert sorted(e["file"] for e in on_disk["shards"]) == sorted(p.name for p in (output / "shards").iterdir())
    assert sum(e["rows"] for e in on_disk["shards"]) == 8
    assert on_disk["package_versions"]["mediapipe"] == "0.10.21" and on_disk["wall_time_s"] > 0

    # the training side reads the same shards through Ray Data
    import ray

    assert ray.data.read_parquet(str(output / "shards")).count() == 8

    # An interrupted run: one shard file never written, another cut short. The rerun redoes only their rows.
    files = sorted((output / "shards").glob("*.parquet"))
    lost = pq.read_table(files[0], columns=["id"]).num_rows
    files[0].unlink()
    cut = output / "shards" / "cut-short.parquet"
    cut.write_bytes(files[1].read_bytes()[:200])
    with pytest.raises(ValueError, match=f"the shards differ from {output / 'manifest.json'}"):
        resolve_data([str(output)])  # train does not read it
    again = preprocess(config)
    assert again["resumed"] == len(inputs) - lost and not cut.exists()
    records_again, _ = _shard_records(str(output))
    assert sorted(r.id for r in records_again) == sorted(by_id)  # each row once: none lost, none twice
    assert again["counts"] == counts  # in = written + rejected, as in one uninterrupted run
    assert _read_table(str(output / "rejects" / "rejects.parquet")).to_pylist() == rejects.to_pylist()
    assert resolve_data([str(output / "shards")]) == [str(output / "shards")]  # complete again: train reads it


def test_fastcomposer_tree_on_s3_via_cli_twice(ray_session, s3_endpoint, tmp_path, astronaut):
    import boto3

    from facediffuser.cli import main

    _fastcomposer_tree(tmp_path / "tree", astronaut)
    malformed = _malformed_samples(tmp_path / "tree", astronaut)  # several of them made the Ray job fail
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="faces")
    for path in sorted((tmp_path / "tree").rglob("*.*")):
        s3.upload_file(str(path), "faces", f"ffhq/{path.relative_to(tmp_path / 'tree').as_posix()}")
    for suffix in ("json", "npy"):  # a sample whose jpg cannot be read back (archived to Glacier)
        s3.copy_object(
            Bucket="faces",
            Key=f"ffhq/00000/00004.{suffix}",
            CopySource={"Bucket": "faces", "Key": f"ffhq/00000/00001.{suffix}"},
        )
    s3.put_object(Bucket="faces", Key="ffhq/00000/00004.jpg", Body=b"x", StorageClass="GLACIER")

    arguments = [
        "preprocess",
        "--source",
        "fastcomposer",
        "--input",
        "s3://faces/ffhq",
        "--output",
        "s3://faces/out",
        "--resolution",
        "256",
        "--batch-size",
        "2",
    ]
    for attempt in range(2):  # a rerun over the same input and output must not duplicate rows
        assert main(arguments) == 0
        records, _ = _shard_records("s3://faces/out")
        assert [r.id for r in records] == ["00001"]
        (record,) = records
        assert record.source == "s3://faces/ffhq/00000/00001.jpg" and (record.width, record.height) == (500, 256)
        assert [(s.noun, s.noun_end) for s in record.subjects] == [("man", 5), ("woman", 17)]
        rejects = {r["id"]: r for r in _read_table("s3://faces/out/rejects/rejects.parquet").to_pylist()}
        assert sorted(rejects) == ["00002", "00003", "00004", *malformed]
        assert rejects["00004"]["stage"] == "read" and "cannot read" in rejects["00004"]["reason"]
        assert rejects["00003"]["stage"] == "convert"
        for sample, fragment in malformed.items():
            assert rejects[sample]["stage"] == "convert" and fragment in rejects[sample]["reason"]
        manifest = json.loads(s3.get_object(Bucket="faces", Key="out/manifest.json")["Body"].read())
        counts = manifest["counts"]
        assert counts["input"] == 4 + len(malformed) == counts["written"] + counts["rejected"]
        assert counts["written"] == 1 and counts["convert"]["rejected"] == 1 + len(malformed)
        assert counts["read"]["rejected"] == 2 and manifest["config"]["source"] == "fastcomposer"
        assert [e["rows"] for e in manifest["shards"]] == [1]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="faces", Prefix="out/")["Contents"]]
    assert sum(key.endswith(".parquet") for key in keys) == 2  # one shard file + the rejects file


@pytest.mark.parametrize(
    "cluster_cpus, gpus, config",
    [
        (1, 0, {}),
        (2, 0, {}),
        (16, 0, {}),
        (2, 0, {"workers_per_stage": 3}),
        (8, 2, {"detector": "mtcnn", "num_gpus_per_stage": 1}),
    ],
)
def test_the_stage_pools_fit_the_cluster(cluster_cpus, gpus, config):
    """The pools hold their CPUs for the whole run and the last one writes the shards itself: together they fit
    the cluster (more would leave a worker unscheduled) and, by default, a CPU-only run has one task per CPU
    with a whole CPU each (nothing kept back for write tasks that no longer exist)."""
    from facediffuser.data.preprocess_config import PreprocessConfig
    from pipelines.preprocess_plan import block_rows, plan_stages

    plans = plan_stages(PreprocessConfig(input="in", output="out", **config), cluster_cpus, gpus)
    assert sum(plan.workers * plan.num_cpus for plan in plans) <= cluster_cpus + 1e-9
    assert sum(plan.workers * plan.num_gpus for plan in plans) <= gpus + 1e-9
    cpu_pools = [plan for plan in plans if plan.num_gpus == 0]
    assert cpu_pools and all(plan.num_cpus > 0 for plan in cpu_pools)
    if not config:
        assert [(plan.workers, plan.num_cpus) for plan in plans] == [(cluster_cpus, 1.0)]
    # one block = one shard file: never over --rows-per-shard, and enough blocks to share among the workers
    widest = max(plan.workers for plan in plans)
    assert block_rows(10_000_000, plans, 1000) == 1000
    assert block_rows(40 * widest, plans, 1000) == 10 and block_rows(3, plans, 1000) == 1


def test_split_pools_hand_rows_on_and_the_last_one_writes(photo_dir, tmp_path):
    """The layout with several pools (what `--num-gpus-per-stage` gives), its actor classes called in order
    without Ray: a first pool's work rows feed the last pool, which writes one shard file per call and returns
    every row's status; a rerun of the same block rewrites its file instead of adding one."""
    from facediffuser.data.preprocess_config import PreprocessConfig
    from facediffuser.data.stages import list_image_items
    from facediffuser.data.work_items import work_table
    from pipelines.preprocess_workers import RunStages, ShardWriter

    config = PreprocessConfig(input=str(photo_dir), output=str(tmp_path), max_pixels=2_000_000)
    items = [i for i in list_image_items(str(photo_dir)) if i["id"] in ("one.jpg", "two.jpg", "zero.jpg")]
    first = RunStages(config, ("read", "detect"), 0.25, 0)
    last = RunStages(config, ("segment", "caption", "link"), 1.0, 0, ShardWriter(str(tmp_path / "shards"), "run"))
    handed_on = first(work_table(items))
    assert handed_on.num_rows == 3 and not (tmp_path / "shards").exists()  # only the last pool writes
    statuses = {row["id"]: row["stage"] for row in last(handed_on).to_pylist()}
    assert statuses == {"one.jpg": None, "two.jpg": None, "zero.jpg": "decode"}
    odd = {**handed_on.to_pylist()[0], "id": "odd.jpg", "width": "wide"}  # a row the shard schema cannot hold
    (status,) = ShardWriter(str(tmp_path / "odd"), "run")([odd]).to_pylist()
    assert status["stage"] == "write" and "does not fit the schema" in status["reason"]
    assert not (tmp_path / "odd").exists()
    (shard,) = (tmp_path / "shards").iterdir()
    records, _ = _shard_records(str(tmp_path))
    assert {r.id: len(r.subjects) for r in records} == {"one.jpg": 1, "two.jpg": 2}
    last(handed_on)  # a retried call
    assert list((tmp_path / "shards").iterdir()) == [shard]


def test_a_worker_process_keeps_its_stage_objects_for_the_run(photo_dir, tmp_path):
    """The CPU pools' tasks build their RunStages (and so load the models) once per worker process and run:
    the same object serves the run's later tasks, each pool has its own, and a new run frees the old ones."""
    import functools

    from facediffuser.data.preprocess_config import PreprocessConfig
    from facediffuser.data.stages import list_image_items
    from facediffuser.data.work_items import work_table
    from pipelines import preprocess_workers as pipeline

    config = PreprocessConfig(input=str(photo_dir), output=str(tmp_path))
    block = work_table([i for i in list_image_items(str(photo_dir)) if i["id"] == "one.jpg"])
    make = functools.partial(pipeline.RunStages, config, ("read",), 1.0, 0, None)
    assert pipeline.run_in_worker(block, "run-a", ("read",), make).column("stage").to_pylist() == [None]
    kept = pipeline._in_this_worker["pools"][("read",)]
    pipeline.run_in_worker(block, "run-a", ("read",), make)
    assert pipeline._in_this_worker["pools"][("read",)] is kept
    other = functools.partial(pipeline.RunStages, config, ("read", "detect"), 1.0, 0, None)
    pipeline.run_in_worker(block, "run-a", ("read", "detect"), other)
    assert set(pipeline._in_this_worker["pools"]) == {("read",), ("read", "detect")}
    pipeline.run_in_worker(block, "run-b", ("read",), make)
    assert list(pipeline._in_this_worker["pools"]) == [("read",)]
    assert pipeline._in_this_worker["pools"][("read",)] is not kept
