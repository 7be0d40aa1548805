"""Serve pieces that need no running cluster: the deploy YAML, CLI validation, request checks, reference encoding."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_serve_yaml_is_a_valid_deploy_config_that_builds(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from serving.app import app_builder
    from serving.settings import TOKEN_ENV, ServeConfig

    config = yaml.safe_load((ROOT / "serving/config/serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    assert (module, name) == ("serving.app", "app_builder")
    # the app's idea of its address is the proxies' one (it decides whether a token is required)
    assert app["args"]["host"] == config["http_options"]["host"] == "0.0.0.0"
    assert app["args"]["allow_anonymous"] is False
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="refusing to serve on 0.0.0.0 without a bearer token.*--allow-anonymous"):
        app_builder(app["args"])  # the cluster lost its token secret: refuse, do not expose the GPUs
    monkeypatch.setenv(TOKEN_ENV, "cluster-secret")
    assert ServeConfig.from_dict(app["args"]).num_gpus == 1
    built = app_builder(app["args"])  # binds deployments; nothing is deployed
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown key\\(s\\) gpus"):
        app_builder({**app["args"], "gpus": 1})


def test_anonymous_api_is_refused_on_a_reachable_address(monkeypatch, capsys):
    """No token + a non-loopback address: config validation (and so `facediffuser serve`) refuses in one line
    naming --allow-anonymous; loopback, a token, or the explicit opt-out start."""
    from facediffuser.cli import main
    from serving.settings import TOKEN_ENV, ServeConfig, auth_mode, is_loopback

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    for host in ("0.0.0.0", "::", "192.168.1.7", "10.0.0.3", "gpu-box.example.org"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match=f"refusing to serve on {host} without a bearer token") as refused:
            ServeConfig(tiny=True, host=host)
        assert "--allow-anonymous" in str(refused.value) and "\n" not in str(refused.value)
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert "reachable from this machine only" in auth_mode(ServeConfig(tiny=True, host=host))
    anonymous = ServeConfig(tiny=True, host="0.0.0.0", allow_anonymous=True)
    assert anonymous.api_token is None and "authentication: OFF on 0.0.0.0" in auth_mode(anonymous)
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    assert "bearer token required" in auth_mode(ServeConfig(tiny=True, host="0.0.0.0"))
    monkeypatch.delenv(TOKEN_ENV)

    assert main(["serve", "--tiny", "--host", "0.0.0.0"]) == 2  # before Ray starts
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--allow-anonymous" in err and "0.0.0.0" in err, err
    args = ["serve", "--tiny", "--host", "0.0.0.0", "--allow-anonymous"]
    import argparse

    from serving.app import add_arguments, config_from_cli

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_cli(parser.parse_args(args[1:]))
    assert config.allow_anonymous and config.host == "0.0.0.0"


def test_check_request_compute_budget():
    """One budget on width x height x images x steps: each limit alone admits 4 x 1024^2 x 100 steps."""
    from serving.api import DEFAULT_COMPUTE_BUDGET, GenerateRequest, Limits, RequestError, check_request

    photo = base64.b64encode(b"\x89PNG fake").decode()
    limits = Limits()
    assert limits.compute_budget == DEFAULT_COMPUTE_BUDGET == 512 * 512 * 4 * 50

    def request(**fields):
        return GenerateRequest(prompt="a man <|image|>", references=[photo], **fields)

    # today's documented uses pass: 4 images of 512^2 at 50 steps, one 1024^2 image at 50, the tests' tiny ones
    check_request(request(num_images=4, steps=50), limits, default_size=512)
    check_request(request(num_images=4), limits, default_size=512)  # steps default to 50
    check_request(request(width=1024, height=1024, steps=50), limits, default_size=512)
    check_request(request(num_images=4, steps=8, width=128, height=128), Limits(max_steps=8, max_side=128), 128)
    for fields, size in (
        (dict(num_images=4, steps=100, width=1024, height=1024), 512),
        (dict(num_images=4, steps=51), 512),
        (dict(steps=51), 1024),
    ):
        with pytest.raises(RequestError) as caught:
            check_request(request(**fields), limits, default_size=size)
        assert caught.value.status == 422 and caught.value.code == "over_compute_budget"
        assert str(limits.compute_budget) in caught.value.message
    tight = Limits(compute_budget=64 * 64 * 2)
    check_request(request(width=64, height=64, steps=2), tight, default_size=512)
    with pytest.raises(RequestError, match="64x64 pixels x 2 image"):
        check_request(request(width=64, height=64, steps=2, num_images=2), tight, default_size=512)
    with pytest.raises(ValueError, match="limits.compute_budget must be a positive integer"):
        Limits(compute_budget=0)


def _encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_reference_decoding_accepts_only_common_photo_formats(astronaut):
    from serving.api import RequestError
    from serving.references import decode_reference

    small = np.ascontiguousarray(astronaut[::4, ::4])
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        image = decode_reference(_encoded(small, fmt), "reference 1", max_pixels=1 << 20)
        assert image.mode == "RGB" and image.size == (128, 128), fmt
    for fmt in ("TIFF", "ICO", "PPM"):
        with pytest.raises(RequestError, match="reference 2: not a JPEG, PNG, WebP, GIF or BMP image") as caught:
            decode_reference(_encoded(small, fmt), "reference 2", max_pixels=1 << 20)
        assert caught.value.status == 422 and caught.value.code == "invalid_image", fmt
    with pytest.raises(RequestError, match="exceeds the limit") as caught:
        decode_reference(_encoded(small, "PNG"), "reference 1", max_pixels=100 * 100)
    assert caught.value.status == 413


def test_identity_scoring_uses_bounded_copies_and_a_bounded_cache(astronaut):
    """References are shrunk before face detection and their descriptors kept in an LRU of cache_size."""
    from facediffuser.metrics.identity import IdentityScorer
    from serving.references import IDENTITY_MAX_SIDE, IdentityScoring

    class RecordingEmbedder:  # stands in for dlib: records what it was given
        name = "recording"

        def __init__(self):
            self.seen = []

        def embed_faces(self, image):
            self.seen.append(image.size)
            return np.ones((1, 4), np.float32) / 2

    embedder = RecordingEmbedder()
    scoring = IdentityScoring(IdentityScorer(embedder), cache_size=2, max_reference_pixels=4096 * 4096)
    big = _encoded(np.zeros((1500, 2000, 3), np.uint8), "PNG")
    generated = _encoded(np.ascontiguousarray(astronaut[::4, ::4]), "PNG")
    assert scoring.scores([generated], [[big]])["scores"] == [[1.0]]
    assert embedder.seen == [(IDENTITY_MAX_SIDE, 768), (128, 128)]  # the reference's copy, then the image
    scoring.scores([generated], [[big]])
    assert embedder.seen[2:] == [(128, 128)]  # the reference came from the cache
    others = [_encoded(np.full((40 + k, 50, 3), k, np.uint8), "PNG") for k in range(3)]
    for photo in others:
        scoring.reference([photo], "reference 1")
    assert len(scoring.cache) == 2  # bounded: the oldest entries went
    before = len(embedder.seen)
    scoring.reference([big], "reference 1")
    assert len(embedder.seen) == before + 1  # evicted, so embedded again
    from serving.api import RequestError

    with pytest.raises(RequestError, match="not a JPEG, PNG, WebP, GIF or BMP"):
        scoring.reference([_encoded(np.zeros((8, 8, 3), np.uint8), "TIFF")], "reference 1")


def test_ingress_queue_is_sized_so_bodies_fit_its_memory(monkeypatch):
    from serving.settings import PAYLOAD_COPIES, TOKEN_ENV, ServeConfig, ingress_capacity

    monkeypatch.setenv(TOKEN_ENV, "t")
    args = yaml.safe_load((ROOT / "serving/config/serve.yaml").read_text())["applications"][0]["args"]
    config = ServeConfig.from_dict(args)
    ongoing, queued = ingress_capacity(config)
    payload = config.limits["max_payload_bytes"]
    # what the encoder and sampler tiers could hold (4 x 8 x 4 = 128 ongoing) would take 10 GiB of bodies
    assert 4 * config.max_ongoing_requests * config.max_replicas * PAYLOAD_COPIES * payload > 8 * 2**30
    assert ongoing * PAYLOAD_COPIES * payload + queued * payload <= config.ingress_memory_mb * 2**20
    assert (ongoing, queued) == (50, 4)
    # with small bodies the memory is no constraint: the tiers' capacity decides, as before
    small = ServeConfig(tiny=True, max_replicas=1, max_queued_requests=4, limits={"max_payload_bytes": 3_000_000})
    assert ingress_capacity(small) == (32, 16)
    with pytest.raises(ValueError, match="ingress_memory_mb=64 cannot hold one request"):
        ServeConfig(tiny=True, ingress_memory_mb=64)


def test_gate_authorises_before_reading_and_stops_a_chunked_body_at_the_limit():
    """The ingress's ASGI gate: 401 without touching the body; a chunked body is read only up to the limit."""
    import asyncio
    import json
    from types import SimpleNamespace

    from serving.api import Limits
    from serving.gate import Gate

    chunk = 64 * 1024
    seen: list[bytes] = []

    async def route(scope, receive, send):  # stands in for FastAPI's routing: reads the whole body
        message = await receive()
        seen.append(message["body"])
        assert not message["more_body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(path, body_size, headers=(), token=None, limit=3_000_000, admit=None):
        app = SimpleNamespace(state=SimpleNamespace(token=token, limits=Limits(max_payload_bytes=limit), admit=admit))
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "root_path": "",
            "app": app,
            "headers": [(k.encode(), v.encode()) for k, v in headers],
        }
        pulled, sent = [0], []

        async def receive():
            pulled[0] += 1
            offset = (pulled[0] - 1) * chunk
            piece = b"x" * max(0, min(chunk, body_size - offset))
            return {"type": "http.request", "body": piece, "more_body": offset + chunk < body_size}

        async def send(message):
            sent.append(message)

        asyncio.run(Gate(route)(scope, receive, send))
        status = sent[0]["status"]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        return status, json.loads(body) if status != 200 else body, pulled[0]

    status, error, pulled = call("/v1/generate", 30 * 2**20)
    assert status == 413 and error["error"] == "payload_too_large" and "3000000" in error["message"]
    assert pulled <= 3_000_000 // chunk + 1  # stopped at the limit, not after 30 MB (480 chunks)
    status, body, pulled = call("/v1/generate", 200_000)
    assert status == 200 and seen[-1] == b"x" * 200_000 and pulled == 4  # under the limit: handed over whole
    status, error, pulled = call("/v1/generate", 30 * 2**20, headers=[("content-length", str(30 * 2**20))])
    assert status == 413 and pulled == 0  # a declared length over the limit: not a byte read
    # a token is set: no or a wrong token is 401 before the body is read at all (so never parsed)
    for headers in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
        status, error, pulled = call("/v1/generate", 30 * 2**20, headers=headers, token="s3cret")
        assert (status, error["error"], pulled) == (401, "unauthorized", 0)
    status, _, _ = call("/v1/generate", 10, headers=[("authorization", "Bearer s3cret")], token="s3cret")
    assert status == 200
    status, _, _ = call("/healthz", 0, token="s3cret")  # probes need no token
    assert status == 200


