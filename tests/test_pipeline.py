"""FaceDiffuserPipeline end to end with tiny models: prompts, references, save/load, errors (the official import:
test_official_checkpoints.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facediffuser import FaceDiffuserPipeline
from facediffuser.prompts import tokenize_with_markers

PROMPT2 = "a man <|image|> and a woman <|image|> on a beach"
FAST = dict(num_inference_steps=6, height=64, width=64)


def arrays(result):
    return [np.asarray(image) for image in result.images]


def test_markers_flag_the_noun_and_vanish_from_the_ids(tiny_pipe):
    tok = tiny_pipe.tokenizer
    marked = tokenize_with_markers(tok, PROMPT2)
    clean = tok("a man and a woman on a beach", padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    assert torch.equal(marked.input_ids, clean), "c_txt must be the prompt with the markers removed"
    flagged = [tok.convert_ids_to_tokens(int(i)) for i in marked.input_ids[marked.image_token_mask]]
    assert flagged == ["man</w>", "woman</w>"] and marked.num_subjects == 2


def test_augmented_embeds_differ_from_text_only_at_the_subject_nouns(tiny_pipe, astronaut):
    null, text, aug = tiny_pipe.encode_prompt(PROMPT2, [astronaut, astronaut[:, ::-1]])
    changed = (aug - text).abs().amax(dim=-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [2, 5]  # "man", "woman" after BOS a ...
    assert not torch.equal(null, text)


def test_same_seed_same_images_and_seeds_per_image(tiny_pipe, astronaut, hopper):
    refs = [astronaut, hopper]
    first = tiny_pipe(PROMPT2, refs, seed=11, num_images_per_prompt=2, return_masks=True, **FAST)
    again = tiny_pipe(PROMPT2, refs, seed=11, num_images_per_prompt=2, **FAST)
    other = tiny_pipe(PROMPT2, refs, seed=12, **FAST)
    assert first.seeds == [11, 12]
    assert all(np.array_equal(a, b) for a, b in zip(arrays(first), arrays(again)))
    assert not np.array_equal(arrays(first)[0], arrays(first)[1])
    # image k of a multi-image call equals the single-image call with seed + k
    assert np.abs(arrays(first)[1].astype(int) - arrays(other)[0].astype(int)).max() <= 1
    assert first.images[0].size == (64, 64)
    n_fusion = first.final_step - first.start_merge_step
    assert first.masks.shape == (n_fusion, 2, 8, 8)
    assert set(first.masks.unique().tolist()) <= {0.0, 1.0}


def test_references_change_the_result(tiny_pipe, astronaut):
    noise = np.random.default_rng(0).integers(0, 255, astronaut.shape, dtype=np.uint8)
    a = tiny_pipe("a woman <|image|> reading", [astronaut], seed=3, **FAST)
    b = tiny_pipe("a woman <|image|> reading", [noise], seed=3, check_references=False, **FAST)  # no face: unchecked
    assert not np.array_equal(arrays(a)[0], arrays(b)[0])


def test_several_photos_per_subject_average_their_embeddings(tiny_pipe, astronaut):
    flipped = astronaut[:, ::-1]
    both = tiny_pipe.encode_references([[astronaut, flipped]])
    each = tiny_pipe.encode_references([astronaut, flipped])
    assert torch.allclose(both[0], each.mean(0), atol=1e-6)


def test_save_and_load_round_trip(tiny_pipe, astronaut, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    assert list((tmp_path / "pipe" / "sdm_unet").glob("*.safetensors"))
    assert not list((tmp_path / "pipe").rglob("*.bin")), "no pickles in model directories"
    loaded = FaceDiffuserPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    a = tiny_pipe("a woman <|image|>", [astronaut], seed=5, **FAST)
    b = loaded("a woman <|image|>", [astronaut], seed=5, **FAST)
    assert np.array_equal(arrays(a)[0], arrays(b)[0])
    # separate SDM + TDM model directories (the training checkpoint layout) compose into the same pipeline
    tiny_pipe.save_model_dir(tmp_path / "sdm", "sdm")
    tiny_pipe.save_model_dir(tmp_path / "tdm", "tdm")
    assert not (tmp_path / "tdm" / "subject_encoder").exists()
    composed = FaceDiffuserPipeline.from_sdm_and_tdm(tmp_path / "sdm", tmp_path / "tdm")
    composed.set_progress_bar_config(disable=True)
    c = composed("a woman <|image|>", [astronaut], seed=5, **FAST)
    assert np.array_equal(arrays(a)[0], arrays(c)[0])


@pytest.mark.parametrize(
    "prompt, n_refs, kwargs, message",
    [
        (PROMPT2, 1, {}, "2 <\\|image\\|> marker\\(s\\) but 1 reference"),
        ("a beach at dawn", 0, {}, "no <\\|image\\|> marker"),
        (" ".join(["a man <|image|>"] * 5), 5, {}, "at most 4"),
        ("<|image|> alone", 1, {}, "must follow a subject noun"),
        ("a man <|image|>", 1, {"height": 100}, "multiples of 8"),
        ("a man <|image|>", 1, {"width": 0}, "multiples of 8"),
        ("a man <|image|>", 1, {"alpha": 0.8, "beta": 0.5}, "alpha <= beta"),
        ("a man <|image|>", 1, {"start_merge_step": 3}, "both start_merge_step and final_step"),
        ("a man <|image|>", 1, {"start_merge_step": 1, "final_step": 99}, "final_step=99 is outside"),
        ("a man <|image|>", 1, {"num_images_per_prompt": 0}, "num_images_per_prompt"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_pipe, astronaut, prompt, n_refs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_pipe(prompt, [astronaut] * n_refs, num_inference_steps=4, **kwargs)


def test_non_image_reference_names_the_problem(tiny_pipe, tmp_path):
    fake = tmp_path / "photo.jpg"
    fake.write_text("this is not a jpeg")
    with pytest.raises(ValueError, match="reference 1: .*photo.jpg: not a decodable image"):
        tiny_pipe("a man <|image|>", [str(fake)], num_inference_steps=2)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        tiny_pipe("a man <|image|>", [str(empty)], num_inference_steps=2)


def test_latent_output_decodes_to_the_pt_images(tiny_pipe, astronaut):
    options = dict(seed=4, num_inference_steps=4, height=64, width=64)
    latent = tiny_pipe("a woman <|image|> reading", [astronaut], output_type="latent", **options)
    pt = tiny_pipe("a woman <|image|> reading", [astronaut], output_type="pt", **options)
    assert latent.images.shape == (1, 4, 8, 8)
    assert torch.equal(tiny_pipe.decode_latents(latent.images), pt.images)
    with pytest.raises(ValueError, match="identity_scores need images"):
        tiny_pipe("a woman <|image|> reading", [astronaut], output_type="latent", identity_scores=True, **options)
