"""Ray Train end to end on tiny models: CLI errors before work, two DDP workers that stay in sync, a worker
that fails once and the run resuming from the checkpoint before the failure, a rerun by name resuming, S3
storage on moto, and `--model both` giving a loadable pair that generates an image."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from facediffuser.cli import main as cli_main
from facediffuser.data.output_dir import write_manifest
from facediffuser.data.schema import to_table
from facediffuser.training.sample_rows import sample_records

REPO = Path(__file__).resolve().parents[1]
TINY = ["--tiny", "--resolution", "64", "--batch-size", "2"]
SMALL = [*TINY, "--cpus-per-worker", "0.25", "--data-cpus", "0.1"]


def finished_output(root: Path, input_rows: int | None = None) -> Path:
    """Make `root` (holding shards/) look like a finished preprocess run: the manifest preprocess writes last."""
    rows = sum(pq.read_metadata(f).num_rows for f in (root / "shards").glob("*.parquet"))
    write_manifest(
        str(root),
        {
            "schema_version": 1,
            "counts": {"input": input_rows or rows, "written": rows, "rejected": (input_rows or rows) - rows},
        },
    )
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory, astronaut) -> Path:
    """The shards/ directory of a finished preprocess output (DATA/shards + DATA/manifest.json), made with the
    schema's own writer from the real astronaut photo and synthetic people."""
    folder = tmp_path_factory.mktemp("data") / "shards"
    folder.mkdir()
    # 16 rows in two files: an epoch holds several steps
    table = to_table(sample_records(16, astronaut))
    pq.write_table(table.slice(0, 3), folder / "part-0.parquet")
    pq.write_table(table.slice(3), folder / "part-1.parquet")
    finished_output(folder.parent)
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.train", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_bad_input_fails_in_one_line_before_work(tmp_path, shards):
    (tmp_path / "empty").mkdir()
    wrong = tmp_path / "wrong"
    (wrong / "shards").mkdir(parents=True)
    pq.write_table(pq.read_table(shards / "part-0.parquet").drop_columns(["caption"]), wrong / "shards" / "x.parquet")
    finished_output(wrong)
    unfinished = tmp_path / "unfinished"  # a preprocess run in progress or cut short: shards, no manifest yet
    shutil.copytree(shards, unfinished / "shards")
    (unfinished / "run.json").write_text("{}")
    storage = str(tmp_path / "runs")
    cases = {
        "not a preprocess output (no manifest.json)": ["--model", "sdm", "--data", str(tmp_path / "empty"), "--tiny"],
        "missing columns: caption": ["--model", "tdm", "--data", str(wrong), "--tiny"],
        f"no {unfinished / 'manifest.json'}: the preprocess run there is in progress or was cut short": [
            "--model",
            "tdm",
            "--data",
            str(unfinished / "shards"),
            "--tiny",
        ],
        "no such file": ["--model", "tdm", "--data", str(tmp_path / "absent"), "--tiny"],
        "--base: base model directory not found": [
            "--model",
            "sdm",
            "--data",
            str(shards),
            "--base",
            str(tmp_path / "nobase"),
        ],
        "fewer than one batch": [
            "--model",
            "both",
            "--data",
            str(shards),
            "--tiny",
            "--batch-size",
            "16",
            "--workers",
            "2",
        ],
    }
    for expected, args in cases.items():
        done = _cli(*args, "--storage", storage, "--name", "bad")
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("facediffuser train: error:"), (
            done.stderr
        )
        assert expected in lines[0]
    done = _cli(
        "--model", "sdm", "--data", str(shards), "--tiny", "--storage", storage, "--name", "bad", "--epochs", "3"
    )
    assert done.returncode == 2 and "unrecognized arguments: --epochs 3" in done.stderr
    assert not Path(storage).exists()  # nothing was started or written


