"""facediffuser.model_dir: the one writer/reader of model directories, run dirs → final/, and the s3:// mirror
(real moto server on 127.0.0.1; concurrency with real separate processes)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import serve_fixtures

from facediffuser import model_dir, model_loading, model_mirror

ROOT = Path(__file__).resolve().parents[1]
service = serve_fixtures.service  # the session's running Serve app (tiny models)


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_pipe) -> Path:
    """A Face-diffuser model as training exports it: final/sdm and final/tdm, written by model_dir.save."""
    final = tmp_path_factory.mktemp("run") / "final"
    for which in model_dir.MODELS:
        model_dir.save(
            final / which,
            which,
            unet=getattr(tiny_pipe, f"{which}_unet"),
            vae=tiny_pipe.vae,
            text_encoder=tiny_pipe.text_encoder,
            tokenizer=tiny_pipe.tokenizer,
            scheduler=tiny_pipe.scheduler,
            subject_encoder=tiny_pipe.subject_encoder,
        )
    return final


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FACEDIFFUSER_CACHE", str(folder))  # inherited by the child processes below
    return folder


def upload(client, bucket: str, prefix: str, folder: Path) -> str:
    """A new bucket holding `folder` under `prefix`; → its s3:// URI."""
    client.create_bucket(Bucket=bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


def s3_client():
    import boto3

    return boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])


# ------------------------------------------------------------------------------------------ local contract
def test_save_writes_the_layout_and_the_pipeline_method_is_the_same_writer(saved_model, tiny_pipe, tmp_path):
    assert {p.name for p in (saved_model / "sdm").iterdir()} == {
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "subject_encoder",
    }
    assert {p.name for p in (saved_model / "tdm").iterdir()} == {
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    }
    assert not [p for p in saved_model.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    tiny_pipe.save_model_dir(tmp_path / "sdm", "sdm")  # FaceDiffuserPipeline's method goes through model_dir.save
    assert file_hashes(tmp_path / "sdm") == file_hashes(saved_model / "sdm")
    with pytest.raises(ValueError, match="which must be 'sdm' or 'tdm'"):
        tiny_pipe.save_model_dir(tmp_path / "x", "both")
    with pytest.raises(ValueError, match="needs its subject_encoder"):
        model_dir.save(
            tmp_path / "y",
            "sdm",
            unet=tiny_pipe.sdm_unet,
            vae=tiny_pipe.vae,
            text_encoder=tiny_pipe.text_encoder,
            tokenizer=tiny_pipe.tokenizer,
            scheduler=tiny_pipe.scheduler,
        )


def test_resolve_turns_a_run_directory_into_its_final(saved_model, capsys):
    run = saved_model.parent
    assert model_dir.resolve(str(saved_model)) == str(saved_model)  # no export.json: taken as it is
    (saved_model / "export.json").write_text(json.dumps({"sdm": {"trained": True}, "tdm": {"trained": True}}))
    (run / "sdm").mkdir(exist_ok=True)  # a Ray Train run folder beside final/, no model at its top
    try:
        assert model_dir.resolve(str(run)) == str(saved_model)
        assert model_dir.resolve(str(run)) == str(saved_model)
        assert capsys.readouterr().out.count("a training run; using its final models") == 1  # said once
        assert model_dir.kind(saved_model) == "sdm+tdm" and model_dir.kind(run / "sdm") is None
    finally:
        (saved_model / "export.json").unlink()
        (run / "sdm").rmdir()


def test_identity_names_the_parts_and_its_version_follows_the_content(saved_model, tiny_pipe, cache, tmp_path):
    import shutil

    pipe = model_loading.load_pipeline(str(saved_model))
    seen = model_loading.identity(pipe, str(saved_model))
    assert set(seen["hashes"]) == {"final/sdm", "final/tdm"} and len(seen["model_version"]) == 64
    assert seen["model_version"] == model_dir.content_version(
        {"sdm": seen["hashes"]["final/sdm"], "tdm": seen["hashes"]["final/tdm"]}
    )
    copy = tmp_path / "elsewhere" / "final"
    shutil.copytree(saved_model, copy)
    assert model_loading.identity(pipe, str(copy))["model_version"] == seen["model_version"]  # content, not place
    config = copy / "tdm" / "scheduler" / "scheduler_config.json"
    config.write_text(config.read_text() + " ")
    changed = model_loading.identity(pipe, str(copy))
    assert (
        changed["model_version"] != seen["model_version"]
        and changed["hashes"]["final/sdm"] == seen["hashes"]["final/sdm"]
    )
    tiny = model_loading.identity(tiny_pipe, None)
    assert tiny["model"] == "tiny" and tiny["model_version"] == tiny["hashes"]["tiny"]


def test_version_mismatch_names_both_versions():
    same = {"model_version": "a" * 64}
    assert model_dir.version_mismatch({"encoder": same, "sampler": dict(same)}) is None
    message = model_dir.version_mismatch({"encoder": same, "sampler": {"model_version": "b" * 64}})
    assert "different models" in message and "encoder aaaaaaaaaaaa" in message and "sampler bbbbbbbbbbbb" in message
    assert model_dir.version_mismatch({"encoder": {}, "sampler": {}}) is not None  # unknown is not "the same"


@pytest.mark.parametrize("key", ["../escape.txt", "sdm/../../escape.txt", "/escape.txt", "sdm//x", "./x", ""])
def test_check_key_refuses_anything_but_a_plain_relative_path(key, tmp_path):
    with pytest.raises(ValueError, match="refusing to mirror|outside"):
        model_mirror.check_key(key, "s3://b/m", tmp_path)


def test_check_key_keeps_plain_keys_inside(tmp_path):
    assert (
        model_mirror.check_key("sdm/unet/config.json", "s3://b/m", tmp_path)
        == (tmp_path / "sdm/unet/config.json").resolve()
    )
    assert model_mirror.check_key("a..b/c.json", "s3://b/m", tmp_path).name == "c.json"  # dots inside a name are fine


# ------------------------------------------------------------------------------------------ s3 mirror (moto)
CHILD = r"""
import json, pathlib, sys, time
from facediffuser import model_mirror

uri, gate, name = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
(gate / name).touch()
deadline = time.monotonic() + 60
while len(list(gate.iterdir())) < 2 and time.monotonic() < deadline:  # start mirroring together
    time.sleep(0.005)
with model_mirror.mirrored(uri) as copy:
    files = {str(p.relative_to(copy.root)): __import__("hashlib").sha256(p.read_bytes()).hexdigest()
             for p in sorted(copy.root.rglob("*")) if p.is_file()}
    print(json.dumps({"root": str(copy.root), "version": copy.version, "downloaded": copy.downloaded, "files": files}))
"""


@pytest.mark.slow
def test_two_processes_mirror_the_same_model_at_once(s3_endpoint, saved_model, cache, tmp_path):
    client = s3_client()
    uri = upload(client, "models-race", "runs/a/final", saved_model)
    gate = tmp_path / "gate"
    gate.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, uri, str(gate), name],
            cwd=ROOT,
            env=os.environ.copy(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("one", "two")
    ]
    results = []
    for child in children:
        out, err = child.communicate(timeout=300)
        assert child.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["root"] == results[1]["root"] and results[0]["version"] == results[1]["version"]
    assert sorted(r["downloaded"] for r in results) == [False, True]  # one fetched under the lock, one reused it
    assert results[0]["files"] == results[1]["files"] == file_hashes(saved_model)
    home = Path(results[0]["root"]).parent
    assert [p.name for p in home.iterdir() if p.is_dir()] == [results[0]["version"]]  # no temp dir left behind
    assert model_mirror.mirror(uri) == Path(results[0]["root"])  # unchanged remote: reused, not fetched again


