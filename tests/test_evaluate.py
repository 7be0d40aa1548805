"""`facediffuser evaluate` end to end on a real local Ray: tiny models, a tiny random CLIP and FaceNet, two
subjects × one prompt per kind, both protocols, all four methods — one run, many checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facediffuser.cli import main
from test_metrics import save_random_facenet, save_tiny_clip

METHODS = ("snf", "sdm-only", "tdm-only", "average")


def make_subjects(root: Path, astronaut: np.ndarray) -> Path:
    """Two identities for the protocol: the astronaut and her mirror image (different references, same noun)."""
    for name, image in [("astro", astronaut), ("mirror", np.ascontiguousarray(astronaut[:, ::-1]))]:
        (root / name).mkdir(parents=True)
        Image.fromarray(image).save(root / name / "ref.jpg")
        (root / name / "noun.txt").write_text("woman")
    return root


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--methods": "snf,magic"}, "unknown method(s) magic"),
        ({"--facenet-weights": "/nonexistent/facenet.pt"}, "--facenet-weights file not found"),
        ({"--prompts-per-kind": "11"}, "--prompts-per-kind must be in 1..10"),
        ({"--protocol": "multi", "--subjects": "ONE"}, "at least 2 subjects"),
        ({"--subjects": "NOUNLESS"}, "missing"),
    ],
)
def test_evaluate_bad_input_is_one_line_before_any_work(tmp_path, astronaut, capsys, change, message):
    subjects = make_subjects(tmp_path / "subjects", astronaut)
    (tmp_path / "one" / "astro").mkdir(parents=True)
    Image.fromarray(astronaut).save(tmp_path / "one" / "astro" / "ref.jpg")
    (tmp_path / "one" / "astro" / "noun.txt").write_text("woman")
    (tmp_path / "nounless" / "x").mkdir(parents=True)
    Image.fromarray(astronaut).save(tmp_path / "nounless" / "x" / "ref.jpg")
    places = {"ONE": str(tmp_path / "one"), "NOUNLESS": str(tmp_path / "nounless")}
    options = {"--subjects": str(subjects), "--out": str(tmp_path / "out"), **change}
    argv = ["evaluate", "--tiny"] + [x for k, v in options.items() for x in (k, places.get(v, v))]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("facediffuser evaluate: error:") and message in err[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_evaluate_on_ray_writes_report_grids_and_distinguishes_methods(ray_session, tmp_path, astronaut):
    subjects = make_subjects(tmp_path / "subjects", astronaut)
    clip = save_tiny_clip(tmp_path / "clip")
    facenet = save_random_facenet(tmp_path / "facenet.safetensors")
    out = tmp_path / "eval"
    code = main(["evaluate", "--tiny", "--subjects", str(subjects), "--out", str(out), "--protocol", "both",
                 "--images-per-prompt", "2", "--prompts-per-kind", "1", "--steps", "4", "--resolution", "64",
                 "--clip", str(clip), "--facenet-weights", str(facenet), "--num-gpus", "0", "--showcase", "2"])
    assert code == 0

    # every requested image came back and was written: (2 subjects + 1 pair) × 4 prompts × 4 methods × 2
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 * 4 * 2
    assert all((out / r["file"]).is_file() for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"tasks": 48, "images": 96} and report["missing_metrics"] == []

    # numbers in range, for each protocol and method
    for protocol in ("single", "multi"):
        assert list(report["results"][protocol]) == list(METHODS)
        for summary in report["results"][protocol].values():
            assert summary["images"] == (16 if protocol == "single" else 8)
            for key in ("identity_dlib", "identity_facenet", "face_rate_dlib", "face_rate_facenet"):
                assert 0.0 <= summary[key] <= 1.0
            assert -1.0 <= summary["prompt_clip"] <= 1.0
            assert set(summary["by_kind"]) == {"accessory", "style", "action", "context"}
    multi = report["results"]["multi"]["snf"]
    assert 0 <= multi["missing_faces_dlib"] <= 8 and 0 <= multi["duplicates_facenet"] <= 8
    assert all(0 <= r["identity_facenet"] <= 1 and len(json.loads(r["similarities_dlib"])) == len(r["subjects"].split("+"))
               for r in rows)

    # methods start from the same seeds and differ where they should
    def pixels(protocol, method, subjects, position=0, index=0):
        (row,) = [r for r in rows if (r["protocol"], r["method"], r["subjects"], r["prompt_position"],
                                       r["image_index"]) == (protocol, method, subjects, position, index)]
        return row["image_seed"], np.asarray(Image.open(out / row["file"]), dtype=np.int16)

    seeds = {pixels("single", m, "astro")[0] for m in METHODS} | {pixels("single", m, "mirror")[0] for m in METHODS}
    assert seeds == {42}
    images = {m: pixels("single", m, "astro")[1] for m in METHODS}
    for a, b in [("snf", "sdm-only"), ("snf", "tdm-only"), ("snf", "average"), ("sdm-only", "tdm-only")]:
        assert np.abs(images[a] - images[b]).max() > 0, f"{a} and {b} gave the same image"
    # the TDM never sees the reference: same prompt and seed → the same image for both subjects
    assert np.array_equal(pixels("single", "tdm-only", "astro")[1], pixels("single", "tdm-only", "mirror")[1])
    # the SDM does: the mirrored reference changes the image
    assert np.abs(pixels("single", "sdm-only", "astro")[1] - pixels("single", "sdm-only", "mirror")[1]).max() > 0
    assert pixels("single", "snf", "astro", index=1)[0] == 43  # one seed per image

    # the pictures: a grid per protocol and method, comparison grids, bar chart, mask overlays, report.md
    for protocol in ("single", "multi"):
        for method in METHODS:
            grid = Image.open(out / f"grid_{protocol}_{method}.png")
            assert grid.size == (2 * 64, 2 * (64 + 14))  # 2 showcased prompts × 2 seeds, with captions
        assert Image.open(out / f"compare_{protocol}.png").size == (4 * 64, 2 * (64 + 14))
    assert len(report["pictures"]["overlays"]) == 4 and all((out / p).is_file() for p in report["pictures"]["overlays"])
    chart = np.asarray(Image.open(out / "metrics.png").convert("L"))
    assert chart.shape[1] > chart.shape[0] and len(np.unique(chart)) > 10
    markdown = (out / "report.md").read_text()
    assert "## single-subject" in markdown and "## multi-subject" in markdown
    assert "| tdm-only |" in markdown and "![metrics](metrics.png)" in markdown
