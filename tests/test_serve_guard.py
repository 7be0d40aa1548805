"""The identity guard over real HTTP (the session's Serve app, tiny models): reference photos checked at the door
(422 naming the photo and the reason; weak photos warned in the answer and the manifest), best_of with every
candidate recorded and the chosen one regenerated from its seed, min_identity giving up and saying so."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter
from serve_fixtures import decode_png, generate, png_b64

pytestmark = pytest.mark.slow


def test_reference_checks_at_the_door(service, astronaut, hopper):
    client, reference = service["client"], service["reference"]
    thresholds = client.get("/v1/info").json()["reference_checks"]
    assert thresholds["min_face_px"] == 64 and thresholds["same_person"] == 0.93 and thresholds["dominance"] == 2.0
    photo = Image.fromarray(astronaut)
    blurred = png_b64(np.asarray(photo.filter(ImageFilter.GaussianBlur(3))))
    small = png_b64(np.asarray(photo.resize((200, 200))))
    refusals = {
        "face_blurred": ({"references": [blurred]}, "reference 1: the face is blurred"),
        "face_too_small": ({"references": [small]}, "reference 1: the face is 41 px across"),
        "same_person": (
            {
                "prompt": "a man <|image|> and a woman <|image|>",
                "references": [reference, [png_b64(hopper), reference]],
            },
            "reference 2 photo 2 shows the same person as reference 1",
        ),
    }
    for code, (fields, words) in refusals.items():
        response = generate(client, reference, **fields)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == code and response.json()["message"].startswith(words), response.text
    weak = generate(client, reference, references=[png_b64(np.asarray(photo.resize((400, 400))))])
    assert weak.status_code == 200, weak.text
    expected = ["reference 1: small face (82 px across, under 96); weak likeness"]
    assert weak.json()["warnings"] == expected and weak.json()["manifest"]["warnings"] == expected
    assert weak.json()["manifest"]["reference_checks"] == thresholds
    two = generate(
        client, reference, prompt="a man <|image|> and a woman <|image|>", references=[reference, png_b64(hopper)]
    )
    assert two.status_code == 200 and two.json()["warnings"] == [], two.text
    assert two.json()["identity_warnings"] == [[]]  # tiny models draw no faces: nothing to flag


def test_best_of_records_every_candidate_and_the_chosen_one_regenerates(service):
    client, reference = service["client"], service["reference"]
    response = generate(client, reference, best_of=3, num_images=2, seed=40, return_masks=True)
    assert response.status_code == 200, response.text
    body = response.json()
    manifest = body["manifest"]
    assert [c["seed"] for c in manifest["candidates"]] == list(range(40, 46))
    assert manifest["selection"] == {"best_of": 3, "min_identity": None, "max_retries": 2}
    chosen = [c for c in manifest["candidates"] if c["chosen"]]
    assert len(chosen) == 2 and sorted(body["seeds"]) == sorted(c["seed"] for c in chosen)
    assert body["seeds"] == manifest["seeds"] and len(body["images"]) == len(body["overlays"]) == 2
    grid = decode_png(body["fusion_masks"])
    assert grid.shape[0] == 2 * 64 + 2  # a fusion-mask row per returned image
    assert len(body["identity_warnings"]) == len(body["identity_scores"]) == 2
    alone = generate(client, reference, seed=body["seeds"][0], return_masks=True).json()
    difference = np.abs(decode_png(alone["images"][0]).astype(int) - decode_png(body["images"][0]).astype(int))
    assert difference.max() <= 1  # the recorded seed gives the candidate back
    assert np.array_equal(decode_png(alone["fusion_masks"]), grid[:64])


def test_min_identity_gives_up_after_its_retries_and_says_so(service):
    client, reference = service["client"], service["reference"]
    response = generate(client, reference, min_identity=0.5, max_retries=1, seed=50)
    assert response.status_code == 200, response.text
    body = response.json()
    candidates = body["manifest"]["candidates"]
    assert [(c["seed"], c["round"]) for c in candidates] == [(50, 0), (51, 1)]  # no face in tiny images: score 0
    assert body["warnings"][0].startswith("min_identity 0.5 not met: after 2 round(s) of 1 candidates")
    over = generate(client, reference, best_of=5)
    assert over.status_code == 422 and over.json()["error"] == "best_of_out_of_range", over.text