def test_gate_refuses_over_capacity_with_json_before_reading_the_body():
    """With `admit` requests inside, an API request is our JSON 503 busy (Serve's own refusal is plain text);
    probes still pass, and the count goes back down when requests finish."""
    import asyncio
    import json
    from types import SimpleNamespace

    from serving.api import Limits
    from serving.drain import GATE
    from serving.gate import Gate

    async def scenario():
        release = asyncio.Event()

        async def route(scope, receive, send):
            await receive()
            if scope["path"] == "/v1/generate":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        app = SimpleNamespace(state=SimpleNamespace(token=None, limits=Limits(max_payload_bytes=1000), admit=2))

        async def call(path, method="POST"):
            sent, pulled = [], [0]

            async def receive():
                pulled[0] += 1
                return {"type": "http.request", "body": b"{}", "more_body": False}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": method, "path": path, "root_path": "", "app": app, "headers": []}
            await Gate(route)(scope, receive, send)
            return sent, pulled[0]

        slow = [asyncio.create_task(call("/v1/generate")) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert GATE.in_flight == 2
        sent, pulled = await call("/v1/generate")
        headers = dict(sent[0]["headers"])
        assert sent[0]["status"] == 503 and pulled == 0 and headers[b"retry-after"] == b"2"
        assert json.loads(sent[1]["body"])["error"] == "busy"
        sent, _ = await call("/healthz", "GET")  # probes and reads are not refused for load
        assert sent[0]["status"] == 200
        release.set()
        for task in slow:
            sent, _ = await task
            assert sent[0]["status"] == 200
        assert GATE.in_flight == 0
        sent, _ = await call("/v1/generate")
        assert sent[0]["status"] == 200

    asyncio.run(scenario())


def test_cli_rejects_bad_config_before_starting_ray(capsys):
    from facediffuser.cli import main

    assert main(["serve", "--tiny", "--max-batch-size", "0"]) == 2
    assert "max_batch_size must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--tiny", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert "min_replicas <= max_replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: neither --model nor --tiny
        main(["serve"])
    assert exited.value.code == 2


def test_autoscaling_settings_reach_both_model_deployments_and_scale_to_zero_validates():
    from ray.serve.config import AutoscalingConfig

    from serving.app import build_app
    from serving.settings import ServeConfig

    config = ServeConfig(
        tiny=True,
        min_replicas=0,
        max_replicas=3,
        target_ongoing_requests=2,
        upscale_delay_s=4,
        downscale_delay_s=30,
        downscale_to_zero_delay_s=120,
    )
    scaling = config.autoscaling_config()
    assert scaling == {
        "min_replicas": 0,
        "max_replicas": 3,
        "target_ongoing_requests": 2,
        "upscale_delay_s": 4,
        "downscale_delay_s": 30,
        "look_back_period_s": 15.0,
        "downscale_to_zero_delay_s": 120,
    }
    AutoscalingConfig(**scaling)  # Ray accepts it as it is
    app = build_app(config)
    encoder, sampler = (bound._bound_deployment for bound in app._bound_deployment.init_args[:2])
    assert (encoder.name, sampler.name) == ("SubjectEncoder", "Sampler")
    for deployment in (encoder, sampler):
        bound = deployment._deployment_config.autoscaling_config
        assert bound.min_replicas == 0 and bound.max_replicas == 3 and bound.downscale_to_zero_delay_s == 120
    assert "downscale_to_zero_delay_s" not in ServeConfig(tiny=True).autoscaling_config()
    for bad, message in (
        ({"min_replicas": -1}, "0 <= min_replicas"),
        ({"min_replicas": 0, "max_replicas": 0}, "max_replicas >= 1"),
        ({"downscale_delay_s": -1}, "downscale_delay_s must be >= 0"),
        ({"target_ongoing_requests": 0}, "target_ongoing_requests"),
    ):
        with pytest.raises(ValueError, match=message):
            ServeConfig(tiny=True, **bad)


def test_replica_view_counts_running_replicas_per_node():
    import serving.scaling as scaling

    scaling._node_names.update({"n1": "gpu_node_a", "n2": "gpu_node_b"})
    details = {
        "applications": {
            "fd": {
                "deployments": {
                    "Sampler": {
                        "status": "UPSCALING",
                        "target_num_replicas": 2,
                        "deployment_config": {
                            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "policy": {}}
                        },
                        "replicas": [{"state": "RUNNING", "node_id": "n1"}, {"state": "STARTING", "node_id": None}],
                    },
                }
            }
        }
    }
    view = scaling.summarize(details, "fd", ("SubjectEncoder", "Sampler"))
    assert view["Sampler"] == {
        "status": "UPSCALING",
        "target": 2,
        "running": 1,
        "starting": 1,
        "nodes": {"gpu_node_a": 1},
        "autoscaling": {"min_replicas": 1, "max_replicas": 2},
    }
    assert view["SubjectEncoder"]["status"] == "MISSING" and view["SubjectEncoder"]["running"] == 0


