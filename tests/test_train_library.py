"""Training library without Ray: losses against hand-computed values, data rows → tensors, a short plain
torch run that lowers the loss, and the safetensors checkpoint round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facediffuser.data.schema import to_table
from facediffuser.training.checkpoint import load_components, load_training_state, save_model_dir, save_training_state
from facediffuser.training.data import DataConfig, ExampleBuilder, transform_target
from facediffuser.training.losses import (
    CrossAttentionCapture,
    denoising_loss,
    localization_loss,
    localization_loss_one_map,
    union_mask,
)
from facediffuser.training.sample_rows import sample_records
from facediffuser.training.step import OptimConfig, TrainingModel, TrainStep, make_optimizer


def test_masked_denoising_loss_hand_computed():
    prediction = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]]]])
    assert denoising_loss(prediction, target).item() == pytest.approx((1 + 4 + 4 + 9) / 4)
    # subject 0 covers half of the top-left 2×2 block of a 4×4 mask → 0.5 there after the bilinear 4→2 resize;
    # subject 1 (bottom-right block) is not valid and must not count.
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, 0, :2] = 1
    masks[0, 1, 2:, 2:] = 1
    valid = torch.tensor([[True, False]])
    mask = union_mask(masks, valid, (2, 2))
    assert mask.tolist() == [[[[0.5, 0.0], [0.0, 0.0]]]]
    # only the top-left element survives, scaled by 0.5, and the mean is over all 4 elements (no renormalisation)
    assert denoising_loss(prediction, target, mask).item() == pytest.approx((0.5 * 1.0) ** 2 / 4)


def test_localization_loss_hand_computed():
    # B=2 samples, 2 heads, 2×2 map, 3 tokens. Sample 0: subject 0 at token 1 with mask = top-left pixel;
    # subject 1 is padding (not valid). Sample 1 has no subjects at all.
    attention = torch.zeros(4, 4, 3)
    attention[0, :, 1] = torch.tensor([0.4, 0.1, 0.2, 0.3])  # sample 0, head 0
    attention[1, :, 1] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # sample 0, head 1
    attention[2:, :, 1] = 0.9  # sample 1: would change the result if it counted
    attention[0, :, 2] = 1.0  # token 2 belongs to the invalid subject
    masks = torch.zeros(2, 2, 2, 2)
    masks[0, 0, 0, 0] = 1
    masks[0, 1] = 1
    token_index = torch.tensor([[1, 2], [0, 0]])
    valid = torch.tensor([[True, False], [False, False]])
    # head 0: outside (0.1+0.2+0.3)/3 − inside 0.4/1 = −0.2; head 1: 0.1 − 0.7 = −0.6; mean −0.4
    one = localization_loss_one_map(attention, masks, token_index, valid)
    assert one.item() == pytest.approx(-0.4, abs=1e-4)
    # a second layer at the same size with uniform attention contributes 0; the loss is the mean over layers
    uniform = torch.full((4, 4, 3), 0.25)
    assert localization_loss([attention, uniform], masks, token_index, valid).item() == pytest.approx(-0.2, abs=1e-4)
    assert localization_loss([attention], masks, token_index, torch.zeros_like(valid)).item() == 0.0


def test_capture_hooks_the_eleven_middle_cross_attention_layers():
    from facediffuser.models.tiny import tiny_unet

    unet = tiny_unet()
    reference = tiny_unet()
    reference.load_state_dict(unet.state_dict())
    capture = CrossAttentionCapture(unet)
    assert capture.num_layers == 11
    sample, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        out = unet(sample, t, text).sample
        expected = reference(sample, t, text).sample
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)  # same numerics as the default processor
    sizes = sorted({m.shape[1] for m in capture.maps})
    assert len(capture.maps) == 11 and sizes == [4, 16, 64]  # 8/4/2/4/8 px at 16×16 latents
    for attention in capture.maps:
        assert attention.shape[0] == 2 * 8 and attention.shape[2] == 77
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:2]))


def test_examples_from_rows(astronaut):
    records = sample_records(4, astronaut)
    tokenizer = load_components(None, "tdm", tiny=True)["tokenizer"]
    builder = ExampleBuilder(
        DataConfig("sdm", resolution=64, object_resolution=32, subject_keep_prob=1.0, uncondition_prob=0.0),
        tokenizer,
        seed=0,
    )
    batch = builder(to_table(records))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["pixel_values"].min() >= -1
    assert batch["object_pixel_values"].shape == (4, 4, 3, 32, 32)
    assert set(np.unique(batch["subject_masks"])) <= {0.0, 1.0}  # nearest-neighbour: masks stay binary
    assert batch["num_subjects"].tolist() == [len(r.subjects) for r in records]
    for b, record in enumerate(records):
        n = len(record.subjects)
        assert batch["subject_valid"][b].tolist() == [True] * n + [False] * (4 - n)
        flagged = np.nonzero(batch["image_token_mask"][b])[0].tolist()
        assert flagged == batch["token_index"][b, :n].tolist()
        for k in range(n):  # a subject's noun token is the last token of its noun ("man", "woman")
            word = tokenizer.convert_ids_to_tokens(int(batch["input_ids"][b, flagged[k]]))
            assert word.replace("</w>", "") == record.subjects[k].noun
        assert batch["subject_masks"][b, :n].sum() > 0 and batch["subject_masks"][b, n:].sum() == 0
    # unconditional drop: empty caption and no subjects
    dropped = ExampleBuilder(DataConfig("sdm", resolution=64, object_resolution=32, uncondition_prob=1.0), tokenizer)
    empty = dropped(to_table(records[:2]))
    assert empty["num_subjects"].tolist() == [0, 0] and not empty["image_token_mask"].any()
    assert (empty["input_ids"] == tokenizer("", padding="max_length", max_length=77).input_ids).all()
    # TDM: caption dropout p=1 gives the empty caption; p=0 keeps it (without markers)
    tdm = ExampleBuilder(DataConfig("tdm", resolution=64, caption_dropout_prob=0.0), tokenizer)(to_table(records[:1]))
    assert set(tdm) == {"pixel_values", "input_ids"}
    assert tokenizer.decode(tdm["input_ids"][0], skip_special_tokens=True) == records[0].caption


def test_target_transform_landscape_and_portrait():
    image = torch.rand(3, 100, 200)  # landscape: resize short side, centre crop
    masks = torch.zeros(1, 100, 200)
    masks[0, :, :100] = 1  # left half
    out, out_masks = transform_target(image, masks, 64, flip=True)
    assert out.shape == (3, 64, 64) and out_masks.shape == (1, 64, 64)
    assert out_masks[0, :, :32].sum() == 0 and out_masks[0, :, 32:].all()  # flipped: the mask moved right
    portrait = torch.ones(3, 200, 100)  # portrait: black side padding, then resize
    out, out_masks = transform_target(portrait, torch.ones(1, 200, 100), 64, flip=False)
    assert out[:, :, :8].max() == 0 and out[:, :, 24:40].min() > 0.99
    assert out_masks[0, :, :16].sum() == 0 and out_masks[0, :, 16:48].all()


@pytest.mark.slow
def test_plain_torch_training_lowers_the_loss(astronaut, tmp_path):
    torch.manual_seed(0)
    parts = load_components(None, "sdm", tiny=True)
    config = OptimConfig(lr=1e-3, masked_loss_prob=0.0)
    model = TrainingModel(
        "sdm",
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        parts["scheduler"].config,
        parts["subject_encoder"],
        config,
    )
    builder = ExampleBuilder(
        DataConfig("sdm", resolution=64, object_resolution=32, uncondition_prob=0.0, subject_keep_prob=1.0),
        parts["tokenizer"],
        seed=0,
    )
    batch = {k: torch.from_numpy(v) for k, v in builder(to_table(sample_records(4, astronaut))).items()}

    def evaluate() -> float:  # the same noise and timesteps every time
        model.eval()
        with torch.no_grad():
            torch.manual_seed(123)
            return float(np.mean([model(batch)["loss_den"].item() for _ in range(4)]))

    before = evaluate()
    optimizer = make_optimizer(model, config)
    step = TrainStep(model, optimizer, config, "cpu")
    frozen_vae = {k: v.clone() for k, v in model.vae.state_dict().items()}
    frozen_vision = model.subject_encoder.image_encoder.vision_model.encoder.layers[0].state_dict()
    frozen_vision = {k: v.clone() for k, v in frozen_vision.items()}
    trained_vision = {
        k: v.clone()
        for k, v in model.subject_encoder.image_encoder.vision_model.encoder.layers[-1].state_dict().items()
    }
    model.train()
    history = [step(batch) for _ in range(30)]
    after = evaluate()
    assert after < 0.8 * before, (before, after)
    assert all(np.isfinite(h["loss"]) and h["grad_norm"] >= 0 for h in history)
    assert any(h["loss_loc"] != 0 for h in history)
    # frozen parts stay; the last CLIP vision layers train
    assert all(torch.equal(v, model.vae.state_dict()[k]) for k, v in frozen_vae.items())
    layer0 = model.subject_encoder.image_encoder.vision_model.encoder.layers[0].state_dict()
    assert all(torch.equal(v, layer0[k]) for k, v in frozen_vision.items())
    last = model.subject_encoder.image_encoder.vision_model.encoder.layers[-1].state_dict()
    assert any(not torch.equal(v, last[k]) for k, v in trained_vision.items())

    # checkpoint round trip: the model dir loads as a pipeline part; the optimizer state restores exactly
    save_model_dir(
        tmp_path / "model",
        "sdm",
        unet=model.unet,
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=parts["tokenizer"],
        scheduler=parts["scheduler"],
        subject_encoder=model.subject_encoder,
    )
    save_training_state(tmp_path / "state.safetensors", optimizer, 30, {"attempt": 0})
    assert not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pt"))
    reloaded = load_components(tmp_path / "model", "sdm")
    torch.testing.assert_close(reloaded["unet"].state_dict(), model.unet.state_dict())
    torch.testing.assert_close(reloaded["subject_encoder"].state_dict(), model.subject_encoder.state_dict())
    fresh = TrainingModel(
        "sdm",
        reloaded["unet"],
        reloaded["vae"],
        reloaded["text_encoder"],
        reloaded["scheduler"].config,
        reloaded["subject_encoder"],
        config,
    )
    fresh_optimizer = make_optimizer(fresh, config)
    assert load_training_state(tmp_path / "state.safetensors", fresh_optimizer) == (30, {"attempt": 0})
    old, new = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert old["param_groups"] == new["param_groups"]
    for index, values in old["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(new["state"][index][key], value)


def test_gradient_checkpointing_gives_the_same_step(astronaut):
    """train --gradient-checkpointing recomputes the UNet's blocks in backward: same loss, same gradients (it only
    trades time for activation memory), and the localization loss still sees its maps."""
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        parts = load_components(None, "sdm", tiny=True)
        if checkpointing:
            parts["unet"].enable_gradient_checkpointing()
        config = OptimConfig(lr=1e-3, masked_loss_prob=0.0)
        model = TrainingModel(
            "sdm",
            parts["unet"],
            parts["vae"],
            parts["text_encoder"],
            parts["scheduler"].config,
            parts["subject_encoder"],
            config,
        )
        builder = ExampleBuilder(
            DataConfig("sdm", resolution=64, object_resolution=32, uncondition_prob=0.0, subject_keep_prob=1.0),
            parts["tokenizer"],
            seed=0,
        )
        batch = {k: torch.from_numpy(v) for k, v in builder(to_table(sample_records(2, astronaut))).items()}
        model.train()
        torch.manual_seed(1)
        out = model(batch)
        out["loss"].backward()
        grads = {name: p.grad.clone() for name, p in model.unet.named_parameters() if p.grad is not None}
        results.append((out["loss_den"].item(), out["loss_loc"].item(), grads))
    (den_a, loc_a, grads_a), (den_b, loc_b, grads_b) = results
    assert loc_a != 0 and den_a == pytest.approx(den_b, rel=1e-6) and loc_a == pytest.approx(loc_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 100
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_loss_plots_and_lines_show_only_the_losses_a_model_trains_with(tmp_path):
    """The TDM trains with L_den alone (its loss_loc column is 0 by design): one panel, no loss_loc in its line."""
    from PIL import Image

    from facediffuser.training.metrics import TRAINED_LOSSES, loss_line, plot_losses

    rows = [{"step": s, "attempt": 0 if s < 3 else 1, "loss_den": 1 / s, "loss_loc": 0.1 / s} for s in range(1, 6)]
    widths = {}
    for model in ("tdm", "sdm"):
        plot_losses(rows, tmp_path / f"{model}.png", title=model, losses=TRAINED_LOSSES[model])
        widths[model] = Image.open(tmp_path / f"{model}.png").width
    assert widths["sdm"] == 2 * widths["tdm"]
    assert loss_line({"model": "tdm", "loss_den": 0.5, "loss_loc": 0.0}) == "loss_den 0.5000"
    assert loss_line({"model": "sdm", "loss_den": 0.5, "loss_loc": 0.25}) == "loss_den 0.5000, loss_loc 0.2500"
