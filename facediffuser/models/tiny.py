"""A complete, randomly initialised, architecturally real Face-diffuser stack small enough for a CPU.

Same classes and block layout as Stable Diffusion 1.5 (4 UNet levels, cross-attention in the first three,
2 resnets per level, 8-pixel VAE factor, CLIP text and vision transformers, post-fuse MLP), only narrower and
shallower. The tokenizer is the real CLIP BPE vocabulary (shipped in the `clip-anytorch` wheel), so prompts
tokenize exactly as they do with production weights. No download is involved.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from facediffuser.prompts import ensure_image_token

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from facediffuser.models.subject_encoder import SubjectEncoder

# The model classes are imported where the models are built: a process that only needs the tokenizer or the
# sizes (e.g. a Ray Data actor building training examples) does not pay seconds for importing diffusers.
TINY_IMAGE_SIZE = 128  # default generated/training image side (16×16 latents)
TINY_OBJECT_SIZE = 32  # the tiny CLIP vision tower's input side

# Stable Diffusion 1.5's noise schedule.
SD15_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte → printable-unicode table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def clip_tokenizer_dir() -> str:
    """Write vocab.json + merges.txt of the real CLIP tokenizer (49408 tokens) to a cache dir, once."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the clip-anytorch package (which ships CLIP's BPE merges) is not installed")
    bpe_file = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_file, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # CLIP uses exactly this slice of the file
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE
    out = Path(tempfile.gettempdir()) / "facediffuser-clip-tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": json.dumps({token: i for i, token in enumerate(vocab)}),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
    }
    for name, text in files.items():  # several processes (Ray actors) may do this at once: replace atomically
        staging = out / f".{name}.{os.getpid()}.{threading.get_ident()}"
        staging.write_text(text)
        os.replace(staging, out / name)
    return str(out)


def tiny_tokenizer() -> "CLIPTokenizer":
    from transformers import CLIPTokenizer

    folder = Path(clip_tokenizer_dir())
    tokenizer = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    ensure_image_token(tokenizer)
    return tokenizer


def tiny_unet_config(width: int = 32, cross_attention_dim: int = 32, sample_size: int = TINY_IMAGE_SIZE // 8) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(width, width, 2 * width, 2 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=min(32, width),
    )


def tiny_vae_config(sample_size: int = TINY_IMAGE_SIZE) -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


def tiny_text_config(hidden: int = 32) -> dict:
    return dict(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def tiny_vision_config(text_hidden: int = 32) -> dict:
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=TINY_OBJECT_SIZE,
        patch_size=8,
        projection_dim=text_hidden,
    )


def tiny_unet(
    width: int = 32, cross_attention_dim: int = 32, sample_size: int = TINY_IMAGE_SIZE // 8
) -> "UNet2DConditionModel":
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**tiny_unet_config(width, cross_attention_dim, sample_size))


def tiny_vae(sample_size: int = TINY_IMAGE_SIZE) -> "AutoencoderKL":
    from diffusers import AutoencoderKL

    return AutoencoderKL(**tiny_vae_config(sample_size))


def tiny_text_encoder(hidden: int = 32) -> "CLIPTextModel":
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**tiny_text_config(hidden)))


def tiny_subject_encoder(text_hidden: int = 32) -> "SubjectEncoder":
    from facediffuser.models.subject_encoder import SubjectEncoder

    return SubjectEncoder(vision_config=tiny_vision_config(text_hidden), text_embed_dim=text_hidden)


def random_components(
    seed: int, *, unet: dict, vae: dict, text: dict, vision: dict, torch_dtype=None, share_unet: bool = False
) -> dict:
    """All FaceDiffuserPipeline components from architecture configs at random init, deterministic for a seed.

    The one builder of both random stacks: the tiny one below and the real-size one (`facediffuser.models.sd15`).
    `unet`/`vae` are UNet2DConditionModel/AutoencoderKL configs, `text` a CLIPTextConfig, `vision` the subject
    encoder's CLIPVisionConfig (its projection_dim = the text width). Each module is built in fp32 and, with
    `torch_dtype`, cast before the next is built (peak memory: the stack in that dtype plus one fp32 module).
    `share_unet=True` gives the TDM role the SDM's UNet module (one UNet's memory less; every call still runs).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from facediffuser.models.subject_encoder import SubjectEncoder

    def cast(module):
        return module if torch_dtype in (None, torch.float32) else module.to(torch_dtype)  # built in fp32

    torch.manual_seed(seed)
    parts = dict(  # built in this order (the seed's draws depend on it)
        vae=cast(AutoencoderKL(**vae)),
        text_encoder=cast(CLIPTextModel(CLIPTextConfig(**text))),
        tokenizer=tiny_tokenizer(),
        subject_encoder=cast(SubjectEncoder(vision_config=vision, text_embed_dim=text["hidden_size"])),
        sdm_unet=cast(UNet2DConditionModel(**unet)),
    )
    parts["tdm_unet"] = parts["sdm_unet"] if share_unet else cast(UNet2DConditionModel(**unet))
    parts["scheduler"] = DDIMScheduler(**SD15_SCHEDULE)
    return parts


def tiny_components(seed: int = 0, unet_width: int = 32) -> dict:
    """All pipeline components, deterministic for a seed. Default images are 128×128 (16×16 latents)."""
    return random_components(
        seed,
        unet=tiny_unet_config(unet_width),
        vae=tiny_vae_config(),
        text=tiny_text_config(),
        vision=tiny_vision_config(),
    )


def tiny_pipeline(seed: int = 0, unet_width: int = 32):
    from facediffuser.pipeline import FaceDiffuserPipeline

    return FaceDiffuserPipeline(**tiny_components(seed, unet_width))