def test_check_request_limits_and_base64():
    from serving.api import GenerateRequest, Limits, RequestError, check_request

    photo = base64.b64encode(b"\x89PNG fake").decode()
    limits = Limits(max_steps=10, max_side=256)
    checked = check_request(
        GenerateRequest(prompt="a man <|image|>", references=[[photo, "data:image/png;base64," + photo]]), limits
    )
    assert checked.references == [[b"\x89PNG fake", b"\x89PNG fake"]] and checked.request.steps == 10
    cases = [
        (dict(prompt="a man", references=[photo]), "no_subjects"),
        (dict(prompt="a man <|image|> and <|image|>", references=[photo]), "reference_count_mismatch"),
        (dict(prompt="a man <|image|>", references=[photo], steps=11), "steps_out_of_range"),
        (dict(prompt="a man <|image|>", references=[photo], width=512), "dimensions_over_limit"),
        (dict(prompt="a man <|image|>", references=["@@@"]), "invalid_base64"),
        (dict(prompt="a man <|image|>", references=[[]]), "empty_reference"),
    ]
    for fields, code in cases:
        with pytest.raises(RequestError) as caught:
            check_request(GenerateRequest(**fields), limits)
        assert caught.value.code == code and caught.value.status in (400, 422)


def test_every_candidate_counts_toward_the_compute_budget():
    """best_of and min_identity's retry rounds multiply the images a request may denoise."""
    from serving.api import GenerateRequest, Limits, RequestError, check_request

    photo = base64.b64encode((ROOT / "facediffuser/assets/astronaut.jpg").read_bytes()).decode()
    limits = Limits(compute_budget=128 * 128 * 4 * 8, max_steps=8, max_side=256)
    fields = dict(prompt="a man <|image|>", references=[photo], steps=8, width=128, height=128)
    check_request(GenerateRequest(**fields, best_of=4), limits, 128)  # 4 candidates: at the budget
    check_request(GenerateRequest(**fields, best_of=2, min_identity=0.5, max_retries=1), limits, 128)  # 2 x 2 rounds
    for extra in (dict(best_of=2, num_images=3), dict(best_of=2, min_identity=0.5, max_retries=2)):
        with pytest.raises(RequestError, match="num_images x best_of x rounds") as caught:
            check_request(GenerateRequest(**fields, **extra), limits, 128)
        assert caught.value.code == "over_compute_budget"


