"""Evaluation metrics on real faces (the astronaut photo), greedy matching, CLIP scoring, the protocol files,
and identity scores from the pipeline and the generate CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facediffuser.metrics.identity import (
    DlibEmbedder,
    FacenetEmbedder,
    IdentityScorer,
    greedy_match,
    has_duplicate,
    identity_score,
    identity_similarities,
    load_state_dict,
    subject_similarities,
)
from facediffuser.metrics.protocol import KINDS, build_tasks, load_prompts, method_arguments
from facediffuser.metrics.subjects import load_eval_subjects
from facediffuser.prompts import IMAGE_TOKEN, count_markers

# ------------------------------------------------------------------ test models (also used by test_evaluate)


def save_random_facenet(path: Path) -> Path:
    """InceptionResnetV1 with random weights (real VGGFace2 weights cannot be downloaded here)."""
    from facenet_pytorch import InceptionResnetV1
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in InceptionResnetV1().state_dict().items()}, str(path))
    return path


def save_tiny_clip(folder: Path) -> Path:
    """A small random transformers CLIPModel + the real CLIP BPE tokenizer, saved as a model directory."""
    from transformers import CLIPConfig, CLIPModel

    from facediffuser.models.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photo(astronaut) -> Image.Image:
    return Image.fromarray(astronaut)


@pytest.fixture(scope="module")
def noise() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def dlib_scorer():
    return IdentityScorer(DlibEmbedder())


@pytest.fixture(scope="module")
def facenet_scorer(tmp_path_factory):
    return IdentityScorer(
        FacenetEmbedder(save_random_facenet(tmp_path_factory.mktemp("facenet") / "facenet.safetensors"))
    )


# ------------------------------------------------------------------------------------------ real faces


def test_dlib_identity_on_the_astronaut(dlib_scorer, photo, noise):
    reference = dlib_scorer.reference(photo)
    assert reference is not None and reference.shape == (128,) and abs(np.linalg.norm(reference) - 1) < 1e-5
    itself = dlib_scorer.score(photo, [reference])
    flipped = dlib_scorer.score(photo.transpose(Image.FLIP_LEFT_RIGHT), [reference])
    blank = dlib_scorer.score(noise, [reference])
    assert itself.score > 0.999 and itself.num_faces >= 1
    assert flipped.score > 0.9  # the same person, mirrored
    assert blank.num_faces == 0 and blank.similarities == [None] and blank.score == 0.0 and blank.missing_faces == 1
    assert dlib_scorer.reference(noise) is None  # a reference without a face has no embedding


def test_facenet_identity_mtcnn_finds_the_astronaut(facenet_scorer, photo, noise):
    faces = facenet_scorer.embedder.embed_faces(photo)
    assert faces.shape[1] == 512 and len(faces) >= 1  # MTCNN with its bundled weights finds her face
    assert np.allclose(np.linalg.norm(faces, axis=1), 1, atol=1e-5)
    reference = facenet_scorer.reference(photo)
    assert facenet_scorer.score(photo, [reference]).score > 0.999
    assert facenet_scorer.score(photo.transpose(Image.FLIP_LEFT_RIGHT), [reference]).score > 0.5
    blank = facenet_scorer.score(noise, [reference])
    assert blank.num_faces == 0 and blank.score == 0.0


def test_facenet_weights_errors_and_torch_file(tmp_path):
    from facenet_pytorch import InceptionResnetV1

    with pytest.raises(FileNotFoundError, match="weights file not found"):
        FacenetEmbedder(tmp_path / "missing.pt")
    pt = tmp_path / "facenet.pt"
    torch.save({**InceptionResnetV1().state_dict(), "logits.weight": torch.zeros(3, 512)}, pt)
    assert "logits.weight" in load_state_dict(pt)  # read with weights_only=True
    FacenetEmbedder(pt)  # the classifier head of the VGGFace2 file is dropped
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not InceptionResnetV1 weights"):
        FacenetEmbedder(tmp_path / "other.pt")


def test_identity_similarities_two_subjects_side_by_side(photo):
    """The astronaut twice in one picture: both subjects get a face; a noise image gets None for both."""
    pair = Image.new("RGB", (1024, 512))
    pair.paste(photo, (0, 0))
    pair.paste(photo.transpose(Image.FLIP_LEFT_RIGHT), (512, 0))
    scores = identity_similarities([pair, Image.new("RGB", (128, 128), "gray")], [photo, [photo, photo]])
    assert len(scores) == 2 and all(len(s) == 2 for s in scores)
    assert all(s is not None and s > 0.9 for s in scores[0])
    assert scores[1] == [None, None]


# ------------------------------------------------------------------------------------------ matching


def test_greedy_matching_on_constructed_similarities():
    # greedy takes 0.9 first (face 0 ↔ ref 0), leaving face 1 ↔ ref 1 at 0.1 (not the better 0.8 + 0.85)
    assert greedy_match(np.array([[0.9, 0.8], [0.85, 0.1]])) == [0, 1]
    # three faces, two references: the best-matching faces are chosen; face 0 is left over
    assert greedy_match(np.array([[0.2, 0.1], [0.7, 0.3], [0.6, 0.65]])) == [1, 2]
    # one face, two references: the second reference gets nothing
    assert greedy_match(np.array([[0.3, 0.5]])) == [None, 0]
    assert greedy_match(np.zeros((0, 2))) == [None, None]


def test_subject_similarities_scores_min_with_missing_and_negative_as_zero():
    e = np.eye(4, dtype=np.float32)
    faces = np.stack([e[0], (e[1] + e[2]) / np.sqrt(2)])
    sims = subject_similarities(faces, [e[1], e[0]])
    assert sims == pytest.approx([1 / np.sqrt(2), 1.0])
    assert identity_score(sims) == pytest.approx(1 / np.sqrt(2))  # the minimum over the pair
    assert identity_score([0.8, None]) == 0.0  # a subject without a face scores 0
    assert identity_score([-0.4]) == 0.0  # negatives are clamped
    # single subject: the FIRST face is used (FastComposer), even when a later one matches better
    assert subject_similarities(faces, [e[1]]) == [0.0]  # face 1 would have scored 0.71
    assert subject_similarities(faces[:0], [e[0]]) == [None]
    assert subject_similarities(faces, [None, e[0]]) == [None, 1.0]  # a reference without a face


def test_duplicates_are_two_faces_resembling_one_reference():
    e = np.eye(3, dtype=np.float32)
    assert has_duplicate(np.stack([e[0], e[0] * 0.9 + e[2] * 0.1]), [e[0], e[1]])
    assert not has_duplicate(np.stack([e[0], e[1]]), [e[0], e[1]])
    assert not has_duplicate(np.stack([e[0], e[0]]), [e[0]])  # one subject: nothing to duplicate


# ------------------------------------------------------------------------------------------ CLIP


def test_clip_prompt_scorer_with_a_tiny_random_clip(tmp_path, photo, noise):
    from facediffuser.metrics.prompt import ClipPromptScorer, clip_pixels

    scorer = ClipPromptScorer(str(save_tiny_clip(tmp_path / "clip")))
    with_marker = scorer.score([photo, noise], [f"a woman {IMAGE_TOKEN} in space", "a woman in space"])
    plain = scorer.score([photo, noise], ["a woman in space", f"a woman {IMAGE_TOKEN} in space"])
    assert all(-1 <= s <= 1 for s in with_marker)
    assert with_marker == pytest.approx(plain, abs=1e-6)  # markers are removed before the text encoder
    assert with_marker[0] != pytest.approx(with_marker[1], abs=1e-6)  # the image matters
    assert clip_pixels(Image.new("RGB", (300, 100)), 32).shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="cannot load a CLIP model"):
        ClipPromptScorer(str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------------------ protocol


def test_prompt_files_follow_the_protocol():
    single, multi = load_prompts("single"), load_prompts("multi")
    assert tuple(single) == KINDS and tuple(multi) == KINDS
    for kind in KINDS:
        for noun in ("man", "woman"):
            prompts = single[kind][noun]
            assert len(prompts) == 10 and len(set(prompts)) == 10
            assert all(count_markers(p) == 1 and f"{noun} {IMAGE_TOKEN}" in p for p in prompts)
        assert len(multi[kind]) == 10
        assert all(count_markers(t.format(a="man", b="woman")) == 2 for t in multi[kind])


def _subject(root: Path, name: str, noun: str, image: np.ndarray) -> None:
    (root / name).mkdir(parents=True)
    Image.fromarray(image).save(root / name / "ref.jpg")
    (root / name / "noun.txt").write_text(noun + "\n")


def test_subjects_tasks_seeds_and_methods(tmp_path, astronaut):
    _subject(tmp_path, "b", "man", astronaut)
    _subject(tmp_path, "a", "woman", astronaut)
    subjects = load_eval_subjects(tmp_path)
    assert [(s.id, s.noun) for s in subjects] == [("a", "woman"), ("b", "man")]
    tasks = build_tasks(subjects, ["single", "multi"], ["snf", "tdm-only"], images_per_prompt=4, seed=42)
    single = [t for t in tasks if t["protocol"] == "single"]
    multi = [t for t in tasks if t["protocol"] == "multi"]
    assert len(single) == 2 * 40 * 2 and len(multi) == 1 * 40 * 2
    assert multi[0]["prompt"].startswith(f"a woman {IMAGE_TOKEN} and a man {IMAGE_TOKEN}")
    # the same prompt position has the same seed for every subject and method
    assert {t["seed"] for t in single if t["prompt_position"] == 3} == {42 + 3 * 4}
    assert method_arguments("sdm-only", 50) == {"start_merge_step": -1, "final_step": -1}
    assert method_arguments("tdm-only", 50) == {"start_merge_step": 49, "final_step": 49}
    assert method_arguments("average", 50)["fusion"].mode == "average"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "noun.txt").write_text("man")
    with pytest.raises(ValueError, match="subject c: no image"):
        load_eval_subjects(tmp_path)
    Image.fromarray(astronaut).save(tmp_path / "c" / "photo.png")
    (tmp_path / "c" / "noun.txt").write_text("dog")
    with pytest.raises(ValueError, match="subject c: class noun 'dog'"):
        load_eval_subjects(tmp_path)


# ------------------------------------------------------------------------------------------ in the product


def test_pipeline_returns_identity_scores_only_when_asked(tiny_pipe, astronaut, hopper):
    references = [Image.fromarray(astronaut), Image.fromarray(hopper)]
    common = dict(num_images_per_prompt=2, seed=1, num_inference_steps=2, height=64, width=64)
    plain = tiny_pipe(f"a man {IMAGE_TOKEN} and a woman {IMAGE_TOKEN}", references, **common)
    assert plain.identity_scores is None
    scored = tiny_pipe(f"a man {IMAGE_TOKEN} and a woman {IMAGE_TOKEN}", references, identity_scores=True, **common)
    assert len(scored.identity_scores) == 2 and all(len(s) == 2 for s in scored.identity_scores)
    # tiny random models draw no faces: every subject is reported missing rather than scored
    assert scored.identity_scores == [[None, None], [None, None]]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain.images, scored.images))


def test_generate_writes_identity_scores_to_the_manifest(tmp_path, astronaut):
    from facediffuser.cli import main

    reference = tmp_path / "astronaut.jpg"
    Image.fromarray(astronaut).save(reference)
    code = main(
        [
            "generate",
            "--tiny",
            "--prompt",
            f"a woman {IMAGE_TOKEN} on the moon",
            "--reference",
            str(reference),
            "--out",
            str(tmp_path / "out"),
            "--steps",
            "2",
            "--num-images",
            "2",
            "--width",
            "64",
            "--height",
            "64",
        ]
    )
    assert code == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["identity_scores"] == [[None], [None]]
