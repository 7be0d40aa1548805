"""Stable Diffusion 1.5 at its real sizes, randomly initialised: the architecture the released weights load into.

The configs below are those of `runwayml/stable-diffusion-v1-5` (`unet/`, `vae/`, `text_encoder/config.json`) and,
for the SDM's subject encoder, `openai/clip-vit-large-patch14`'s vision tower (`CLIP_VIT_L14`) with the post-fuse
MLP. `sd15_components` builds them with the same builder as the tiny stack (`tiny.random_components`), so the
classes, block layout, tokenizer (the real CLIP BPE vocabulary) and scheduler are the ones real weights use; only
the weights are random. No download is involved. Used by tests/test_real_size.py, benchmarks/real_size.py and
the sizing notes (docs/sizing.md).

Sizes (fp32 at random init, 2 UNets): about 2.23 G parameters, 8.9 GB.
"""

from __future__ import annotations

from facediffuser.models.subject_encoder import CLIP_VIT_L14
from facediffuser.models.tiny import CLIP_VOCAB_SIZE, random_components

SD15_IMAGE_SIZE = 512  # native resolution (64×64 latents)

# runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

# runwayml/stable-diffusion-v1-5 vae/config.json
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=SD15_IMAGE_SIZE,
    scaling_factor=0.18215,
)

# runwayml/stable-diffusion-v1-5 text_encoder/config.json (= openai/clip-vit-large-patch14's text tower). The
# token ids 0/2/1 are that file's (legacy) values; only the pooled output reads eos_token_id, and SD uses the
# last hidden state.
SD15_TEXT_ENCODER = dict(
    vocab_size=CLIP_VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

# Parameter counts of the real-size modules (checked by tests/test_real_size.py; docs/sizing.md uses them).
SD15_PARAMETERS = {
    "unet": 859_520_964,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "image_encoder": 303_966_208,  # CLIP ViT-L/14 vision tower + visual_projection
    "postfuse_module": 2_958_336,
}


def sd15_components(seed: int = 0, torch_dtype=None, share_unet: bool = False) -> dict:
    """FaceDiffuserPipeline components at SD1.5's real sizes, random weights, deterministic for a seed (about 15 s
    on 2 CPU cores). `share_unet`: one UNet module in both roles (TDM and SDM), 3.4 GB less in fp32."""
    return random_components(
        seed,
        unet=SD15_UNET,
        vae=SD15_VAE,
        text=SD15_TEXT_ENCODER,
        vision=CLIP_VIT_L14,
        torch_dtype=torch_dtype,
        share_unet=share_unet,
    )


def sd15_pipeline(seed: int = 0, torch_dtype=None, share_unet: bool = False):
    """A FaceDiffuserPipeline of real sizes at random init (`torch_dtype`: default float32)."""
    from facediffuser.pipeline import FaceDiffuserPipeline

    return FaceDiffuserPipeline(**sd15_components(seed, torch_dtype, share_unet))


def parameter_counts(components: dict) -> dict[str, int]:
    """Parameters per module of a components dict (or of a pipeline's `components`)."""
    counts = {}
    for name in ("sdm_unet", "tdm_unet", "vae", "text_encoder"):
        if components.get(name) is not None:
            counts[name] = sum(p.numel() for p in components[name].parameters())
    encoder = components.get("subject_encoder")
    if encoder is not None:
        counts["image_encoder"] = sum(p.numel() for p in encoder.image_encoder.parameters())
        counts["postfuse_module"] = sum(p.numel() for p in encoder.postfuse_module.parameters())
    return counts
