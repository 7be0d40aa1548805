"""`facediffuser evaluate` end to end on a real local Ray: tiny models, a tiny random CLIP and FaceNet, two
subjects × one prompt per kind, both protocols, all four methods — one run, many checks. Also: forgiving subject
folders (no noun.txt, any image name, several photos per person), a killed run continued to the same report,
and the --quick preset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import hopper_photo
from PIL import Image
from test_metrics import save_random_facenet, save_tiny_clip

from facediffuser import faults
from facediffuser.cli import main
from facediffuser.metrics.subjects import load_eval_subjects, make_tasks
from pipelines.evaluate import EvaluateConfig

METHODS = ("snf", "sdm-only", "tdm-only", "average")


def make_subjects(root: Path, astronaut: np.ndarray) -> Path:
    """Two identities for the protocol: the astronaut and Grace Hopper (two people: the reference checks refuse one
    person given as two subjects)."""
    for name, image in [("astro", astronaut), ("hopper", hopper_photo())]:
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
        ({"--subjects": "EMPTY"}, "subject x: no image"),
        ({"--subjects": "BROKEN"}, "subject x: unreadable image in"),
        ({"--subjects": "DOG"}, "subject x: class noun 'dog'"),
    ],
)
def test_evaluate_bad_input_is_one_line_before_any_work(tmp_path, astronaut, capsys, change, message):
    subjects = make_subjects(tmp_path / "subjects", astronaut)
    (tmp_path / "one" / "astro").mkdir(parents=True)
    Image.fromarray(astronaut).save(tmp_path / "one" / "astro" / "ref.jpg")
    (tmp_path / "one" / "astro" / "noun.txt").write_text("woman")
    for place in ("empty", "broken", "dog"):  # a good subject beside the bad one: the error names the bad one
        make_subjects(tmp_path / place, astronaut)
        (tmp_path / place / "x").mkdir()
    (tmp_path / "empty" / "x" / "noun.txt").write_text("man")
    (tmp_path / "broken" / "x" / "me.jpg").write_bytes(b"not a jpeg at all")
    Image.fromarray(astronaut).save(tmp_path / "dog" / "x" / "dog.png")
    (tmp_path / "dog" / "x" / "noun.txt").write_text("dog")
    places = {name.upper(): str(tmp_path / name.lower()) for name in ("ONE", "EMPTY", "BROKEN", "DOG")}
    options = {"--subjects": str(subjects), "--out": str(tmp_path / "out"), **change}
    argv = ["evaluate", "--tiny"] + [x for k, v in options.items() for x in (k, places.get(v, v))]
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("facediffuser evaluate: error:") and message in err[-1]
    assert not (tmp_path / "out").exists()


def forgiving_subjects(root: Path, astronaut: np.ndarray) -> Path:
    """astro: two photos under odd names (the astronaut and her mirror image), no noun.txt, junk beside them;
    hopper: one .png photo with a noun.txt in capitals."""
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    (root / "astro").mkdir(parents=True)
    Image.fromarray(astronaut).save(root / "astro" / "IMG 0001.JPEG")
    Image.fromarray(mirrored).save(root / "astro" / "side view.webp")
    (root / "astro" / "notes.txt").write_text("taken in 1984")
    (root / "astro" / "._IMG 0001.JPEG").write_bytes(b"macOS resource fork, not an image")
    (root / "hopper").mkdir()
    Image.fromarray(hopper_photo()).save(root / "hopper" / "portrait.png")
    (root / "hopper" / "noun.txt").write_text("Woman\n")
    (root / ".thumbnails").mkdir()  # hidden folders are not subjects
    return root


def test_subjects_need_no_noun_file_and_take_every_photo(tmp_path, astronaut):
    subjects = load_eval_subjects(forgiving_subjects(tmp_path / "subjects", astronaut))
    assert [(s.id, s.noun, s.noun_given, [Path(p).name for p in s.photos]) for s in subjects] == [
        ("astro", "person", False, ["IMG 0001.JPEG", "side view.webp"]),
        ("hopper", "woman", True, ["portrait.png"]),
    ]
    config = EvaluateConfig(subjects="", out="", tiny=True, methods=["snf"], prompts_per_kind=1, images_per_prompt=2)
    tasks = make_tasks(subjects, config)
    assert [t["task"] for t in tasks] == list(range(len(tasks))) and len(tasks) == 2 * 4 + 4
    single = {(t["subjects"], t["prompt_position"]): t for t in tasks if t["protocol"] == "single"}
    assert single["astro", 0]["prompt"] == "a person <|image|> wearing a red hat"
    assert single["astro", 1]["prompt"] == "a watercolor painting of a person <|image|>"
    assert single["hopper", 0]["prompt"] == "a woman <|image|> wearing a red hat"
    assert single["astro", 3]["seed"] == single["hopper", 3]["seed"] == 42 + 3 * 2
    # several photos of one person: one reference entry holding both (the pipeline averages their embeddings)
    assert json.loads(single["astro", 0]["references"]) == [list(subjects[0].photos)]
    assert json.loads(single["hopper", 0]["references"]) == [subjects[1].photos[0]]
    multi = [t for t in tasks if t["protocol"] == "multi"]
    assert multi[0]["prompt"].startswith("a person <|image|> and a woman <|image|>")
    assert json.loads(multi[0]["references"]) == [list(subjects[0].photos), subjects[1].photos[0]]


def test_out_of_another_run_is_refused_in_one_line(tmp_path, astronaut, capsys):
    subjects = forgiving_subjects(tmp_path / "subjects", astronaut)
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.jsonl").write_text("{}\n")
    argv = ["evaluate", "--tiny", "--quick", "--subjects", str(subjects), "--out", str(out)]
    assert main(argv) == 2
    assert "results.jsonl without run.json" in capsys.readouterr().err.strip().splitlines()[-1]
    (out / "run.json").write_text(json.dumps({"steps": 3, "seed": 42}))
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds a run with other settings" in last and "steps" in last and "seed" not in last.split("(")[1]
    assert (out / "results.jsonl").read_text() == "{}\n"  # nothing overwritten


@pytest.mark.slow
def test_evaluate_on_ray_writes_report_grids_and_distinguishes_methods(ray_session, tmp_path, astronaut):
    subjects = make_subjects(tmp_path / "subjects", astronaut)
    clip = save_tiny_clip(tmp_path / "clip")
    facenet = save_random_facenet(tmp_path / "facenet.safetensors")
    out = tmp_path / "eval"
    code = main(
        [
            "evaluate",
            "--tiny",
            "--subjects",
            str(subjects),
            "--out",
            str(out),
            "--protocol",
            "both",
            "--images-per-prompt",
            "2",
            "--prompts-per-kind",
            "1",
            "--steps",
            "4",
            "--resolution",
            "64",
            "--clip",
            str(clip),
            "--facenet-weights",
            str(facenet),
            "--num-gpus",
            "0",
            "--showcase",
            "2",
        ]
    )
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
    for method in METHODS:  # the blend guard's rate, a column per method
        summary = report["results"]["multi"][method]
        flagged = [r for r in rows if r["protocol"] == "multi" and r["method"] == method and r["blend_dlib"]]
        assert summary["blend_rate_dlib"] == pytest.approx(len(flagged) / 8, abs=1e-4)
    assert all(bool(json.loads(r["blend_warnings_dlib"])) == r["blend_dlib"] for r in rows)
    assert "blend_rate_dlib" in (out / "report.md").read_text()
    assert all(
        0 <= r["identity_facenet"] <= 1 and len(json.loads(r["similarities_dlib"])) == len(r["subjects"].split("+"))
        for r in rows
    )

    # methods start from the same seeds and differ where they should
    def pixels(protocol, method, subjects, position=0, index=0):
        (row,) = [
            r
            for r in rows
            if (r["protocol"], r["method"], r["subjects"], r["prompt_position"], r["image_index"])
            == (protocol, method, subjects, position, index)
        ]
        return row["image_seed"], np.asarray(Image.open(out / row["file"]), dtype=np.int16)

    seeds = {pixels("single", m, "astro")[0] for m in METHODS} | {pixels("single", m, "hopper")[0] for m in METHODS}
    assert seeds == {42}
    images = {m: pixels("single", m, "astro")[1] for m in METHODS}
    for a, b in [("snf", "sdm-only"), ("snf", "tdm-only"), ("snf", "average"), ("sdm-only", "tdm-only")]:
        assert np.abs(images[a] - images[b]).max() > 0, f"{a} and {b} gave the same image"
    # the TDM never sees the reference: same prompt and seed → the same image for both subjects
    assert np.array_equal(pixels("single", "tdm-only", "astro")[1], pixels("single", "tdm-only", "hopper")[1])
    # the SDM does: the other person's reference changes the image
    assert np.abs(pixels("single", "sdm-only", "astro")[1] - pixels("single", "sdm-only", "hopper")[1]).max() > 0
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


@pytest.mark.slow
def test_killed_run_continues_to_the_report_of_an_uninterrupted_one(
    ray_session, tmp_path, astronaut, capsys, monkeypatch
):
    subjects = forgiving_subjects(tmp_path / "subjects", astronaut)

    def evaluate(out: Path, *extra: str) -> int:
        return main(
            [
                "evaluate",
                "--tiny",
                "--subjects",
                str(subjects),
                "--out",
                str(out),
                "--protocol",
                "both",
                "--methods",
                "snf,tdm-only",
                "--prompts-per-kind",
                "1",
                "--images-per-prompt",
                "2",
                "--steps",
                "4",
                "--resolution",
                "64",
                "--showcase",
                "2",
                *extra,
            ]
        )

    def rows(out: Path) -> dict:
        lines = (out / "results.jsonl").read_text().splitlines()
        return {
            (r["protocol"], r["method"], r["subjects"], r["prompt_position"], r["image_index"]): r
            for r in map(json.loads, lines)
        }

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert evaluate(whole) == 0
    said = capsys.readouterr().out
    assert said.count("no noun.txt for astro: using the noun 'person'") == 1 and "hopper" not in said.split("\n")[0]
    expected = json.loads((whole / "report.json").read_text())
    assert expected["counts"] == {"tasks": 24, "images": 48} and expected["resumed_images"] == 0
    astro = next(r for r in rows(whole).values() if r["subjects"] == "astro")
    assert len(json.loads(astro["references"])[0]) == 2 and astro["prompt"].startswith("a person")

    monkeypatch.setenv(faults.ENV, "evaluate.stop_after=10")
    with pytest.raises(faults.InjectedFault, match="evaluate.stop_after=10"):
        evaluate(killed)
    monkeypatch.delenv(faults.ENV)
    assert len((killed / "results.jsonl").read_text().splitlines()) == 10 and not (killed / "report.json").exists()
    with open(killed / "results.jsonl", "a") as results:  # a line torn by the kill
        results.write('{"protocol": "single", "method": "sn')
    assert evaluate(killed) == 0
    report = json.loads((killed / "report.json").read_text())
    assert report["results"] == expected["results"] and report["counts"] == expected["counts"]
    assert 2 <= report["resumed_images"] <= 10 and report["resumed_images"] % 2 == 0  # whole tasks kept
    assert "continuing" in capsys.readouterr().out
    # the same seeds, the same pixels, the same scores as the run that was never interrupted
    before, after = rows(whole), rows(killed)
    assert before.keys() == after.keys() and len(after) == 48
    for key, row in after.items():
        assert row["image_seed"] == before[key]["image_seed"] and row["identity_dlib"] == before[key]["identity_dlib"]
        assert np.array_equal(np.asarray(Image.open(killed / row["file"])), np.asarray(Image.open(whole / row["file"])))
    assert sorted(p.name for p in killed.glob("overlay_*")) == sorted(p.name for p in whole.glob("overlay_*"))

    # a finished run continued: nothing generated, the same report again; other settings are refused
    assert evaluate(killed) == 0
    again = json.loads((killed / "report.json").read_text())
    assert again["results"] == expected["results"] and again["resumed_images"] == 48
    assert evaluate(killed, "--seed", "7") == 2 and "other settings (seed)" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_preset_runs_a_small_benchmark(ray_session, tmp_path, astronaut, tiny_pipe):
    """Also in another reference mode: the report records it, and each row's embeddings are the library's."""
    from facediffuser.reference import embedding_sha256

    subjects = forgiving_subjects(tmp_path / "subjects", astronaut)
    out = tmp_path / "quick"
    assert (
        main(
            [
                "evaluate",
                "--tiny",
                "--quick",
                "--subjects",
                str(subjects),
                "--out",
                str(out),
                "--reference-mode",
                "face",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    config = report["config"]
    assert (
        config["quick"],
        config["steps"],
        config["images_per_prompt"],
        config["prompts_per_kind"],
        config["max_pairs"],
        config["reference_mode"],
    ) == (True, 10, 1, 2, 1, "face")
    assert "reference mode face" in (out / "report.md").read_text()
    references = {s.id: s.reference for s in load_eval_subjects(str(subjects))}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for name in ("astro", "hopper"):  # astro: two photos averaged
        (row, *_) = [r for r in rows if r["subjects"] == name]
        library = embedding_sha256(tiny_pipe.encode_references([references[name]], "face")[0])
        assert json.loads(row["embedding_sha256"]) == [library]
    # (2 subjects + 1 pair) × 2 prompts × 4 kinds × 4 methods, one image each
    assert report["counts"] == {"tasks": 96, "images": 96}
    for protocol in ("single", "multi"):
        assert list(report["results"][protocol]) == list(METHODS)
        assert all(s["images"] == (16 if protocol == "single" else 8) for s in report["results"][protocol].values())
    assert len(list((out / "images").rglob("*.png"))) == 96