def test_data_resolves_a_preprocess_output_a_shards_dir_or_a_list(tmp_path, shards, capsys):
    from pipelines.train_config import check_data
    from pipelines.train_inputs import resolve_data

    output = tmp_path / "data"  # what `facediffuser preprocess --output data/` leaves
    shutil.copytree(shards, output / "shards")
    finished_output(output, input_rows=18)
    resolved = resolve_data([str(output), str(shards)])
    assert resolved == [str(output / "shards"), str(shards)]
    assert (
        f"--data {output}: preprocess output; reading {output / 'shards'} (16 rows written, 2 rejected"
        in capsys.readouterr().out
    )
    assert check_data(resolved) == 32 and check_data(str(shards)) == 16
    with pytest.raises(ValueError, match="either local directories or s3:// prefixes"):
        resolve_data([str(shards), "s3://bucket/shards"])


def test_data_refuses_shards_without_a_complete_manifest(tmp_path, shards):
    """Only the output of a finished preprocess run is read: its manifest exists, adds up and lists exactly the
    shard files that are there. Each refusal is one line naming the manifest."""
    from pipelines.train_inputs import resolve_data

    def refused(path: Path, *fragments: str) -> None:
        for value in (path, path / "shards"):  # the output directory or its shards/ directory: the same answer
            with pytest.raises(ValueError) as error:
                resolve_data([str(value)])
            message = str(error.value)
            assert "\n" not in message and message.startswith(f"--data {value}: "), message
            for fragment in fragments:
                assert fragment in message, message

    def copy(name: str) -> Path:
        shutil.copytree(shards.parent, tmp_path / name)
        return tmp_path / name

    manifest = json.loads((shards.parent / "manifest.json").read_text())
    bare = tmp_path / "bare"  # shards alone, as a cut-short run leaves them (no manifest yet)
    shutil.copytree(shards, bare / "shards")
    refused(bare, f"no {bare / 'manifest.json'}", "in progress or was cut short")
    broken = copy("broken")
    (broken / "manifest.json").write_text('{"counts": ')
    refused(broken, f"{broken / 'manifest.json'} is not valid JSON")
    short = copy("short")  # counts that do not add up: in != written + rejected
    (short / "manifest.json").write_text(
        json.dumps({**manifest, "counts": {"input": 20, "written": 16, "rejected": 2}})
    )
    refused(short, f"{short / 'manifest.json'} is incomplete: 20 in, 16 written, 2 rejected")
    old = copy("old")  # a manifest without the shard list
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "shards"}))
    refused(old, "lists no shard files")
    lost = copy("lost")
    (lost / "shards" / "part-1.parquet").unlink()
    refused(lost, f"the shards differ from {lost / 'manifest.json'}", "1 listed shard files missing: part-1.parquet")
    added = copy("added")  # a file another run is writing there
    shutil.copy(shards / "part-0.parquet", added / "shards" / "extra.parquet")
    (added / "shards" / "part-0.parquet").write_bytes((shards / "part-0.parquet").read_bytes()[:100])
    refused(added, "1 shard files not listed: extra.parquet", "1 shard files changed: part-0.parquet")
    nothing = tmp_path / "nothing"  # a finished run that rejected every input
    (nothing / "shards").mkdir(parents=True)
    write_manifest(str(nothing), {"counts": {"input": 3, "written": 0, "rejected": 3}})
    refused(nothing, "preprocess wrote no rows (3 rejected")
    assert resolve_data([str(copy("fine"))]) == [str(tmp_path / "fine" / "shards")]  # an untouched copy is read


def _metrics(text: str) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


@pytest.mark.slow
def test_resources_are_derived_from_the_cluster_unless_given():
    from dataclasses import replace

    from pipelines.train import plan_resources
    from pipelines.train_config import TrainConfig

    base = TrainConfig(model="tdm", data="d", storage="s", name="n", tiny=True)
    both = [base, replace(base, model="sdm")]
    planned, line = plan_resources(both, 2, 0)  # this machine: 2 CPUs, no GPU
    assert [(c.workers, c.cpus_per_worker, c.data_cpus) for c in planned] == [(1, 0.44, 0.06)] * 2
    assert sum(c.workers * c.cpus_per_worker + c.data_cpus for c in planned) <= 1  # one CPU left for file listing
    assert line.startswith("resources per model: 1 worker(s) × 0.44 CPU")
    planned, _ = plan_resources([replace(c, use_gpu=True) for c in both], 16, 8)  # one worker per GPU, split
    assert [c.workers for c in planned] == [4, 4] and all(c.cpus_per_worker >= 1 for c in planned)
    planned, _ = plan_resources([replace(base, cpus_per_worker=0.5, data_cpus=0.1)], 2, 0)  # given values stay
    assert (planned[0].cpus_per_worker, planned[0].data_cpus) == (0.5, 0.1)
    with pytest.raises(ValueError, match="the cluster has 2 CPUs; training needs 2.12 plus 1 free"):
        plan_resources([replace(base, workers=2, cpus_per_worker=1.0)], 2, 0)