@pytest.mark.slow
def test_a_new_version_never_replaces_one_being_read(s3_endpoint, saved_model, cache):
    client = s3_client()
    uri = upload(client, "models-update", "m", saved_model)
    with model_mirror.mirrored(uri) as first:  # a loader holding version 1
        before = file_hashes(first.root)
        key = "m/tdm/scheduler/scheduler_config.json"
        body = client.get_object(Bucket="models-update", Key=key)["Body"].read()
        client.put_object(Bucket="models-update", Key=key, Body=body + b" ")
        second = model_mirror.mirror(uri)
        assert second != first.root and second.parent == first.root.parent
        assert first.root.is_dir() and file_hashes(first.root) == before  # kept, untouched, while read
        assert (
            file_hashes(second)["tdm/scheduler/scheduler_config.json"] != before["tdm/scheduler/scheduler_config.json"]
        )
    (first.root.parent / ".incoming-crashed").mkdir()  # what a killed download leaves
    assert model_mirror.mirror(uri) == second
    assert not first.root.exists() and not (first.root.parent / ".incoming-crashed").exists()
    # a mirrored load reports the version of what it read, the same as the local copy's
    pipe = model_loading.load_pipeline(uri)
    seen = model_loading.identity(pipe, uri)
    assert seen["model_version"] == second.name and set(seen["hashes"]) == {"m/sdm", "m/tdm"}