def test_subject_encoding_caches_per_mode_and_answers_422_without_a_face(tiny_pipe):
    """The service's reference photos go through the library's one transform (facediffuser.reference): the cache
    keeps one embedding per photo and mode; a photo without a face is a 422 naming the reference (in every mode: the
    reference checks refuse it before any crop)."""
    import io

    import torch

    from serving.api import RequestError
    from serving.references import SubjectEncoding

    encoding = SubjectEncoding(tiny_pipe)
    photo = (ROOT / "facediffuser/assets/astronaut.jpg").read_bytes()
    digest, whole = encoding.photo_embedding(photo, "reference 1")  # the default mode: whole
    _, face = encoding.photo_embedding(photo, "reference 1", "face")
    _, face_again = encoding.photo_embedding(photo, "reference 1", "face")
    assert len(digest) == 64 and not torch.equal(whole, face) and face_again is face
    assert (encoding.hits, encoding.misses) == (1, 2)
    buffer = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((200, 200, 3)) * 255).astype(np.uint8)).save(buffer, "PNG")
    for mode in ("face", "person"):
        with pytest.raises(RequestError, match="reference 2: no face found") as caught:
            encoding.photo_embedding(buffer.getvalue(), "reference 2", mode)
        assert caught.value.status == 422 and caught.value.code == "no_face_found"
    with pytest.raises(RequestError, match="reference 2: no face found"):  # checked at the door in mode whole too
        encoding.photo_embedding(buffer.getvalue(), "reference 2")
    assert ("check", digest) in encoding.cache  # the accepted photo's verdict, beside its embeddings