def test_two_workers_fault_tolerance_resume_on_s3(ray_session, s3_endpoint, shards, tmp_path, monkeypatch, capsys):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="train")
    for part in sorted(shards.iterdir()):
        s3.upload_file(str(part), "train", f"shards/{part.name}")
    s3.upload_file(str(shards.parent / "manifest.json"), "train", "manifest.json")  # a finished preprocess run
    marker = tmp_path / "failed-once"
    monkeypatch.setenv("FACEDIFFUSER_FAULTS", f"train.step=3,train.marker={marker}")  # facediffuser/faults.py
    common = [
        "--model",
        "sdm",
        "--data",
        "s3://train/shards",
        "--storage",
        "s3://train/runs",
        "--name",
        "ft",
        "--workers",
        "2",
        "--checkpoint-every",
        "2",
        *SMALL,
    ]

    # run 1: rank 1 raises before step 3 → the group restarts from the step-2 checkpoint → finishes at 4
    assert cli_main(["train", *common, "--max-steps", "4", "--max-failures", "1"]) == 0
    assert marker.read_text().startswith("failed at step 3")
    out = capsys.readouterr().out
    assert "final model: s3://train/runs/ft/final" in out.strip().splitlines()[-1]
    rows = _metrics(s3.get_object(Bucket="train", Key="runs/ft/sdm/metrics.csv")["Body"].read().decode())
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # each step once: steps 1–2 kept, 3–4 redone after restart
    assert [r["attempt"] for r in rows] == [0, 0, 1, 1]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="train", Prefix="runs/ft/")["Contents"]}
    assert "runs/ft/sdm/loss_curve.png" in keys
    assert any(k.startswith("runs/ft/sdm/checkpoint_00000004/model/unet/") for k in keys)
    assert not any(k.endswith((".bin", ".pt", ".pkl")) for k in keys if "/final/" in k or "/checkpoint_" in k)
    assert {"runs/ft/final/sdm/subject_encoder/config.json", "runs/ft/final/tdm/unet/config.json"} <= keys
    note = json.loads(s3.get_object(Bucket="train", Key="runs/ft/final/export.json")["Body"].read())
    assert note["sdm"]["trained"] and not note["tdm"]["trained"]

    # run 2: the same name resumes from step 4 and only runs steps 5–6
    monkeypatch.delenv("FACEDIFFUSER_FAULTS")
    assert cli_main(["train", *common, "--max-steps", "6"]) == 0
    rows = _metrics(s3.get_object(Bucket="train", Key="runs/ft/sdm/metrics.csv")["Body"].read().decode())
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["attempt"] for r in rows][-2:] == [2, 2]

    # both ranks hold identical parameters at every checkpoint (all-gathered checksum spread)
    from safetensors import safe_open

    local = tmp_path / "state.safetensors"
    s3.download_file("train", "runs/ft/sdm/checkpoint_00000006/training_state.safetensors", str(local))
    with safe_open(str(local), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["step"] == "6"
    assert json.loads(metadata["extra"])["param_rank_spread"] == 0.0
    from conftest import scrape_metrics  # operators see the steps at Ray's metrics endpoint

    def sdm_steps(found):
        return any('model="sdm"' in line for line in found["ray_facediffuser_train_steps_total"])

    assert sdm_steps(scrape_metrics(["ray_facediffuser_train_steps_total", "ray_facediffuser_train_loss"], sdm_steps))


@pytest.mark.slow
def test_both_models_side_by_side_give_a_working_pipeline(ray_session, shards, tmp_path, capsys, astronaut):
    storage = tmp_path / "runs"
    output = tmp_path / "data"  # a preprocess output directory, given as is
    shutil.copytree(shards.parent, output)
    # no resource flags: the runs are sized from the 2-CPU cluster (the README's CPU try-out command)
    assert (
        cli_main(
            [
                "train",
                "--model",
                "both",
                "--data",
                str(output),
                "--storage",
                str(storage),
                "--name",
                "pair",
                "--max-steps",
                "2",
                "--checkpoint-every",
                "2",
                "--lr",
                "1e-4",
                *TINY,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "resources per model: 1 worker(s) × 0.44 CPU, Ray Data reads 0.06 CPU (cluster: 2 CPUs" in out
    final = storage / "pair" / "final"
    assert out.strip().splitlines()[-1] == f"final model: {final}"
    assert "tdm: 2 steps" in out and "sdm: 2 steps" in out
    for which in ("sdm", "tdm"):
        assert (storage / "pair" / which / "loss_curve.png").stat().st_size > 1000
        rows = _metrics((storage / "pair" / which / "metrics.csv").read_text())
        assert [r["step"] for r in rows] == [1, 2] and all(r["lr"] == 1e-4 for r in rows)
        assert all(r["samples_per_s"] > 0 for r in rows)
    assert (final / "sdm" / "subject_encoder").is_dir() and not (final / "tdm" / "subject_encoder").exists()
    note = json.loads((final / "export.json").read_text())
    assert note["sdm"]["trained"] and note["tdm"]["trained"]

    from facediffuser.model_loading import load_pipeline
    from facediffuser.models.tiny import tiny_components

    pipe = load_pipeline(str(final))
    untrained = tiny_components(seed=0)
    for trained, base in ((pipe.sdm_unet, untrained["sdm_unet"]), (pipe.tdm_unet, untrained["tdm_unet"])):
        assert any(not (a == b).all() for a, b in zip(trained.state_dict().values(), base.state_dict().values()))
    pipe.set_progress_bar_config(disable=True)
    result = pipe("a man <|image|> at the beach", [astronaut], num_inference_steps=3, seed=0)
    image = result.images[0]
    assert image.size == (128, 128) and len(image.getcolors(maxcolors=128 * 128)) > 10


@pytest.mark.slow
def test_train_from_a_hub_sd15_directory_with_fp16_variant_files(ray_session, shards, tmp_path, capsys):
    """--base as users have SD1.5 from the hub (model_index.json, safety_checker/, only *.fp16.* weights, 2022
    configs and key names) with --variant fp16; a new subject encoder from a CLIP vision directory (--image-encoder).
    The SDM trains, the TDM is paired from the same base, and the result loads as a pipeline."""
    from official_env import write_hub_sd15

    from facediffuser.model_loading import load_pipeline
    from facediffuser.models.tiny import tiny_pipeline

    base_pipe = tiny_pipeline(seed=8)
    hub = write_hub_sd15(tmp_path / "sd15", base_pipe, weights="safetensors", plain=False, fp16_variant=True)
    base_pipe.subject_encoder.image_encoder.save_pretrained(tmp_path / "clip-vision")
    common = [
        "--data",
        str(shards.parent),
        "--storage",
        str(tmp_path / "runs"),
        "--name",
        "hub",
        "--base",
        str(hub),
        "--resolution",
        "64",
        "--batch-size",
        "2",
        "--cpus-per-worker",
        "0.25",
        "--data-cpus",
        "0.1",
    ]
    done = _cli("--model", "sdm", *common)  # the variant is not guessed: the error says which to pass
    assert done.returncode == 2 and "no plain weights" in done.stderr and "pass --variant fp16" in done.stderr
    assert (
        cli_main(
            [
                "train",
                "--model",
                "sdm",
                *common,
                "--variant",
                "fp16",
                "--image-encoder",
                str(tmp_path / "clip-vision"),
                "--max-steps",
                "1",
                "--checkpoint-every",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "sdm: 1 steps" in out and "tdm: untrained base, paired" in out
    pipe = load_pipeline(str(tmp_path / "runs" / "hub" / "final"))
    for key, value in base_pipe.tdm_unet.state_dict().items():  # the paired TDM: the base's fp16 files, in fp32
        assert pipe.tdm_unet.state_dict()[key].dtype == value.dtype
        assert (pipe.tdm_unet.state_dict()[key] == value.half().float()).all(), key
