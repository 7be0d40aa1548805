"""The cluster path as a user takes it: `ray start --head`, `ray job submit --working-dir .` for preprocessing and
then training, with inputs, shards and checkpoints on an S3 endpoint (moto's server on 127.0.0.1); and bad
S3 configuration failing fast with a one-line error."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from conftest import free_port
from PIL import Image

from cluster.local import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Ray 2.60's `ray start` turns on token authentication (token in ~/.ray/auth_token); its clients must opt in.
# The cluster runs `python -m ...` entrypoints with its own PATH: put this environment's interpreter first.
TOKEN_ENV = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def s3_client():
    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


def keys(client, bucket, prefix):
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@pytest.fixture(scope="module")
def ray_head():
    """A separate Ray cluster started the way a user starts one (one head node, cluster/local.py): its own
    process group that we end ourselves (a plain `ray stop` would also stop the test session's own cluster)."""
    with LocalCluster(head_cpus=3, object_store_bytes=300_000_000) as cluster:
        yield cluster.dashboard_url
    assert not cluster.processes()


def submit(address: str, *command: str) -> subprocess.CompletedProcess:
    env_vars = {
        k: os.environ[k]
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    deadline = time.time() + 360
    while True:  # the head's job agent comes up after the dashboard answers (minutes on a busy 2-core machine)
        done = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                ".",
                "--runtime-env-json",
                json.dumps({"env_vars": env_vars}),
                "--",
                *command,
            ],
            capture_output=True,
            text=True,
            timeout=1200,
            cwd=ROOT,
            env=TOKEN_ENV,
        )
        if "No available agent" not in done.stderr or time.time() > deadline:
            return done
        time.sleep(5)


@pytest.mark.slow
def test_preprocess_then_train_as_ray_jobs_on_s3(ray_head, s3_endpoint, astronaut):
    client = s3_client()
    client.create_bucket(Bucket="lake")
    photo = Image.fromarray(astronaut)
    for name, image in {"one.jpg": photo, "mirror.jpg": photo.transpose(Image.FLIP_LEFT_RIGHT)}.items():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG")
        client.put_object(Bucket="lake", Key=f"raw/{name}", Body=buffer.getvalue())
    client.put_object(Bucket="lake", Key="raw/broken.jpg", Body=b"not a jpeg")

    pre = submit(
        ray_head,
        "python",
        "-m",
        "pipelines.preprocess",
        "--input",
        "s3://lake/raw",
        "--output",
        "s3://lake/prepared",
        "--batch-size",
        "2",
    )
    assert pre.returncode == 0, pre.stdout[-3000:] + pre.stderr[-3000:]
    assert "succeeded" in pre.stdout
    manifest = json.loads(client.get_object(Bucket="lake", Key="prepared/manifest.json")["Body"].read())
    assert any(k.endswith(".parquet") for k in keys(client, "lake", "prepared/shards/"))
    assert any(k.endswith(".parquet") for k in keys(client, "lake", "prepared/rejects/"))
    assert json.dumps(manifest).count("broken.jpg") <= 1  # the bad file is accounted for as a reject, once

    train = submit(
        ray_head,
        "python",
        "-m",
        "pipelines.train",
        "--model",
        "both",
        "--tiny",
        "--data",
        "s3://lake/prepared/shards",
        "--storage",
        "s3://lake/runs",
        "--name",
        "job",
        "--max-steps",
        "2",
        "--checkpoint-every",
        "1",
        "--batch-size",
        "1",
        "--resolution",
        "64",
        "--cpus-per-worker",
        "0.25",
        "--data-cpus",
        "0.25",
    )
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    stored = keys(client, "lake", "runs/job/")
    for model in ("sdm", "tdm"):
        assert f"runs/job/final/{model}/unet/diffusion_pytorch_model.safetensors" in stored
        assert f"runs/job/{model}/loss_curve.png" in stored
    assert "runs/job/final/sdm/subject_encoder/diffusion_pytorch_model.safetensors" in stored
    assert not [k for k in stored if k.endswith((".pt", ".pkl", ".bin"))], "checkpoints must not be pickles"


def run_cli(*args, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(BIN / "facediffuser"), *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_bad_s3_configuration_fails_fast_with_one_line(s3_endpoint, tmp_path):
    s3_client().create_bucket(Bucket="exists")
    missing_bucket = run_cli("preprocess", "--input", str(tmp_path), "--output", "s3://no-such-bucket/out")
    assert missing_bucket.returncode == 2
    assert missing_bucket.stderr.strip().splitlines()[-1].startswith("facediffuser preprocess: error:")
    assert "no-such-bucket" in missing_bucket.stderr and "does not exist" in missing_bucket.stderr

    unreachable = run_cli(
        "train",
        "--model",
        "tdm",
        "--tiny",
        "--data",
        "s3://exists/shards",
        "--storage",
        str(tmp_path),
        "--name",
        "x",
        env_extra={"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
    )
    assert unreachable.returncode == 2
    last = unreachable.stderr.strip().splitlines()[-1]
    assert last.startswith("facediffuser train: error: --data s3://exists/shards") and "reach" in last

    generate = run_cli(
        "generate",
        "--model",
        "s3://exists/no-model",
        "--prompt",
        "a man <|image|>",
        "--reference",
        str(ROOT / "facediffuser/assets/astronaut.jpg"),
        "--out",
        str(tmp_path / "o"),
    )
    assert generate.returncode == 2 and "model directory not found: s3://exists/no-model" in generate.stderr


@pytest.mark.slow
def test_wrong_credentials_are_refused(tmp_path):
    """moto with authentication on (INITIAL_NO_AUTH_ACTION_COUNT=0) rejects unknown keys, like real S3."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(4)
        result = run_cli(
            "preprocess",
            "--input",
            "s3://any/raw",
            "--output",
            str(tmp_path / "o"),
            env_extra={
                "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "AWS_ACCESS_KEY_ID": "AKIAWRONG",
                "AWS_SECRET_ACCESS_KEY": "wrong",
                "AWS_DEFAULT_REGION": "us-east-1",
            },
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("facediffuser preprocess: error: --input s3://any/raw")
    assert any(word in last for word in ("ACCESS_DENIED", "InvalidAccessKeyId", "403", "credentials"))
