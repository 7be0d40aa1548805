"""Real Stable Diffusion 1.5 sizes at random init (facediffuser/models/sd15.py): the pipeline runs end to end at
256² and one SDM training step runs at 128², and every shape is the real one (77×768 text tokens, 257×1024 vision
tokens, an 859.5M-parameter UNet, the attention maps of a 32×32 latent).

Memory: the TDM and SDM roles share one UNet module here (sd15_components(share_unet=True): 5.3 GB of fp32
weights instead of 8.9; every UNet call of the sampler still runs). The training step uses SGD, which keeps no
state: AdamW's two moments (6.9 GB more) only copy the parameters' shapes, and benchmarks/real_size.py measures
the step with AdamW. Measured on 2 cores (other jobs running): 83–115 s and 9.6 GiB peak RSS for the module.
"""

from __future__ import annotations

import collections
import gc
import math

import pytest
import torch

pytestmark = pytest.mark.slow

# query tokens of each UNet level's attention at a 32×32 latent (256² images); keys: the same (attn1) or 77 (attn2)
QUERIES_AT_256 = {
    "down_blocks.0": 1024,
    "down_blocks.1": 256,
    "down_blocks.2": 64,
    "mid_block": 16,
    "up_blocks.1": 64,
    "up_blocks.2": 256,
    "up_blocks.3": 1024,
}
LAYERS = {
    "down_blocks.0": 2,
    "down_blocks.1": 2,
    "down_blocks.2": 2,
    "mid_block": 1,
    "up_blocks.1": 3,
    "up_blocks.2": 3,
    "up_blocks.3": 3,
}  # transformer layers per level
HEADS = 8  # SD1.5: attention_head_dim=8 is, in diffusers' naming, the number of heads


@pytest.fixture(scope="module")
def real_pipe():
    from facediffuser.models.sd15 import sd15_pipeline

    pipe = sd15_pipeline(seed=0, share_unet=True)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    del pipe
    gc.collect()


def _block(module_name: str) -> str:
    """ "up_blocks.3.attentions.1.transformer_blocks.0.attn2" → "up_blocks.3"."""
    return module_name.split(".attentions")[0]


def test_real_size_parameter_counts(real_pipe):
    from facediffuser.models.sd15 import SD15_PARAMETERS, parameter_counts

    counts = parameter_counts(real_pipe.components)
    assert counts["sdm_unet"] == pytest.approx(859.5e6, abs=0.1e6)
    assert counts["text_encoder"] == pytest.approx(123.1e6, abs=0.1e6)
    assert counts["image_encoder"] == pytest.approx(304.0e6, abs=0.1e6)
    assert counts["postfuse_module"] == pytest.approx(2.96e6, abs=0.01e6)  # METHOD.md §1: ≈ 2.96M
    counts["unet"] = counts.pop("sdm_unet")
    assert {name: counts[name] for name in SD15_PARAMETERS} == SD15_PARAMETERS  # exact, as documented
    assert real_pipe.vae_scale_factor == 8 and real_pipe.vae.config.scaling_factor == 0.18215


