"""Serve pieces that need no running cluster: the deploy YAML, CLI validation, request checks, face crops."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def test_serve_yaml_is_a_valid_deploy_config_that_builds():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import ServeConfig, app_builder

    config = yaml.safe_load((ROOT / "serving/config/serve.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks
    (app,) = config["applications"]
    module, name = app["import_path"].split(":")
    assert (module, name) == ("serving.app", "app_builder")
    assert ServeConfig.from_dict(app["args"]).num_gpus == 1
    built = app_builder(app["args"])  # binds deployments; nothing is deployed
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown serve config keys: gpus"):
        app_builder({**app["args"], "gpus": 1})


def test_cli_rejects_bad_config_before_starting_ray(capsys):
    from facediffuser.cli import main

    assert main(["serve", "--tiny", "--max-batch-size", "0"]) == 2
    assert "max_batch_size must be >= 1" in capsys.readouterr().err
    assert main(["serve", "--tiny", "--min-replicas", "3", "--max-replicas", "2"]) == 2
    assert "min_replicas <= max_replicas" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse: neither --model nor --tiny
        main(["serve"])
    assert exited.value.code == 2


def test_check_request_limits_and_base64():
    from serving.api import GenerateRequest, Limits, RequestError, check_request

    photo = base64.b64encode(b"\x89PNG fake").decode()
    limits = Limits(max_steps=10, max_side=256)
    checked = check_request(GenerateRequest(prompt="a man <|image|>", references=[[photo, "data:image/png;base64," + photo]]), limits)
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


def test_subject_crop_finds_the_astronauts_face_and_refuses_noise(astronaut):
    from facediffuser.data.faces import make_detector

    from serving.api import RequestError
    from serving.subjects import subject_crop

    detector = make_detector("mediapipe")
    image = Image.fromarray(astronaut)
    crop = subject_crop(image, detector, "reference 1")
    assert 60 < crop.width < 400 and 60 < crop.height < 400  # a head-and-shoulders box, not the whole photo
    assert subject_crop(image, None, "reference 1") is image  # no detector: the whole photo
    noise = Image.fromarray((np.random.default_rng(0).random((200, 200, 3)) * 255).astype(np.uint8))
    with pytest.raises(RequestError, match="no face found") as caught:
        subject_crop(noise, detector, "reference 2")
    assert caught.value.status == 422


def test_coalescer_runs_what_waits_as_one_call_per_key_up_to_the_limit():
    """Requests handed over while a call runs are taken together by the next call (not one call per formed batch),
    oldest first, only those sharing the oldest's key, at most `limit` per call; every caller gets its own output."""
    import asyncio

    from serving.app import _Coalescer

    calls: list[list[str]] = []

    async def scenario():
        release = asyncio.Event()

        async def run(items):
            calls.append(list(items))
            if len(calls) == 1:
                await release.wait()  # the first call is busy until everything else has been handed over
            return [item.upper() for item in items]

        coalescer = _Coalescer(run, limit=4, key=lambda item: item[0])
        first = asyncio.create_task(coalescer(["a0"]))
        await asyncio.sleep(0)
        # Six formed batches arrive while "a0" runs, as @serve.batch would hand them over one by one.
        later = [asyncio.create_task(coalescer(batch)) for batch in (["a1"], ["a2", "b1"], ["a3"], ["a4"], ["a5"], ["b2"])]
        await asyncio.sleep(0.01)
        release.set()
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert first == ["A0"] and later == [["A1"], ["A2", "B1"], ["A3"], ["A4"], ["A5"], ["B2"]]
    assert calls == [["a0"], ["a1", "a2", "a3", "a4"], ["b1", "b2"], ["a5"]]


def test_coalescer_fails_only_the_call_that_raised():
    import asyncio

    from serving.app import _Coalescer

    async def run(items):
        if "bad" in items:
            raise RuntimeError("boom")
        return items

    async def scenario():
        coalescer = _Coalescer(run, limit=1)
        return await asyncio.gather(coalescer(["bad"]), coalescer(["ok"]), return_exceptions=True)

    bad, ok = asyncio.run(scenario())
    assert isinstance(bad, RuntimeError) and ok == ["ok"]
