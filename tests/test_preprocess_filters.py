"""The preprocessing filters (facediffuser/data/filters.py, dedup.py): low resolution, too many faces, a small face,
a blurry face and near duplicates across a whole run. The library functions on the astronaut photo made small,
blurred, crowded and copied; then one compact run through the real Ray Data pipeline (a near duplicate in
another block, the manifest's counts per filter, and a resumed run that still knows the hashes written before)."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter
from test_preprocess_library import tile

from facediffuser.data import dedup, filters, stages
from facediffuser.data.preprocess_config import PreprocessConfig
from facediffuser.data.work_items import new_item


def jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def resized(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))


def blurred(image: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))


def write_photos(folder, photos: dict[str, np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in photos.items():
        (folder / name).write_bytes(jpeg(image, 90))


def _config(tmp_path, **settings) -> PreprocessConfig:
    return PreprocessConfig(input=str(tmp_path), output=str(tmp_path / "out"), **settings)


def _read(tmp_path, name: str, image: np.ndarray, config: PreprocessConfig) -> dict:
    (tmp_path / name).write_bytes(jpeg(image))
    return stages.read_stage(new_item(name, str(tmp_path / name)), config)


def test_a_low_resolution_photo_is_rejected_when_decoded(tmp_path, astronaut):
    config = _config(tmp_path)
    small = _read(tmp_path, "small.jpg", resized(astronaut, 200, 150), config)
    assert (small["stage"], small["reason"]) == ("decode", "short side 150 px, under --min-side 256 px (200×150)")
    assert filters.reason_code(small["stage"], small["reason"]) == "low_resolution"
    enough = _read(tmp_path, "enough.jpg", resized(astronaut, 256, 256), config)  # the threshold itself passes
    assert enough["stage"] is None and (enough["width"], enough["height"]) == (256, 256)
    assert _read(tmp_path, "off.jpg", resized(astronaut, 200, 150), _config(tmp_path, min_side=0))["stage"] is None


def test_crowded_photos_and_small_faces_are_rejected_at_detect(tmp_path, astronaut, mediapipe_models):
    detector, _ = mediapipe_models
    faceid6m = _config(tmp_path, min_face_percent=4.0)  # FaceID-6M's face-area rule, on a config of our own

    crowded = _read(tmp_path, "four.jpg", tile(astronaut, 4), _config(tmp_path))
    crowded = stages.detect_stage(crowded, detector, _config(tmp_path))
    assert (crowded["stage"], crowded["reason"]) == ("detect", "4 faces, more than --max-subjects 3")
    assert filters.reason_code("detect", crowded["reason"]) == "too_many_faces"

    two = stages.detect_stage(_read(tmp_path, "two.jpg", tile(astronaut, 2), faceid6m), detector, faceid6m)
    assert two["stage"] == "detect" and two["reason"].startswith("face 0 at [174, 68, 278, 172] is 2.0")
    assert two["reason"].endswith("% of the image, under --min-face-percent 4%"), two["reason"]
    assert filters.reason_code("detect", two["reason"]) == "small_face"
    one = stages.detect_stage(_read(tmp_path, "one.jpg", astronaut, faceid6m), detector, faceid6m)
    assert one["stage"] is None and len(one["subjects"]) == 1  # the close-up: 4.1% of the image
    three = stages.detect_stage(
        _read(tmp_path, "three.jpg", tile(astronaut, 3), _config(tmp_path)), detector, _config(tmp_path)
    )
    assert three["stage"] is None and len(three["subjects"]) == 3  # the default keeps the demo's 3 people (1.4%)
    assert filters.face_percent([174, 68, 278, 172], 512, 512) == pytest.approx(100 * 104 * 104 / 512**2)


def test_a_blurry_face_is_rejected_and_focus_does_not_depend_on_resolution(tmp_path, astronaut, mediapipe_models):
    detector, _ = mediapipe_models
    config = _config(tmp_path)
    face = [174, 68, 278, 172]
    sharp = filters.face_focus(astronaut, face)
    half = filters.face_focus(resized(astronaut, 256, 256), [v / 2 for v in face])
    assert sharp > 3 * config.min_face_focus and 0.4 < half / sharp < 1.6  # about the same at half the resolution
    soft = blurred(astronaut)
    half_soft = filters.face_focus(resized(soft, 256, 256), [v / 2 for v in face])
    assert filters.face_focus(soft, face) < config.min_face_focus / 2 and half_soft < config.min_face_focus / 2

    rejected = stages.detect_stage(_read(tmp_path, "soft.jpg", soft, config), detector, config)
    assert rejected["subjects"]  # the face is still found; detect ends with the blur filter
    assert rejected["stage"] == "blur" and rejected["reason"].startswith("face 0 at [")
    assert "(Laplacian variance at 64 px), under --min-face-focus 100" in rejected["reason"]
    assert filters.reason_code("blur", rejected["reason"]) == "blurry"
    kept = stages.detect_stage(_read(tmp_path, "sharp.jpg", astronaut, config), detector, config)
    assert kept["stage"] is None and stages.blur_stage(kept, config)["stage"] is None
    unblurred = {**rejected, "stage": None, "reason": None}
    assert stages.blur_stage(unblurred, _config(tmp_path, min_face_focus=0))["stage"] is None  # off


def test_near_duplicates_hash_close_and_other_photos_far(astronaut):
    original = dedup.perceptual_hash(astronaut)
    copies = {
        "re-encoded": decoded(jpeg(astronaut, 40)),
        "resized": resized(astronaut, 470, 470),
        "dimmed": (astronaut * 0.8).astype(np.uint8),
        "grey": np.asarray(Image.fromarray(astronaut).convert("L").convert("RGB")),
    }
    for name, copy in copies.items():
        assert dedup.hamming(original, dedup.perceptual_hash(copy)) <= 2, name
    from skimage.data import camera, coffee, rocket

    others = [astronaut[:, ::-1], tile(astronaut, 2), coffee(), np.stack([camera()] * 3, -1), rocket()]
    hashes = [original] + [dedup.perceptual_hash(np.ascontiguousarray(o)) for o in others]
    closest = min(dedup.hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    assert closest > 3 * dedup.DEFAULT_DUPLICATE_DISTANCE  # different photos stay far from the threshold


def test_the_hash_index_finds_every_neighbour_within_the_distance():
    """Checked against a plain scan: random hashes with planted near neighbours at every distance up to d + 2."""
    rng = random.Random(0)
    for distance in (0, 3, 6, 10):
        index, kept = dedup.HashIndex(distance), {}
        for n in range(400):
            if kept and rng.random() < 0.5:
                base = rng.choice(list(kept.values()))
                value = base
                for bit in rng.sample(range(64), rng.randint(0, distance + 2)):
                    value ^= 1 << bit
            else:
                value = rng.getrandbits(64)
            expected = min(((dedup.hamming(value, v), k) for k, v in kept.items()), default=None)
            expected = (expected[1], expected[0]) if expected and expected[0] <= distance else None
            assert index.check_and_add(f"id{n:03d}", value) == expected
            if expected is None:
                kept[f"id{n:03d}"] = value
        assert len(index) == len(kept)
    index = dedup.HashIndex(6)
    assert index.check_and_add("a", 0b1011) is None and index.check_and_add("a", 0b1011) is None  # a retry: kept
    index.add("c", 0b1110)
    assert index.check_and_add("b", 0b1111) == ("a", 1)  # both 1 bit away: the smaller id
    with pytest.raises(ValueError, match="0..32"):
        dedup.HashIndex(40)


def test_one_run_of_the_stages_keeps_only_the_photo_that_passes_every_filter(tmp_path, astronaut, mediapipe_models):
    """The plain loop (`process_locally`): the same stage functions Ray runs, one index over the whole run."""
    detector, segmenter = mediapipe_models
    photos = {
        "a-good.jpg": astronaut,
        "b-small.jpg": resized(astronaut, 200, 200),
        "c-blurred.jpg": blurred(astronaut),
        "d-crowded.jpg": tile(astronaut, 4),
        "e-copy.jpg": resized(decoded(jpeg(astronaut, 60)), 500, 500),
    }
    write_photos(tmp_path / "in", photos)
    config = PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    done = stages.process_locally(stages.list_image_items(config.input), config, detector, segmenter, progress=False)
    verdicts = {
        i["id"]: (i["stage"], filters.reason_code(i["stage"], i["reason"]) if i["stage"] else None) for i in done
    }
    assert verdicts == {
        "a-good.jpg": (None, None),
        "b-small.jpg": ("decode", "low_resolution"),
        "c-blurred.jpg": ("blur", "blurry"),
        "d-crowded.jpg": ("detect", "too_many_faces"),
        "e-copy.jpg": ("dedup", "near_duplicate"),
    }
    (copy,) = [i for i in done if i["id"] == "e-copy.jpg"]
    assert copy["reason"].startswith("near duplicate of a-good.jpg (perceptual hash ")
    assert copy["reason"].endswith("of 64 bits apart, at most --duplicate-distance 6)")


def test_reason_codes_and_filter_counts():
    rejects = [
        {"stage": "decode", "reason": "empty file"},
        {"stage": "decode", "reason": "short side 1 px, under --min-side 256 px (300×1)"},
        {"stage": "detect", "reason": "no face found"},
        {"stage": "detect", "reason": "5 faces, more than --max-subjects 3"},
        {"stage": "dedup", "reason": dedup.duplicate_reason("x.jpg", 2, 6)},
        {"stage": "dedup", "reason": dedup.duplicate_reason("y.jpg", 0, 6)},
        {"stage": "link", "reason": "caption has 2 person nouns (man, woman) for 1 detected face"},
    ]
    assert filters.reason_counts(rejects) == {
        "decode": {"low_resolution": 1, "other": 1},
        "dedup": {"near_duplicate": 2},
        "detect": {"no_face": 1, "too_many_faces": 1},
        "link": {"other": 1},
    }
    summary = filters.filter_counts(rejects, PreprocessConfig(input="i", output="o").to_dict())
    assert list(summary) == ["low_resolution", "no_face", "too_many_faces", "small_face", "blurry", "near_duplicate"]
    assert summary["near_duplicate"] == {"stage": "dedup", "setting": {"--duplicate-distance": 6}, "rejected": 2}
    assert summary["small_face"] == {"stage": "detect", "setting": {"--min-face-percent": 1.0}, "rejected": 0}


def test_filter_settings_are_flags_and_are_checked(tmp_path, capsys):
    from facediffuser.cli import main

    with pytest.raises(SystemExit):
        main(["preprocess", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--min-side", "--min-face-percent", "--min-face-focus", "--duplicate-distance", "--max-subjects"):
        assert flag in help_text
    (tmp_path / "in").mkdir()
    for settings, fragment in (
        ({"duplicate_distance": 33}, "--duplicate-distance must be in -1..32"),
        ({"min_face_percent": 120.0}, "--min-face-percent in 0..100"),
        ({"min_side": -1}, "--min-side and --min-face-focus must be >= 0"),
    ):
        with pytest.raises(ValueError, match=fragment):
            PreprocessConfig(input=str(tmp_path / "in"), output=str(tmp_path / "o"), **settings).validate()


# --------------------------------------------------------------------------------- through Ray Data


@pytest.mark.slow
def test_filters_on_ray_across_blocks_with_counts_and_a_resumed_run(ray_session, tmp_path, astronaut):
    from test_preprocess_pipeline import _read_table, _shard_records

    from pipelines.preprocess import preprocess

    copy = resized(decoded(jpeg(astronaut, 60)), 500, 500)  # re-encoded and resized: a near duplicate
    photos = {
        "good.jpg": astronaut,
        "mirror.jpg": np.ascontiguousarray(astronaut[:, ::-1]),  # the same person, another photo: kept
        "small.jpg": resized(astronaut, 200, 200),
        "blurred.jpg": blurred(astronaut),
        "crowded.jpg": tile(astronaut, 4),
        "pair.jpg": tile(astronaut, 2),  # two faces of 2.1% each: under FaceID-6M's 4%
        "zz-copy.jpg": copy,  # last in id order: its own block, another worker than good.jpg's
    }
    inputs = tmp_path / "in"
    write_photos(inputs, photos)
    output = tmp_path / "out"
    # one row per block (= per shard file), two workers: good.jpg and its copy never meet in one block
    config = PreprocessConfig(
        input=str(inputs), output=str(output), min_face_percent=4.0, rows_per_shard=1, workers_per_stage=2
    )
    manifest = preprocess(config)
    records, _ = _shard_records(str(output))
    rejects = {r["id"]: r for r in _read_table(str(output / "rejects" / "rejects.parquet")).to_pylist()}
    kept = "good.jpg" if "good.jpg" in {r.id for r in records} else "zz-copy.jpg"  # the first to ask is kept
    other = ({"good.jpg", "zz-copy.jpg"} - {kept}).pop()
    assert sorted(r.id for r in records) == sorted(["mirror.jpg", kept])
    assert rejects[other]["stage"] == "dedup" and rejects[other]["reason"].startswith(f"near duplicate of {kept} (")
    expected = {"small.jpg": "low_resolution", "blurred.jpg": "blurry", "crowded.jpg": "too_many_faces"}
    expected |= {"pair.jpg": "small_face", other: "near_duplicate"}
    assert {k: filters.reason_code(r["stage"], r["reason"]) for k, r in rejects.items()} == expected
    assert {code: f["rejected"] for code, f in manifest["filters"].items()} == {
        "low_resolution": 1,
        "no_face": 0,
        "too_many_faces": 1,
        "small_face": 1,
        "blurry": 1,
        "near_duplicate": 1,
    }
    assert manifest["rejects_by_reason"]["detect"] == {"small_face": 1, "too_many_faces": 1}
    counts = manifest["counts"]
    assert (counts["written"], counts["dedup"]["rejected"], counts["blur"]["rejected"]) == (2, 1, 1)
    assert json.loads((output / "manifest.json").read_text())["filters"] == manifest["filters"]
    assert set(dedup.written_hashes(str(output / "shards"))) == {"mirror.jpg", kept}  # in the shards' metadata

    # A resumed run (what a rerun after a stop does): the new index starts from the hashes already written, so a
    # further copy of the kept photo is rejected although the photo itself is not processed again.
    write_photos(inputs, {"zzz-another-copy.jpg": resized(astronaut, 480, 480)})
    again = preprocess(config)
    assert again["resumed"] == len(photos)
    rejects = {r["id"]: r for r in _read_table(str(output / "rejects" / "rejects.parquet")).to_pylist()}
    late = rejects["zzz-another-copy.jpg"]
    assert late["stage"] == "dedup" and late["reason"].startswith(f"near duplicate of {kept} ("), late
    assert again["filters"]["near_duplicate"]["rejected"] == 2 and again["counts"]["written"] == 2
