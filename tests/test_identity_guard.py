"""Identity you can trust, in the library and the CLI: reference photos checked at the door, the blend guard on
constructed faces (dlib, real photos), best-of-n ranking, regeneration from a recorded seed and min_identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from facediffuser.best_of import Candidate, Selection, rank, select_best
from facediffuser.cli import main
from facediffuser.metrics.identity import IdentityScorer, shared_dlib_scorer
from facediffuser.reference_checks import ReferenceRefused, ReferenceThresholds, check_references

FAST = dict(num_inference_steps=3, height=64, width=64)
FACE_BOX = (120, 20, 330, 260)  # the astronaut's head and shoulders in her 512x512 photo


@pytest.fixture(scope="module")
def photos(astronaut, hopper):
    astro = Image.fromarray(astronaut)
    return {
        "astronaut": astro,
        "hopper": Image.fromarray(hopper),
        "mirrored": astro.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "blurred": astro.filter(ImageFilter.GaussianBlur(3)),
        "small": astro.resize((200, 200)),  # a 41 px face
        "weak": astro.resize((400, 400)),  # an 82 px face: usable, under the 96 px warning line
        "pair": side_by_side(astro.crop(FACE_BOX), astro.crop(FACE_BOX)),  # two faces of one size
        "noise": Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)),
    }


def side_by_side(*images: Image.Image) -> Image.Image:
    height = max(i.height for i in images)
    canvas = Image.new("RGB", (sum(i.width for i in images), height), (128, 128, 128))
    left = 0
    for image in images:
        canvas.paste(image, (left, 0))
        left += image.width
    return canvas


def refused(subjects, **thresholds) -> ReferenceRefused:
    with pytest.raises(ReferenceRefused) as caught:
        check_references(subjects, ReferenceThresholds(**thresholds))
    return caught.value


# ------------------------------------------------------------------------------------------ reference checks


def test_two_clear_photos_of_two_people_pass_without_warnings(photos):
    checks = check_references([[photos["astronaut"], photos["mirrored"]], photos["hopper"]])
    assert [[c.faces for c in subject] for subject in checks] == [[1, 1], [1]]
    assert all(c.warnings == [] and c.descriptor is not None for subject in checks for c in subject)
    assert checks[0][0].face_px > 96 and checks[0][0].sharpness > 100


@pytest.mark.parametrize(
    "name, code, words",
    [
        ("blurred", "face_blurred", "reference 1: the face is blurred"),
        ("small", "face_too_small", "reference 1: the face is 41 px across, under the 64 px minimum"),
        ("pair", "several_faces", "reference 1: 2 faces of similar size"),
        ("noise", "no_face_found", "reference 1: no face found"),
    ],
)
def test_a_photo_that_cannot_serve_is_refused_naming_it(photos, name, code, words):
    error = refused([photos[name]])
    assert error.code == code and str(error).startswith(words)


def test_thresholds_are_configurable(photos):
    assert check_references([photos["small"]], ReferenceThresholds(min_face_px=32, weak_face_px=32))
    assert check_references([photos["blurred"]], ReferenceThresholds(min_sharpness=1, weak_sharpness=1))
    with pytest.raises(ValueError, match="warning threshold"):
        ReferenceThresholds(min_face_px=100)  # above its warning line (96)


def test_weak_photos_pass_with_warnings(photos, astronaut):
    ((weak,),) = check_references([photos["weak"]])
    assert weak.warnings == ["reference 1: small face (82 px across, under 96); weak likeness"]
    ((soft,),) = check_references([photos["astronaut"].filter(ImageFilter.GaussianBlur(2))])
    assert len(soft.warnings) == 1 and soft.warnings[0].startswith("reference 1: soft face (sharpness 5")
    # a second, much smaller face beside the person: the largest is taken, and the photo says so
    crowd = np.full((512, 812, 3), 128, np.uint8)
    crowd[:, :512] = astronaut
    crowd[:175, 512:662] = np.asarray(photos["hopper"].resize((150, 175)))  # her face: 58 px across
    ((check,),) = check_references([Image.fromarray(crowd)])
    assert check.faces == 2 and check.face_box[2] < 512
    assert "2 faces; the largest" in check.warnings[0]


def test_one_person_given_for_two_subjects_is_refused(photos):
    error = refused([photos["astronaut"], photos["mirrored"]])
    assert error.code == "same_person"
    assert str(error).startswith("reference 2 shows the same person as reference 1")
    # several photos of one person for one subject are what the option is for
    error = refused([[photos["hopper"], photos["astronaut"]], [photos["hopper"]]])
    assert "reference 2 shows the same person as reference 1 photo 1" in str(error)


def test_the_pipeline_refuses_before_sampling_and_reports_warnings(tiny_pipe, photos):
    steps = []
    with pytest.raises(ReferenceRefused, match="reference 2 shows the same person"):
        tiny_pipe(
            "a man <|image|> and a woman <|image|>",
            [photos["astronaut"], photos["mirrored"]],
            callback=lambda i, n: steps.append(i),
            **FAST,
        )
    assert steps == []
    result = tiny_pipe("a woman <|image|>", [photos["weak"]], seed=1, **FAST)
    assert result.warnings == ["reference 1: small face (82 px across, under 96); weak likeness"]


# ------------------------------------------------------------------------------------------ the blend guard


def test_the_same_face_pasted_for_two_subjects_is_flagged(photos):
    scorer = shared_dlib_scorer()
    references = [scorer.reference(photos["astronaut"]), scorer.reference(photos["hopper"])]
    astro, hopper = photos["astronaut"].crop(FACE_BOX), photos["hopper"].resize((256, 300))
    copied = scorer.score(side_by_side(astro, astro.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), references)
    assert copied.num_faces == 2 and any(w.startswith("copied face: subject 1") for w in copied.warnings)
    two_people = scorer.score(side_by_side(astro, hopper), references)
    assert two_people.num_faces == 2 and two_people.warnings == []
    assert min(two_people.similarities) > 0.9  # each subject found on its own face
    one_face = scorer.score(astro, references)
    assert one_face.warnings == ["merged subjects: subjects 1 and 2 all match face 1 best"]


# ------------------------------------------------------------------------------------------ best of n


class ColourEmbedder:
    """A stand-in "face" descriptor that tiny random models can vary: the image's mean colour and contrast (their
    images hold no faces for dlib). Ranking and retries only need a score that depends on the image."""

    name = "colour"

    def embed_faces(self, image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
        vector = np.array([*pixels.mean(axis=(0, 1)), pixels.std()]) - 100
        return (vector / np.linalg.norm(vector))[None].astype(np.float32)


def test_ranking_puts_flagged_candidates_last_then_the_weakest_subject_decides():
    candidates = [
        Candidate(1, 0, [0.9, 0.2], 0.2),
        Candidate(2, 0, [0.6, 0.7], 0.6),
        Candidate(3, 0, [0.95, 0.95], 0.95, ["copied face: subject 1 is the closest match of faces 1, 2"]),
        Candidate(4, 0, [0.6, 0.6], 0.6),
    ]
    assert [c.seed for c in rank(candidates)] == [2, 4, 1, 3]


def test_best_of_returns_the_best_and_records_every_candidate(tiny_pipe, astronaut):
    scorer = IdentityScorer(ColourEmbedder())
    result = tiny_pipe(
        "a woman <|image|>",
        [astronaut],
        seed=10,
        num_images_per_prompt=2,
        best_of=3,
        identity_scores=scorer,
        return_masks=True,
        **FAST,
    )
    assert [c["seed"] for c in result.candidates] == list(range(10, 16))
    chosen = sorted((c for c in result.candidates if c["chosen"]), key=lambda c: -c["score"])
    assert result.seeds == [c["seed"] for c in chosen]
    assert min(c["score"] for c in chosen) >= max(c["score"] for c in result.candidates if not c["chosen"])
    assert len(result.images) == 2 and result.masks.shape[1] == 2
    # any candidate regenerates from its recorded seed alone
    for candidate in (chosen[0], next(c for c in result.candidates if not c["chosen"])):
        again = tiny_pipe("a woman <|image|>", [astronaut], seed=candidate["seed"], identity_scores=scorer, **FAST)
        assert again.identity_scores[0][0] == pytest.approx(candidate["similarities"][0], abs=2e-3)
        if candidate["chosen"]:
            difference = np.abs(np.asarray(again.images[0], int) - np.asarray(result.images[0], int))
            assert difference.max() <= 1  # batched vs alone: the same image, up to rounding


def test_min_identity_resamples_with_new_seeds_then_gives_up_and_says_so(tiny_pipe, astronaut):
    scorer = IdentityScorer(ColourEmbedder())
    met = tiny_pipe("a woman <|image|>", [astronaut], seed=20, min_identity=0.0, identity_scores=scorer, **FAST)
    assert len(met.candidates) == 1 and met.warnings == []
    missed = tiny_pipe(
        "a woman <|image|>",
        [astronaut],
        seed=20,
        best_of=2,
        min_identity=0.999,
        max_retries=2,
        identity_scores=scorer,
        **FAST,
    )
    assert [(c["seed"], c["round"]) for c in missed.candidates] == [
        (20, 0),
        (21, 0),
        (22, 1),
        (23, 1),
        (24, 2),
        (25, 2),
    ]
    assert missed.warnings[0].startswith("min_identity 0.999 not met: after 3 round(s) of 2 candidates")


def test_min_identity_stops_once_enough_candidates_clear_it():
    rounds = []

    def sample(seed, n):
        rounds.append(seed)
        scores = [0.1] * n if len(rounds) == 1 else [0.8] * n
        return list(range(seed, seed + n)), [Candidate(seed + k, 0, [s], s) for k, s in enumerate(scores)]

    images, chosen, pool, warning = select_best(sample, 2, 100, Selection(best_of=2, min_identity=0.5))
    assert rounds == [100, 104] and warning is None and images == [104, 105]
    assert [c.round for c in pool] == [0] * 4 + [1] * 4


@pytest.mark.parametrize("options", [dict(best_of=9), dict(min_identity=1.5), dict(max_retries=6)])
def test_selection_bounds(options):
    with pytest.raises(ValueError):
        Selection(**options)


# ------------------------------------------------------------------------------------------ the CLI


def test_cli_refuses_a_bad_reference_in_one_line_and_records_the_guard(tmp_path, photos, capsys):
    for name in ("astronaut", "mirrored", "hopper", "blurred"):
        photos[name].save(tmp_path / f"{name}.png")
    base = ["generate", "--tiny", "--steps", "2", "--out", str(tmp_path / "out")]
    code = main([*base, "--prompt", "a woman <|image|>", "--reference", str(tmp_path / "blurred.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"--reference {tmp_path / 'blurred.png'}: the face is blurred" in err[0]
    two = ["--prompt", "a woman <|image|> and a woman <|image|>", "--reference", str(tmp_path / "astronaut.png")]
    code = main([*base, *two, "--reference", str(tmp_path / "mirrored.png")])
    assert code == 2 and "shows the same person as --reference" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    code = main([*base, *two, "--reference", str(tmp_path / "hopper.png"), "--best-of", "2", "--seed", "4"])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert code == 0 and manifest["selection"] == {"best_of": 2, "min_identity": None, "max_retries": 2}
    assert [c["seed"] for c in manifest["candidates"]] == [4, 5] and manifest["reference_checks"]["min_face_px"] == 64
    assert manifest["seeds"] == [c["seed"] for c in manifest["candidates"] if c["chosen"]]
    assert len(manifest["identity_warnings"]) == 1
