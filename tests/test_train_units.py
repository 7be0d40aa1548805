"""Training's driver-side pieces without starting Ray: the command line read from TrainConfig, its validation, the
test-only fault settings kept out of the config, and the export that replaces final/<model> only once the new copy
is complete (locally and on S3)."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile

import boto3
import pyarrow.fs as pafs
import pytest

from facediffuser import faults
from facediffuser.config import from_args
from pipelines import train_export
from pipelines.train import add_arguments, worker_env
from pipelines.train_config import TrainConfig
from pipelines.train_worker import injected_fault

INFRA_FLAGS = [
    "--model",
    "both",
    "--data",
    "s3://b/shards",
    "--base",
    "runwayml/stable-diffusion-v1-5",
    "--image-encoder",
    "openai/clip-vit-large-patch14",
    "--storage",
    "s3://b/runs",
    "--name",
    "ffhq",
    "--workers",
    "4",
    "--use-gpu",
    "--mixed-precision",
    "bf16",
    "--batch-size",
    "8",
    "--lr",
    "1e-5",
    "--max-steps",
    "150000",
    "--checkpoint-every",
    "1000",
]


def parser() -> argparse.ArgumentParser:
    from facediffuser.cli import add_verbose

    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    add_verbose(parser)  # what facediffuser/cli.py adds to every Ray-backed command
    return parser


def test_the_command_line_comes_from_the_config_and_faults_stay_out_of_it():
    args = parser().parse_args(INFRA_FLAGS)
    config = from_args(TrainConfig, args, model="sdm")
    assert (config.workers, config.use_gpu, config.batch_size, config.max_steps, config.checkpoint_every) == (
        4,
        True,
        8,
        150000,
        1000,
    )
    assert config.data == ["s3://b/shards"] and config.keep_checkpoints == 2 and config.resolution is None
    assert args.model == "both" and not args.verbose
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not names & {"fail_at_step", "fail_marker", "worker_env", "verbose"}
    text = parser().format_help()
    assert "--fail" not in text and "--verbose" in text and "(default: 1000)" in text
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser().parse_args([*INFRA_FLAGS, "--tiny"])  # --base and --tiny exclude each other


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": "both"}, "--model must be sdm or tdm"),
        ({"name": "a b"}, "--name 'a b'"),
        ({"tiny": False}, "give --base MODEL_DIR"),
        ({"base": "/models/sd"}, "--base and --tiny exclude each other"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"data_cpus": 0.0}, "--data-cpus must be > 0"),
        ({"lr": 0.0}, "--lr must be > 0"),
        ({"mixed_precision": "fp8"}, "--mixed-precision must be bf16, fp16 or no"),
        ({"resolution": 100}, "--resolution must be a multiple of 64"),
    ],
)
def test_validate_names_the_setting_before_reading_anything(tmp_path, change, message):
    config = TrainConfig(model="tdm", data=str(tmp_path / "absent"), storage=str(tmp_path), name="n", tiny=True)
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(config, **change).validate()
    with pytest.raises(FileNotFoundError, match="--data .*absent: no such file"):  # the settings were fine
        config.validate()


def test_fault_injection_is_read_from_the_worker_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(faults.ENV, raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the default marker's folder
    injected_fault(1, 0, 1, "run")  # off: nothing happens
    assert "FACEDIFFUSER_FAULTS" not in worker_env()
    monkeypatch.setenv(faults.ENV, "train.step=3")
    with pytest.raises(faults.InjectedFault, match="train.step=3"):
        injected_fault(3, 0, 1, "run")
    assert (tmp_path / "facediffuser-fail-run").read_text() == "failed at step 3\n"  # the default marker
    monkeypatch.setenv(faults.ENV, f"train.step=3,train.marker={tmp_path / 'marker'}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    assert {faults.ENV, "AWS_ACCESS_KEY_ID"} <= set(worker_env())  # what workers get
    injected_fault(3, 0, 2, "run")  # not the last rank
    injected_fault(2, 1, 2, "run")  # not the step
    with pytest.raises(faults.InjectedFault, match="injected test fault at train.step=3"):
        injected_fault(3, 1, 2, "run")
    injected_fault(3, 1, 2, "run")  # once only: the marker says it already failed


def _model_dir(root, files: dict[str, str]):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


OLD = {"unet/config.json": "old", "unet/old-only.safetensors": "old"}
NEW = {"unet/config.json": "new", "vae/config.json": "new"}


def _failing_copy(monkeypatch):
    """pafs.copy_files that writes one file of the new copy, then fails (a crash or a lost connection)."""
    real = pafs.copy_files

    def copy_files(source, dest, source_filesystem=None, destination_filesystem=None, **kwargs):
        destination_filesystem.create_dir(dest)
        with destination_filesystem.open_output_stream(f"{dest}/partial") as out:
            out.write(b"half")
        raise OSError("connection lost")

    monkeypatch.setattr(train_export.pafs, "copy_files", copy_files)
    return lambda: monkeypatch.setattr(train_export.pafs, "copy_files", real)


def test_local_export_replaces_the_old_model_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    final = _model_dir(tmp_path / "final" / "sdm", OLD)
    source = _model_dir(tmp_path / "checkpoint" / "model", NEW)
    restore = _failing_copy(monkeypatch)
    with pytest.raises(OSError, match="connection lost"):
        train_export.replace_dir(pafs.LocalFileSystem(), str(source), str(final))
    assert {p.relative_to(final).as_posix(): p.read_text() for p in final.rglob("*") if p.is_file()} == OLD
    restore()
    train_export.replace_dir(pafs.LocalFileSystem(), str(source), str(final))
    assert {p.relative_to(final).as_posix(): p.read_text() for p in final.rglob("*") if p.is_file()} == NEW
    assert sorted(p.name for p in final.parent.iterdir()) == ["sdm"]  # no .incoming / .outgoing left


def test_s3_export_replaces_the_old_model_only_once_the_new_one_is_complete(s3_endpoint, tmp_path, monkeypatch):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="export")
    for key, text in OLD.items():
        s3.put_object(Bucket="export", Key=f"runs/x/final/sdm/{key}", Body=text.encode())
    source = _model_dir(tmp_path / "model", NEW)

    def listing() -> dict[str, str]:
        objects = s3.list_objects_v2(Bucket="export", Prefix="runs/x/final/").get("Contents", [])
        return {
            o["Key"][len("runs/x/final/") :]: s3.get_object(Bucket="export", Key=o["Key"])["Body"].read().decode()
            for o in objects
            if not o["Key"].endswith("/")
        }  # pyarrow keeps empty directory markers

    restore = _failing_copy(monkeypatch)
    with pytest.raises(OSError, match="connection lost"):
        train_export.replace_dir(pafs.LocalFileSystem(), str(source), "s3://export/runs/x/final/sdm")
    assert {k: v for k, v in listing().items() if k.startswith("sdm/")} == {f"sdm/{k}": v for k, v in OLD.items()}
    restore()
    train_export.replace_dir(pafs.LocalFileSystem(), str(source), "s3://export/runs/x/final/sdm")
    assert listing() == {f"sdm/{k}": v for k, v in NEW.items()}  # stale keys and the staging copy are gone
