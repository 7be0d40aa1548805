"""Layout boxes and per-subject scales (issue: where each person goes, how strongly): named options that leave
the official sampler exactly as it is when unused."""

from __future__ import annotations

import pytest
import torch

from facediffuser.layout import SubjectRegions, box_grid, boxed_attention, localization_layers
from facediffuser.prompts import tokenize_with_markers

PROMPT2 = "a man <|image|> and a woman <|image|> on a beach"
FAST = dict(num_inference_steps=6, height=64, width=64, seed=5, output_type="pt")
BOXES = [[0.0, 0.0, 0.5, 1.0], [0.5, 0.25, 1.0, 0.75]]


@pytest.fixture(scope="module")
def refs(astronaut, hopper):
    return [astronaut, hopper]


def test_no_boxes_and_no_scales_are_todays_latents_exactly(tiny_pipe, refs):
    plain = tiny_pipe(PROMPT2, refs, return_masks=True, **FAST)
    named_off = tiny_pipe(PROMPT2, refs, return_masks=True, boxes=None, subject_scales=None, **FAST)
    full = tiny_pipe(PROMPT2, refs, return_masks=True, subject_scales=[1.0, 1.0], **FAST)
    for other in (named_off, full):
        assert torch.equal(plain.images, other.images) and torch.equal(plain.masks, other.masks)
    # the UNet's own attention processors are back after a boxed call
    before = {k: type(v) for k, v in tiny_pipe.sdm_unet.attn_processors.items()}
    tiny_pipe(PROMPT2, refs, boxes=BOXES, **FAST)
    assert {k: type(v) for k, v in tiny_pipe.sdm_unet.attn_processors.items()} == before


def test_boxes_keep_every_fusion_mask_inside_them_and_change_the_result(tiny_pipe, refs):
    plain = tiny_pipe(PROMPT2, refs, return_masks=True, num_images_per_prompt=2, **FAST)
    boxed = tiny_pipe(PROMPT2, refs, return_masks=True, num_images_per_prompt=2, boxes=BOXES, **FAST)
    height, width = boxed.masks.shape[-2:]
    union = box_grid(BOXES[0], height, width) | box_grid(BOXES[1], height, width)
    assert not union.all() and union.any()
    assert boxed.masks.shape[0] > 0 and (boxed.masks[..., ~union] == 0).all()  # every step, every image
    assert plain.masks[..., ~union].any(), "without boxes the SDM wins pixels outside them (else the test is moot)"
    assert not torch.equal(plain.images, boxed.images)


def test_a_subjects_attention_weights_are_zero_outside_its_box(tiny_pipe):
    tokens = tokenize_with_markers(tiny_pipe.tokenizer, PROMPT2)
    positions = tokens.image_token_mask.nonzero().flatten().tolist()
    regions = SubjectRegions(tokens=[positions], boxes=[[tuple(b) for b in BOXES]], latent_size=(8, 8))
    unet = tiny_pipe.sdm_unet
    layers = localization_layers(unet)
    assert len(layers) == 11  # FastComposer's 11 localization maps: down 1-2, mid, up 1-2
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), boxed_attention(unet, regions, record=True) as boxed:
        unet(torch.randn(2, 4, 8, 8), 500, encoder_hidden_states=hidden)
    for name, processor in boxed.items():
        probabilities = processor.probabilities  # [batch·heads, h·w, 77]
        grid = regions.grid_for(probabilities.shape[1])
        for token, box in zip(positions, BOXES):
            outside = ~box_grid(box, *grid).reshape(-1)
            assert (probabilities[:, outside, token] == 0).all(), name
            assert (probabilities[:, ~outside, token] > 0).all(), name
        assert torch.allclose(probabilities.sum(-1), torch.ones(()), atol=1e-5)


def test_scale_zero_is_the_prompt_without_the_subject_fused(tiny_pipe, refs):
    null, text, augmented = tiny_pipe.encode_prompt(PROMPT2, refs, subject_scales=[0.0, 1.0])
    _, _, full = tiny_pipe.encode_prompt(PROMPT2, refs)
    assert torch.equal(augmented[:, 2], text[:, 2])  # "man": the noun alone
    assert torch.equal(augmented[:, 5], full[:, 5])  # "woman": fused as today
    assert not torch.equal(full[:, 2], text[:, 2])
    _, _, half = tiny_pipe.encode_prompt(PROMPT2, refs, subject_scales=[0.5, 0.5])
    assert torch.allclose(half[:, 2], (text[:, 2] + full[:, 2]) / 2, atol=1e-6)
    # a call with every scale at 0 samples exactly as if the augmented prompt were the text prompt
    zero = tiny_pipe(PROMPT2, refs, subject_scales=[0.0, 0.0], **FAST)
    _, text_only, zeroed = tiny_pipe.encode_prompt(PROMPT2, refs, subject_scales=[0.0, 0.0])
    assert torch.equal(zeroed, text_only)
    assert not torch.equal(zero.images, tiny_pipe(PROMPT2, refs, **FAST).images)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"boxes": [[0, 0, 0.5, 1.2], [0.5, 0, 1, 1]]}, "must lie in [0, 1]"),
        ({"boxes": [[0.5, 0, 0.5, 1], [0.5, 0, 1, 1]]}, "needs x0 < x1"),
        ({"boxes": [[0, 0, 1, 1]]}, "1 box(es) given for 2"),
        ({"boxes": [[0, 0, 1], [0, 0, 1, 1]]}, "box 1: expected [x0, y0, x1, y1]"),
        ({"subject_scales": [1.0, -0.1]}, "subject scale 2: must be >= 0"),
        ({"subject_scales": [1.0]}, "1 subject scale(s) given for 2"),
    ],
)
def test_bad_boxes_and_scales_are_clear_errors(tiny_pipe, refs, options, message):
    with pytest.raises(ValueError) as error:
        tiny_pipe(PROMPT2, refs, **options, **FAST)
    assert message in str(error.value)


def test_overlays_draw_each_subjects_box_in_its_colour():
    from PIL import Image

    from facediffuser.visualize import BOX_COLOURS, mask_overlay

    overlay = mask_overlay(Image.new("RGB", (128, 128)), torch.zeros(8, 8), boxes=BOXES)
    pixels = overlay.load()
    assert pixels[0, 64] == BOX_COLOURS[0] and pixels[127, 64] == BOX_COLOURS[1]  # left edges of box 1 and 2's right
    assert pixels[100, 32] == BOX_COLOURS[1]  # box 2's top edge (y0 = 0.25)
    assert pixels[100, 64] == (0, 0, 0) and pixels[30, 64] == (0, 0, 0)  # insides untouched
    assert mask_overlay(Image.new("RGB", (128, 128)), torch.zeros(8, 8)).getextrema() == ((0, 0),) * 3