def test_real_size_pipeline_shapes_and_attention_maps(real_pipe, astronaut, monkeypatch):
    """Scene step (TDM) then a fusion step (TDM and SDM): 3 UNet calls on a guidance batch of 2 at 32×32."""
    from diffusers.models.attention_processor import Attention, AttnProcessor
    from PIL import Image

    pipe = real_pipe
    unet = pipe.sdm_unet
    assert pipe.tdm_unet is unet  # share_unet: the one module serves both roles (memory); both roles are called
    # Every attention layer computes its probabilities explicitly (the classic processor) and we record each map
    # the UNet really computed, by module name.
    unet.set_attn_processor(AttnProcessor())
    names = {id(module): name for name, module in unet.named_modules() if isinstance(module, Attention)}
    maps: list[tuple[str, tuple[int, ...]]] = []
    original = Attention.get_attention_scores

    def recording(self, query, key, attention_mask=None):
        probs = original(self, query, key, attention_mask)
        if id(self) in names:
            maps.append((names[id(self)], tuple(probs.shape)))
        return probs

    monkeypatch.setattr(Attention, "get_attention_scores", recording)
    text_shapes, vision_shapes = [], []
    hooks = [
        pipe.text_encoder.register_forward_hook(lambda m, i, out: text_shapes.append(tuple(out[0].shape))),
        pipe.subject_encoder.image_encoder.vision_model.register_forward_hook(
            lambda m, i, out: vision_shapes.append(tuple(out.last_hidden_state.shape))
        ),
    ]
    try:
        result = pipe(
            "a woman <|image|> on the moon",
            [Image.fromarray(astronaut)],
            num_inference_steps=2,
            start_merge_step=0,
            final_step=1,
            height=256,
            width=256,
            seed=0,
            output_type="pt",
            return_masks=True,
        )
    finally:
        for hook in hooks:
            hook.remove()

    assert text_shapes and set(s[1:] for s in text_shapes) == {(77, 768)}
    assert vision_shapes == [(1, 257, 1024)]  # CLIP ViT-L/14 at 224: 16×16 patches + CLS, width 1024
    assert tuple(result.images.shape) == (1, 3, 256, 256) and torch.isfinite(result.images).all()
    assert tuple(result.masks.shape) == (1, 1, 32, 32)  # one fusion step, on the 32×32 latent

    calls = 3  # iteration 0: TDM; iteration 1: TDM and SDM
    found = collections.Counter((_block(name), name[-5:], shape) for name, shape in maps)
    expected = collections.Counter()
    for block, queries in QUERIES_AT_256.items():
        expected[(block, "attn1", (2 * HEADS, queries, queries))] = calls * LAYERS[block]
        expected[(block, "attn2", (2 * HEADS, queries, 77))] = calls * LAYERS[block]
    assert found == expected
    assert max(shape[1] * shape[2] for _, shape in maps) == 1024 * 1024  # self-attention at the top level


def test_real_size_sdm_training_step(real_pipe, astronaut, monkeypatch):
    """One SDM step (TrainStep: forward, backward, clip, optimizer step) at 128² with the localization loss on
    the 11 real-size cross-attention maps (16×16 latent: 8×8, 4×4 and 2×2 maps)."""
    from facediffuser.data.schema import to_table
    from facediffuser.training import step as step_module
    from facediffuser.training.data import DataConfig, ExampleBuilder
    from facediffuser.training.sample_rows import sample_records
    from facediffuser.training.step import OptimConfig, TrainingModel, TrainStep

    pipe = real_pipe
    builder = ExampleBuilder(
        DataConfig("sdm", resolution=128, object_resolution=224, subject_keep_prob=1.0, uncondition_prob=0.0),
        pipe.tokenizer,
        seed=0,
    )
    batch = {k: torch.from_numpy(v) for k, v in builder(to_table(sample_records(1, astronaut))).items()}
    assert tuple(batch["object_pixel_values"].shape[-3:]) == (3, 224, 224)
    config = OptimConfig(masked_loss_prob=1.0)
    model = TrainingModel(
        "sdm", pipe.sdm_unet, pipe.vae, pipe.text_encoder, pipe.scheduler.config, pipe.subject_encoder, config, seed=0
    ).train()
    trainable = sum(p.numel() for p in model.trainable_parameters())
    assert trainable == pytest.approx(887.7e6, abs=0.1e6)  # UNet + post-fuse + last 2 CLIP layers (METHOD.md §3)

    seen = []

    def recording_loss(maps, *args):
        seen.extend(tuple(a.shape) for a in maps)
        return localization(maps, *args)

    localization = step_module.localization_loss
    monkeypatch.setattr(step_module, "localization_loss", recording_loss)
    probe = pipe.sdm_unet.conv_in.weight
    before = probe.detach().clone()
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=1e-3)  # stateless (see the module docstring)
    try:
        losses = TrainStep(model, optimizer, config, torch.device("cpu"))(batch)
    finally:
        model.eval()
        for parameter in model.parameters():
            parameter.grad = None
    assert all(math.isfinite(losses[k]) for k in ("loss", "loss_den", "loss_loc", "grad_norm"))
    assert losses["grad_norm"] > 0 and not torch.equal(probe.detach(), before)
    expected = (
        [(HEADS, 64, 77)] * 2 + [(HEADS, 16, 77)] * 2 + [(HEADS, 4, 77)] + [(HEADS, 16, 77)] * 3 + [(HEADS, 64, 77)] * 3
    )
    assert seen == expected  # 11 maps: down_blocks.1, .2, mid, up_blocks.1, .2 (METHOD.md §3)