def test_reference_mode_and_face_detector_settings_are_checked():
    from serving.settings import ServeConfig

    assert ServeConfig(tiny=True).reference_mode == "whole"  # like the library
    assert ServeConfig(tiny=True, reference_mode="face").reference_mode == "face"
    with pytest.raises(ValueError, match="unknown reference mode 'head'"):
        ServeConfig(tiny=True, reference_mode="head")
    with pytest.raises(ValueError, match="face_detector must be one of mediapipe, mtcnn.*reference_mode: whole"):
        ServeConfig(tiny=True, face_detector="none")


def test_coalescer_runs_what_waits_as_one_call_per_key_up_to_the_limit():
    """Requests handed over while a call runs are taken together by the next call (not one call per formed batch),
    oldest first, only those sharing the oldest's key, at most `limit` per call; every caller gets its own output."""
    import asyncio

    from serving.coalescer import Coalescer

    calls: list[list[str]] = []

    async def scenario():
        release = asyncio.Event()

        async def run(items):
            calls.append(list(items))
            if len(calls) == 1:
                await release.wait()  # the first call is busy until everything else has been handed over
            return [item.upper() for item in items]

        coalescer = Coalescer(run, limit=4, key=lambda item: item[0])
        first = asyncio.create_task(coalescer(["a0"]))
        await asyncio.sleep(0)
        # Six formed batches arrive while "a0" runs, as @serve.batch would hand them over one by one.
        later = [
            asyncio.create_task(coalescer(batch)) for batch in (["a1"], ["a2", "b1"], ["a3"], ["a4"], ["a5"], ["b2"])
        ]
        await asyncio.sleep(0.01)
        release.set()
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert first == ["A0"] and later == [["A1"], ["A2", "B1"], ["A3"], ["A4"], ["A5"], ["B2"]]
    assert calls == [["a0"], ["a1", "a2", "a3", "a4"], ["b1", "b2"], ["a5"]]


