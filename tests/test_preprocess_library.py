"""Preprocessing stages as plain functions (no Ray): real face models on real photos, linking, FastComposer
conversion, and the CLI's one-line errors before any work."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from facediffuser import faults
from facediffuser.data import preprocess_config, stages, work_items
from facediffuser.data.captions import template_caption
from facediffuser.data.faces import Face, make_detector, suppress_overlaps
from facediffuser.data.fastcomposer import convert_stage, list_fastcomposer_items
from facediffuser.data.linking import LinkError, link_subjects
from facediffuser.data.schema import decode_mask
from facediffuser.prompts import insert_markers

# The astronaut's face in skimage's 512×512 photo (checked by eye; both detectors agree within a few pixels).
ASTRONAUT_FACE = (174, 68, 278, 172)


def tile(photo: np.ndarray, count: int) -> np.ndarray:
    """`count` people side by side (every other copy mirrored, so the row is not a plain repeat)."""
    return np.ascontiguousarray(np.concatenate([photo if i % 2 == 0 else photo[:, ::-1] for i in range(count)], axis=1))


def expected_faces(count: int) -> list[tuple[int, int, int, int]]:
    x1, y1, x2, y2 = ASTRONAUT_FACE
    return [
        (x1 + 512 * i, y1, x2 + 512 * i, y2) if i % 2 == 0 else (512 * i + 512 - x2, y1, 512 * i + 512 - x1, y2)
        for i in range(count)
    ]


def center_inside(box, target, slack=10) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return target[0] - slack <= cx <= target[2] + slack and target[1] - slack <= cy <= target[3] + slack


@pytest.mark.parametrize("count", [1, 2, 3])
def test_mediapipe_faces_masks_captions_links_on_real_photos(astronaut, mediapipe_models, count):
    detector, segmenter = mediapipe_models
    image = tile(astronaut, count)
    faces = detector(image)
    assert len(faces) == count
    for face, target in zip(faces, expected_faces(count)):  # left to right, each on its person's face
        assert center_inside(face.box, target), (face.box, target)
        assert 0.5 <= face.score <= 1.0
    masks = segmenter(image, faces)
    assert len(masks) == count
    union = np.zeros(image.shape[:2], dtype=int)
    for index, (face, mask) in enumerate(zip(faces, masks)):
        x1, y1, x2, y2 = (round(v) for v in face.box)
        assert mask[y1:y2, x1:x2].mean() > 0.8  # the person's mask covers their face box
        tile_share = mask[:, 512 * index : 512 * (index + 1)].sum() / mask.sum()
        assert tile_share > 0.9  # and lies on that person, not on the neighbour
        union += mask
    assert union.max() == 1  # masks never overlap
    caption = template_caption(count)
    phrases = link_subjects(caption, count)
    assert [p.noun for p in phrases] == ["person"] * count
    for phrase in phrases:
        assert caption[phrase.end - len("person") : phrase.end] == "person"
    assert insert_markers(caption, [p.end for p in phrases]).count("person <|image|>") == count


def test_mtcnn_finds_the_same_faces(astronaut):
    detector = make_detector("mtcnn")
    faces = detector(tile(astronaut, 2))
    assert len(faces) == 2
    for face, target in zip(faces, expected_faces(2)):
        assert center_inside(face.box, target)
        assert face.score > 0.9
    assert detector(np.full((200, 200, 3), 128, np.uint8)) == []


def test_overlapping_boxes_are_one_face():
    faces = suppress_overlaps([Face([0, 0, 10, 10], 0.6), Face([1, 1, 11, 11], 0.9), Face([50, 0, 60, 10], 0.7)])
    assert [(f.box[0], f.score) for f in faces] == [(1, 0.9), (50, 0.7)]


def test_linking_order_offsets_and_reasons():
    caption = "A young man and a woman, with a girl."
    with pytest.raises(LinkError, match=r"3 person nouns \(man, woman, girl\) for 2 detected faces"):
        link_subjects(caption, 2)
    phrases = link_subjects("a man and a woman on a beach", 2)
    assert [(p.noun, p.end) for p in phrases] == [("man", 5), ("woman", 17)]
    phrases = link_subjects("Woman's portrait", 1)
    assert [(p.noun, p.end) for p in phrases] == [("Woman", 5)]
    with pytest.raises(LinkError, match="group nouns couple, people"):
        link_subjects("a couple of people at a wedding", 2)
    with pytest.raises(LinkError, match="0 person nouns for 1 detected face"):
        link_subjects("a mannequin by a man-made lake", 1)  # whole words only
    assert template_caption(5).count("person") == 5


def _fastcomposer_tree(root, photo: np.ndarray) -> None:
    """Two people in one photo (FastComposer layout), one sample without its npy, one with a bad end."""
    chunk = root / "00000"
    chunk.mkdir(parents=True)
    image = tile(photo, 2)[:, :1000]  # 1000×512
    Image.fromarray(image).save(chunk / "00001.jpg", quality=95)
    ids = np.zeros(image.shape[:2], np.int32)
    ids[40:512, 20:480] = 7  # right person listed first in the json: the converter orders by `end`
    ids[40:512, 520:990] = 3
    caption = "a man and a woman standing in a hall"
    segments = [
        {"id": 3, "bbox": [520, 40, 990, 512], "coco_label": "person", "end": 17},
        {"id": 9, "bbox": [0, 0, 5, 5], "coco_label": "chair", "end": 36},
        {"id": 7, "bbox": [20, 40, 480, 512], "coco_label": "person", "end": 5},
    ]
    (chunk / "00001.json").write_text(json.dumps({"caption": caption, "segments": segments}))
    np.save(chunk / "00001.npy", ids)
    Image.fromarray(image).save(chunk / "00002.jpg")
    (chunk / "00002.json").write_text(json.dumps({"caption": caption, "segments": segments}))
    Image.fromarray(image).save(chunk / "00003.jpg")
    (chunk / "00003.json").write_text(json.dumps({"caption": caption, "segments": [{**segments[0], "end": 99}]}))
    np.save(chunk / "00003.npy", ids)


def _malformed_samples(root, photo: np.ndarray) -> dict[str, str]:
    """FastComposer samples with a malformed json or npy beside `_fastcomposer_tree`'s: id → a fragment of the
    reason each must be rejected with (stage `convert`). Several of them made the converter raise."""
    chunk = root / "00000"
    image = tile(photo, 2)[:, :1000]  # 1000×512, the id map of sample 00001
    jpg, npy = (chunk / "00001.jpg").read_bytes(), (chunk / "00001.npy").read_bytes()
    caption = "a man and a woman standing in a hall"
    left = {"id": 7, "bbox": [20, 40, 480, 512], "coco_label": "person", "end": 5}
    right = {"id": 3, "bbox": [520, 40, 990, 512], "coco_label": "person", "end": 17}
    cases = {
        "00010": ([{k: v for k, v in right.items() if k != "end"}, left], "person segment 0 has no end"),
        "00011": ([{**right, "end": "17"}, left], "segment 3: end '17' does not follow a word"),
        "00012": ([{**right, "id": [3]}, left], "person segment 0: id [3] is not an integer"),
        "00013": (
            [{**right, "bbox": [520, 40, 1990, 512]}, left],
            "segment 3: bbox [520, 40, 1990, 512] is empty or outside the 1000x512 image",
        ),
        "00014": ([{**right, "bbox": [520, 40, 990]}, left], "segment 3: bbox [520, 40, 990] is not [x1, y1, x2, y2]"),
        "00015": ("{not json", "json is not valid JSON"),
        "00016": (["person", left], "segment 0 is a str, expected an object"),
        "00017": ([right, left], "npy is not a readable array (EOFError"),  # an empty npy file
        "00018": ({"caption": caption, "segments": {"0": right}}, "json has no segments list"),
    }
    assert image.shape[:2] == (512, 1000)
    reasons = {}
    for sample, (meta, reason) in cases.items():
        if isinstance(meta, list):
            meta = json.dumps({"caption": caption, "segments": meta})
        (chunk / f"{sample}.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        (chunk / f"{sample}.jpg").write_bytes(jpg)
        (chunk / f"{sample}.npy").write_bytes(b"" if sample == "00017" else npy)
        reasons[sample] = reason
    return reasons


def test_fastcomposer_conversion(tmp_path, astronaut):
    _fastcomposer_tree(tmp_path, astronaut)
    config = preprocess_config.PreprocessConfig(
        input=str(tmp_path), output=str(tmp_path / "out"), source="fastcomposer", resolution=256
    )
    items = [convert_stage(item, config) for item in list_fastcomposer_items(str(tmp_path))]
    assert [i["id"] for i in items] == ["00001", "00002", "00003"]
    assert items[1]["stage"] == "read" and "00002.npy" in items[1]["reason"]
    assert items[2]["stage"] == "convert" and "end 99" in items[2]["reason"]
    record = work_items.to_record(items[0])
    assert (record.width, record.height) == (500, 256)  # short side → 256, aspect kept
    assert [(s.noun, s.noun_end) for s in record.subjects] == [("man", 5), ("woman", 17)]
    left, right = (decode_mask(s.mask_png) for s in record.subjects)
    assert left.shape == (256, 500) and left[128, 100] and not left[128, 400] and right[128, 400]
    assert record.subjects[1].person_box == pytest.approx([260, 20, 495, 256])
    assert record.subjects[0].score == 0.0 and record.subjects[0].face_mask_png is None
    assert work_items.shard_table(items).num_rows == 1 and work_items.reject_table(items).num_rows == 2


def test_malformed_fastcomposer_samples_are_rejected_with_reasons(tmp_path, astronaut):
    """A malformed segment or file is one reject (stage convert, the reason), never an exception; the good
    sample beside them is still converted."""
    _fastcomposer_tree(tmp_path, astronaut)
    reasons = _malformed_samples(tmp_path, astronaut)
    config = preprocess_config.PreprocessConfig(input=str(tmp_path), output="-", source="fastcomposer", resolution=256)
    items = {i["id"]: convert_stage(i, config) for i in list_fastcomposer_items(str(tmp_path))}
    for sample, fragment in reasons.items():
        assert items[sample]["stage"] == "convert" and fragment in items[sample]["reason"], items[sample]["reason"]
        assert "\n" not in items[sample]["reason"]
    assert items["00001"]["stage"] is None
    counts = work_items.stage_counts("fastcomposer", len(items), [i["stage"] for i in items.values() if i["stage"]])
    assert counts["input"] == len(items) == counts["written"] + counts["rejected"] and counts["written"] == 1
    assert counts["convert"]["rejected"] == len(reasons) + 1  # + 00003's bad end


def test_a_stage_raising_on_one_image_rejects_that_image(tmp_path, astronaut, mediapipe_models, monkeypatch):
    """The real models in the plain loop (the function every Ray stage calls): a degenerate image that made the
    detector raise, a segmenter and a captioner that raise on one image, and the test-only fault hook. Each is a
    reject of its stage with the reason; the other images go through. Raising on image after image, or running
    out of memory, is systemic and stops the loop."""
    detector, segmenter = mediapipe_models
    Image.fromarray(astronaut).save(tmp_path / "one.jpg")
    Image.fromarray(tile(astronaut, 2)).save(tmp_path / "two.jpg")
    Image.new("RGB", (300, 1), (200, 150, 120)).save(tmp_path / "line.png")  # one pixel high
    Image.fromarray(astronaut[:, ::-1]).save(tmp_path / "mirror.jpg")
    Image.fromarray(astronaut[::2, ::2]).save(tmp_path / "small.jpg")
    # min_side 0: the degenerate image reaches the detector (by default it is a low-resolution reject first)
    config = preprocess_config.PreprocessConfig(input=str(tmp_path), output="-", min_side=0)
    items = stages.list_image_items(str(tmp_path))

    def segment(image, faces):  # the real segmenter, failing on the picture of two people
        if len(faces) == 2:
            raise ValueError("segmentation backend failed\non two lines")
        return segmenter(image, faces)

    def caption(image):  # a captioner model that chokes on small images
        if image.shape[0] < 300:
            raise RuntimeError("captioner: input too small")
        return "a photo of a man"

    monkeypatch.setenv(faults.ENV, "preprocess.detect=mirror.jpg")
    done = {i["id"]: i for i in stages.process_locally(items, config, detector, segment, caption, progress=False)}
    expected = {
        "line.png": ("detect", "no face found"),
        "mirror.jpg": ("detect", "raised InjectedFault: injected test fault at preprocess.detect=mirror.jpg"),
        "two.jpg": ("segment", "raised ValueError: segmentation backend failed"),
        "small.jpg": ("caption", "raised RuntimeError: captioner: input too small"),
    }
    for name, (stage, reason) in expected.items():
        assert done[name]["stage"] == stage and done[name]["reason"].startswith(reason), done[name]
        assert "\n" not in done[name]["reason"]
    assert done["one.jpg"]["stage"] is None and done["one.jpg"]["caption"] == "a photo of a man"
    assert (
        work_items.shard_table(list(done.values())).num_rows == 1
        and work_items.reject_table(list(done.values())).num_rows == 4
    )

    def broken(image):
        raise OSError("CUDA error: device lost")

    guard = stages.StageGuard(limit=3)
    item = stages.apply_stages(
        work_items.new_item("one.jpg", str(tmp_path / "one.jpg")), config, detector=broken, guard=guard
    )
    assert item["stage"] == "detect" and item["reason"] == "raised OSError: CUDA error: device lost"
    with pytest.raises(stages.StageError, match="stage detect raised on 3 items in a row"):
        for _ in range(2):
            stages.apply_stages(
                work_items.new_item("one.jpg", str(tmp_path / "one.jpg")), config, detector=broken, guard=guard
            )

    def out_of_memory(image):
        raise MemoryError("no memory left")

    with pytest.raises(MemoryError):  # at once, not as a reject
        stages.apply_stages(work_items.new_item("one.jpg", str(tmp_path / "one.jpg")), config, detector=out_of_memory)


def test_rows_that_do_not_fit_the_schema_are_rejects_of_their_stage(astronaut):
    good = {
        **work_items.new_item("good", "good.jpg"),
        "image": b"x",
        "width": 1,
        "height": 1,
        "caption": "a man",
        "subjects": [
            {
                "face_box": [0, 0, 1, 1],
                "score": 1.0,
                "person_box": [0, 0, 1, 1],
                "mask_png": b"m",
                "face_mask_png": None,
                "noun": "man",
                "noun_end": 5,
            }
        ],
    }
    odd = {**good, "id": "odd", "caption": ["not", "text"]}  # a model returned a list
    three = {**good, "id": "three", "subjects": [{**good["subjects"][0], "person_box": [0, 0, 1]}]}
    table = work_items.checked_work_table([good, odd, three], "caption")
    rows = {r["id"]: r for r in table.to_pylist()}
    assert rows["good"]["stage"] is None and rows["three"]["stage"] is None
    assert rows["odd"]["stage"] == "caption" and rows["odd"]["reason"].startswith("the row does not fit the schema")
    shards, items = work_items.shard_rows(list(rows.values()))
    assert shards.column("id").to_pylist() == ["good"]  # the 3-number box cannot be a shard row
    assert {i["id"]: i["stage"] for i in items} == {"good": None, "odd": "caption", "three": "write"}
    counts = work_items.stage_counts("images", 3, ["caption", "write"])
    assert counts["write"] == {"rejected": 1, "passed": 1} and counts["written"] == 1
    assert work_items.stage_counts("images", 2, ["mystery"])["written"] == 1  # unknown stage names still add up


def test_a_run_removes_the_manifest_first_and_writes_it_last(tmp_path):
    """Until a run ends its output has no manifest (train refuses it); the manifest it writes lists the shard
    files, and a shard file holding rows of inputs that are gone is redone, not kept."""
    import pyarrow.parquet as pq

    from facediffuser.data import output_dir
    from facediffuser.data.resume import OUTPUT_SETTINGS, previous_work
    from facediffuser.data.schema import to_table
    from facediffuser.training.sample_rows import sample_records

    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    records = sample_records(4)
    for index, record in enumerate(records):
        record.id = f"{index}.jpg"
    pq.write_table(to_table(records[:2]), out / "shards" / "a.parquet")
    pq.write_table(to_table(records[2:]), out / "shards" / "b.parquet")
    with pytest.raises(RuntimeError, match="hold 4 rows, the run wrote 3"):
        output_dir.write_manifest(str(out), {"counts": {"input": 3, "written": 3, "rejected": 0}})
    manifest = output_dir.write_manifest(str(out), {"counts": {"input": 4, "written": 4, "rejected": 0}})
    assert [(e["file"], e["rows"]) for e in manifest["shards"]] == [("a.parquet", 2), ("b.parquet", 2)]
    assert output_dir.check_complete(str(out), "x")["counts"]["written"] == 4

    config = preprocess_config.PreprocessConfig(input=str(tmp_path / "in"), output=str(out))
    (out / "run.json").write_text(json.dumps({"schema_version": 1, **{k: getattr(config, k) for k in OUTPUT_SETTINGS}}))
    done, _ = previous_work(config, {"0.jpg", "1.jpg", "2.jpg"})  # 3.jpg was removed from the input
    assert not (out / "manifest.json").exists()
    with pytest.raises(output_dir.IncompleteOutput, match="in progress or was cut short"):
        output_dir.check_complete(str(out), "x")
    assert done == {"0.jpg", "1.jpg"} and not (out / "shards" / "b.parquet").exists()  # 2.jpg is done again


def test_unusual_images_decode_and_bad_ones_are_rejected_with_reasons(astronaut):
    config = preprocess_config.PreprocessConfig(input="-", output="-", resolution=256, max_pixels=600 * 600)

    def read(data: bytes, name="x.png"):
        import os
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, name)
            with open(path, "wb") as handle:
                handle.write(data)
            return stages.read_stage(work_items.new_item(name, path), config)

    def encoded(image: Image.Image, fmt="PNG", **kw) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kw)
        return buffer.getvalue()

    photo = Image.fromarray(astronaut)
    cmyk = read(encoded(photo.convert("CMYK"), "JPEG"), "c.jpg")
    grey16 = read(encoded(Image.fromarray((np.asarray(photo.convert("L"), np.uint16) * 257)), "PNG"))
    assert cmyk["stage"] is None and grey16["stage"] is None
    assert (cmyk["width"], grey16["height"]) == (256, 256)
    assert read(b"")["reason"].endswith("empty file")
    assert "truncated" in read(encoded(photo, "JPEG")[:3000], "t.jpg")["reason"]
    assert "not a decodable image" in read(b"<html>not an image</html>", "h.jpg")["reason"]
    assert "exceeds the limit" in read(encoded(Image.new("RGB", (700, 700))))["reason"]
    missing = stages.read_stage(work_items.new_item("gone.jpg", "/nonexistent/gone.jpg"), config)
    assert missing["stage"] == "read" and "cannot read" in missing["reason"]


def test_cli_rejects_wrong_input_or_output_in_one_line_before_work(tmp_path, capsys):
    from facediffuser.cli import main

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "no such directory"),
        (["--input", str(a_file), "--output", str(tmp_path / "o")], "is a file"),
        (["--input", str(images), "--output", str(a_file)], "is an existing file"),
        (["--input", str(tmp_path / "o"), "--output", str(tmp_path / "o2")], "no such directory"),
        (
            ["--input", str(images), "--output", str(tmp_path / "o"), "--captioner", str(tmp_path / "nomodel")],
            "--captioner",
        ),
        (["--input", str(images), "--output", str(tmp_path / "o"), "--max-subjects", "0"], "--max-subjects"),
        (["--input", "http://example.com/x", "--output", str(tmp_path / "o")], "only local paths and s3://"),
    ]
    for arguments, message in cases:
        assert main(["preprocess", *arguments]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("facediffuser preprocess: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()  # nothing was written

    # `python -m pipelines.preprocess` (what `ray job submit` runs) shares the parser and the errors
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.preprocess",
            "--input",
            str(tmp_path / "missing"),
            "--output",
            str(tmp_path / "o"),
        ],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("facediffuser preprocess: error: --input")


@pytest.mark.slow
def test_model_captioner_loads_from_a_directory(tmp_path, astronaut):
    """A tiny random BLIP saved to disk (no downloads): the path the real BLIP takes, end to end."""
    import torch
    from transformers import (
        BertTokenizerFast,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from facediffuser.data.captions import check_captioner, make_captioner

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "man", "woman", "beach"]
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}),
    )
    layers = dict(num_hidden_layers=1, num_attention_heads=2, intermediate_size=37, hidden_size=32)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            encoder_hidden_size=32,
            bos_token_id=2,
            sep_token_id=3,
            pad_token_id=0,
            eos_token_id=3,
            **layers,
        ),
        vision_config=dict(image_size=32, patch_size=8, projection_dim=32, **layers),
        projection_dim=32,
    )
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(tmp_path / "blip")
    processor.save_pretrained(tmp_path / "blip")

    check_captioner(str(tmp_path / "blip"))
    captioner = make_captioner(str(tmp_path / "blip"))
    with torch.no_grad():  # make the loaded random decoder say "man" every time, so the caption is known
        captioner.model.text_decoder.cls.predictions.decoder.bias[vocab.index("man")] = 1e4
    item = {
        **work_items.new_item("a.jpg", "a.jpg"),
        "image": stages.encode_jpeg(Image.fromarray(astronaut)),
        "subjects": [{"face_box": [0, 0, 1, 1], "score": 1.0}],
    }
    captioned = stages.caption_stage(item, captioner)
    words = captioned["caption"].split()
    assert words and set(words) == {"man"}
    linked = stages.link_stage(captioned)  # "man man man …" names more people than the one face
    assert linked["stage"] == "link" and f"{len(words)} person nouns" in linked["reason"]
    kept = stages.caption_stage({**item, "caption": "a woman"}, captioner)
    assert kept["caption"] == "a woman"  # existing captions are kept