@pytest.mark.slow
def test_mirrored_and_local_copies_of_one_model_have_one_version(s3_endpoint, saved_model, cache):
    client = s3_client()
    uri = upload(client, "models-same", "runs/b/final", saved_model)
    remote = model_loading.identity(model_loading.load_pipeline(uri), uri)
    local = model_loading.identity(model_loading.load_pipeline(str(saved_model)), str(saved_model))
    assert remote["hashes"] == local["hashes"] and remote["model_version"] == local["model_version"]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["m/../escape.txt", "m/sdm/../../../escape.txt", "m//escape.txt"])
def test_a_key_that_leaves_the_prefix_is_refused_before_anything_is_written(
    s3_endpoint, saved_model, cache, tmp_path, key
):
    client = s3_client()
    bucket = "hostile-" + hashlib.sha256(key.encode()).hexdigest()[:8]
    upload(client, bucket, "m", saved_model)
    client.put_object(Bucket=bucket, Key=key, Body=b"not yours")
    with pytest.raises(ValueError, match="is not a plain relative path") as refused:
        model_loading.load_pipeline(f"s3://{bucket}/m")
    assert repr(key[2:]) in str(refused.value)  # names the offending key, relative to the prefix
    assert not [p for p in tmp_path.rglob("*") if p.name == "escape.txt"]
    assert not list((cache / "mirrors").rglob("*.safetensors"))  # nothing downloaded at all


# ------------------------------------------------------------------------------------------ Serve ingress
class _Handle:
    """A deployment handle stand-in: `handle.method.remote()` awaits to a fixed answer."""

    def __init__(self, **answers):
        self.answers = answers

    def __getattr__(self, name):
        answer = self.answers[name]

        class Method:
            @staticmethod
            async def remote(*args):
                return answer

        return Method


def test_info_and_health_refuse_when_encoder_and_sampler_loaded_different_models():
    from serving.api import Limits, RequestError
    from serving.ingress import FaceDiffuserAPI
    from serving.settings import ServeConfig

    def ingress(encoder_version: str, sampler_version: str):
        cls = FaceDiffuserAPI.func_or_class.__wrapped__  # our class, without Serve's ASGI replica wrapper
        obj = cls.__new__(cls)  # the route methods alone; no Serve replica needed
        sampler = {
            "model": "m",
            "hashes": {"m": sampler_version},
            "model_version": sampler_version,
            "default_size": 64,
            "batches_served": 0,
        }
        obj.encoder = _Handle(ready={"hits": 0}, model={"model": "m", "model_version": encoder_version})
        obj.sampler = _Handle(ready=sampler)
        obj.config, obj.token, obj.limits = ServeConfig(tiny=True), None, Limits()
        return cls, obj

    cls, same = ingress("v1", "v1")
    info = asyncio.run(cls.info(same, None))
    assert info["model_version"] == "v1" and info["model_versions"] == {"encoder": "v1", "sampler": "v1"}
    assert asyncio.run(cls.healthz(same))["status"] == "ready"
    cls, differ = ingress("v1", "v2")
    with pytest.raises(RequestError) as refused:
        asyncio.run(cls.info(differ, None))
    assert refused.value.args[:2] == (503, "model_mismatch") and "encoder v1" in refused.value.args[2]
    health = asyncio.run(cls.healthz(differ))
    assert health.status_code == 503 and b"model_mismatch" in health.body


def test_the_sampler_refuses_embeddings_made_by_another_model():
    """Per request, not only in /healthz: embeddings tagged with another model_version than the sampler's UNets
    are refused with 503 model_mismatch before any denoising (an untagged one too: unknown is not "the same")."""
    from serving.sampler import SamplerDeployment

    cls = SamplerDeployment.func_or_class
    sampler = cls.__new__(cls)  # submit alone; no Serve replica, no models
    sampler.model_info = {"model": "m", "hashes": {}, "model_version": "v2"}
    for embeds in ({"text": None, "model_version": "v1"}, {"text": None}):
        answer = asyncio.run(cls.submit(sampler, {"steps": 2}, embeds))
        assert answer["error"][:2] == (503, "model_mismatch") and "sampler v2" in answer["error"][2]


@pytest.mark.slow
def test_served_deployments_report_one_model_version(service):
    """The real app (tiny models, real HTTP): encoder and sampler each loaded the model; both versions agree and
    every answer's manifest carries the one /v1/info reports."""
    client = service["client"]
    info = client.get("/v1/info").json()
    versions = info["model_versions"]
    assert versions["encoder"] == versions["sampler"] == info["model_version"] and len(info["model_version"]) == 64
    assert info["hashes"] == {"tiny": info["model_version"]}
    response = serve_fixtures.generate(client, service["reference"], seed=3)
    assert response.status_code == 200, response.text
    assert response.json()["manifest"]["model_version"] == info["model_version"]
