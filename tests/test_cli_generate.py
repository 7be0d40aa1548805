"""`facediffuser generate` as a user runs it: the console script, its files, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facediffuser.cli import main

BIN = Path(sys.executable).parent / "facediffuser"


@pytest.mark.slow
def test_generate_writes_images_masks_and_manifest(tmp_path, astronaut):
    reference = tmp_path / "astronaut.jpg"
    Image.fromarray(astronaut).save(reference)
    out = tmp_path / "out"
    run = subprocess.run(
        [
            str(BIN),
            "generate",
            "--tiny",
            "--prompt",
            "a woman <|image|> on the moon",
            "--reference",
            str(reference),
            "--out",
            str(out),
            "--steps",
            "8",
            "--num-images",
            "2",
            "--seed",
            "4",
            "--scheduler",
            "dpm++",
            "--width",
            "96",
            "--height",
            "64",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TQDM_MININTERVAL": "0"},
    )
    assert run.returncode == 0, run.stderr
    assert "sampling" in run.stderr  # the progress bar
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seeds"] == [4, 5] and manifest["scheduler"] == "dpm++" and manifest["steps"] == 8
    assert manifest["boundaries"]["start_merge_step"] == 2 and manifest["boundaries"]["final_step"] == 5
    assert manifest["versions"]["torch"] and len(manifest["hashes"]["tiny"]) == 64
    for name in manifest["files"]["images"] + manifest["files"]["overlays"]:
        assert Image.open(out / name).size == (96, 64)
    grid = Image.open(out / manifest["files"]["fusion_masks"])
    assert grid.size[0] > grid.size[1]  # 3 fusion steps across, 2 images down
    assert len(np.unique(np.asarray(grid))) >= 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "a man <|image|> and a woman <|image|>"], "2 <|image|> marker(s) but 1 --reference"),
        (["--prompt", "a man <|image|>", "--width", "65"], "multiples of 8"),
        (["--prompt", "a man <|image|>", "--alpha", "0.9", "--beta", "0.2"], "alpha <= beta"),
        (["--prompt", "a man <|image|>", "--box", "0,0,1.5,1"], "must lie in [0, 1]"),
        (["--prompt", "a man <|image|>", "--box", "0.5,0,0.2,1"], "needs x0 < x1"),
        (["--prompt", "a man <|image|>", "--box", "0,0,1,1", "--box", "0,0,1,1"], "2 box(es) given for 1"),
        (["--prompt", "a man <|image|>", "--box", "left,0,1,1"], "--box left,0,1,1: expected x0,y0,x1,y1"),
        (["--prompt", "a man <|image|>", "--subject-scales", "-1"], "subject scale 1: must be >= 0"),
    ],
)
def test_generate_bad_input_is_one_line(tmp_path, astronaut, capsys, extra, message):
    reference = tmp_path / "a.png"
    Image.fromarray(astronaut).save(reference)
    code = main(
        ["generate", "--tiny", "--reference", str(reference), "--out", str(tmp_path / "o"), "--steps", "2", *extra]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("facediffuser generate: error:") and message in err[-1]


def test_generate_rejects_a_non_image_reference_before_loading_models(tmp_path, capsys):
    fake = tmp_path / "face.jpg"
    fake.write_bytes(b"\x00" * 64)
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path / "missing"),
            "--prompt",
            "a man <|image|>",
            "--reference",
            str(fake),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "face.jpg: not a decodable image" in capsys.readouterr().err


def test_generate_missing_model_directory(tmp_path, astronaut, capsys):
    reference = tmp_path / "a.png"
    Image.fromarray(astronaut).save(reference)
    code = main(
        [
            "generate",
            "--model",
            str(tmp_path / "missing"),
            "--prompt",
            "a man <|image|>",
            "--reference",
            str(reference),
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2 and "model directory not found" in capsys.readouterr().err


def test_unknown_scheduler_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--tiny", "--prompt", "x <|image|>", "--reference", "a", "--out", "o", "--scheduler", "heun"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_every_ray_command_takes_verbose_from_one_place():
    """--verbose is added once, in facediffuser/cli.py, to each command that starts Ray (and only to those);
    `python -m pipelines.X` goes through the same parser (module_main)."""
    from facediffuser.cli import RAY_COMMANDS, SUBCOMMANDS, build_parser

    for name in SUBCOMMANDS:
        command = next(a for a in build_parser(name)._subparsers._group_actions).choices[name]
        assert ("--verbose" in command.format_help()) == (name in RAY_COMMANDS), name


@pytest.mark.slow
def test_generate_takes_a_training_run_directory(tmp_path, astronaut, capsys):
    from facediffuser.models.tiny import tiny_pipeline

    run = tmp_path / "runs" / "try"  # what `facediffuser train --storage runs/ --name try` leaves
    pipe = tiny_pipeline()
    for which in ("sdm", "tdm"):
        pipe.save_model_dir(run / "final" / which, which)
        (run / which).mkdir()  # Ray Train's run folder: checkpoints, metrics (no model directory at its top)
    (run / "final" / "export.json").write_text(json.dumps({"sdm": {"trained": True}, "tdm": {"trained": True}}))
    reference = tmp_path / "a.png"
    Image.fromarray(astronaut).save(reference)
    code = main(
        [
            "generate",
            "--model",
            str(run),
            "--prompt",
            "a woman <|image|> on the moon",
            "--reference",
            str(reference),
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
        ]
    )
    assert code == 0
    assert f"--model {run}: a training run; using its final models in {run / 'final'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["files"]["images"]


@pytest.mark.slow
def test_generate_several_photos_per_person_boxes_and_scales(tmp_path, astronaut):
    """Two photos of one person (the astronaut and its mirror image) in one --reference, a box and a strength:
    the manifest records the photos and the layout; every fusion mask is black right of the box; the overlay has
    the box drawn."""
    first, mirrored = tmp_path / "a.jpg", tmp_path / "b.jpg"
    Image.fromarray(astronaut).save(first)
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(mirrored)
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "--tiny",
            "--prompt",
            "a woman <|image|> on the moon",
            "--reference",
            f"{first},{mirrored}",
            "--box",
            "0,0,0.5,1",
            "--subject-scales",
            "0.8",
            "--out",
            str(out),
            "--steps",
            "6",
            "--seed",
            "2",
            "--no-identity-scores",
        ]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["references"] == [[str(first.resolve()), str(mirrored.resolve())]]
    assert manifest["boxes"] == [[0.0, 0.0, 0.5, 1.0]] and manifest["subject_scales"] == [0.8]
    grid = np.asarray(Image.open(out / "fusion_masks.png"))
    steps = len(manifest["boundaries"]["fusion_steps"])
    assert steps and all((grid[:64, c * 66 + 32 : c * 66 + 64] == 0).all() for c in range(steps))
    overlay = np.asarray(Image.open(out / manifest["files"]["overlays"][0]))
    assert tuple(overlay[64, 0]) == (40, 200, 255)  # box 1's left edge, in its colour