def test_coalescer_fails_only_the_call_that_raised():
    import asyncio

    from serving.coalescer import Coalescer

    async def run(items):
        if "bad" in items:
            raise RuntimeError("boom")
        return items

    async def scenario():
        coalescer = Coalescer(run, limit=1)
        return await asyncio.gather(coalescer(["bad"]), coalescer(["ok"]), return_exceptions=True)

    bad, ok = asyncio.run(scenario())
    assert isinstance(bad, RuntimeError) and ok == ["ok"]


def test_internal_errors_name_an_id_and_log_the_details(caplog):
    import logging
    import pickle

    from serving.api import RequestError, internal_error

    try:
        raise ValueError("/models/secret/unet.safetensors: shape mismatch")
    except ValueError as exc:
        with caplog.at_level(logging.ERROR, logger="ray.serve"):
            error = internal_error("sampling", exc)
    assert (error.status, error.code) == (500, "internal") and len(error.error_id) == 16
    assert error.error_id in error.message and "secret" not in error.message and "ValueError" not in error.message
    logged = caplog.records[-1]
    assert error.error_id in logged.getMessage() and "secret" in logged.getMessage() and logged.exc_info
    again = RequestError(*error.as_tuple())  # crosses processes as plain data, and pickles
    assert pickle.loads(pickle.dumps(again)).error_id == error.error_id
