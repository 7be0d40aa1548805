"""Files written the way the official Face-diffuser environment and the Hugging Face hub wrote them, from tiny models.

The official environment pinned transformers 4.25–4.29, diffusers 0.16.1, torch 1.13 and accelerate 0.19 and trained
in bf16 mixed precision. What that changes on disk, compared with what today's libraries write:
  - CLIP's `embeddings.position_ids` is a persistent int64 buffer (non-persistent from transformers 4.31);
  - the VAE's mid-block attention is stored as query/key/value/proj_attn (diffusers' AttentionBlock);
  - the training wrapper's state dict holds every submodule (unet, vae, text_encoder, and for the SDM
    image_encoder and postfuse_module); FastComposer's text encoder wrapper drops CLIPTextModel's `text_model.`
    level; frozen modules were cast to bf16, trained ones stay fp32;
  - configs carry the keys and values of their day (SD1.5's: diffusers 0.6.0, transformers 4.22, CLIP's old
    bos/eos ids, AddedToken dicts in tokenizer_config.json).
The hub's SD1.5 directory adds model_index.json, safety_checker/, feature_extractor/, and fp16 variant files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from facediffuser.models.tiny import clip_tokenizer_dir

OLD_UNET_KEYS = (
    "act_fn",
    "attention_head_dim",
    "block_out_channels",
    "center_input_sample",
    "cross_attention_dim",
    "down_block_types",
    "downsample_padding",
    "flip_sin_to_cos",
    "freq_shift",
    "in_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "norm_eps",
    "norm_num_groups",
    "out_channels",
    "sample_size",
    "up_block_types",
)
OLD_VAE_KEYS = (
    "act_fn",
    "block_out_channels",
    "down_block_types",
    "in_channels",
    "latent_channels",
    "layers_per_block",
    "norm_num_groups",
    "out_channels",
    "sample_size",
    "up_block_types",
)
OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def old_vae_state(vae) -> dict[str, torch.Tensor]:
    """The VAE's state dict under diffusers ≤ 0.16's attention names."""
    state = {}
    for key, value in vae.state_dict().items():
        if ".mid_block.attentions." in key:
            for new, old in OLD_ATTENTION_NAMES.items():
                key = key.replace(f".{new}.", f".{old}.")
        state[key] = value
    return state


def with_position_ids(state: dict, prefix: str, count: int) -> dict:
    """Add CLIP's position ids the way transformers < 4.31 saved them: int64, shape [1, count]."""
    return {**state, f"{prefix}embeddings.position_ids": torch.arange(count).expand(1, -1).clone()}


def official_state_dict(pipe, which: str, *, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The released checkpoint of `which` as the official training wrapper's `state_dict()` gave it: trained parts
    (unet, and for the SDM image_encoder + postfuse_module) fp32, frozen ones (vae, text_encoder) bf16, unless
    `dtype` casts every floating tensor (a user's fp16 conversion)."""
    unet = pipe.sdm_unet if which == "sdm" else pipe.tdm_unet
    text = pipe.text_encoder  # today's CLIPTextModel holds embeddings/encoder/final_layer_norm at its top level
    frozen = torch.bfloat16
    state = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"vae.{k}": v.to(frozen) for k, v in old_vae_state(pipe.vae).items()})
    text_state = with_position_ids(text.state_dict(), "", text.config.max_position_embeddings)
    text_prefix = "text_encoder." if which == "sdm" else "text_encoder.text_model."  # FastComposer's wrapper
    state.update({f"{text_prefix}{k}": (v.to(frozen) if v.is_floating_point() else v) for k, v in text_state.items()})
    if which == "sdm":
        encoder = pipe.subject_encoder
        vision = encoder.image_encoder.config
        positions = (vision.image_size // vision.patch_size) ** 2 + 1
        state.update(with_position_ids(encoder.state_dict(), "image_encoder.vision_model.", positions))
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    return state


def write_checkpoint(state: dict, path: Path) -> Path:
    """`.bin` as torch.save wrote it (zip format, torch ≥ 1.6), or `.safetensors` (a user's conversion)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def write_hub_sd15(root: Path, pipe, *, weights: str = "bin", plain: bool = True, fp16_variant: bool = False) -> Path:
    """A Stable Diffusion 1.5 directory laid out as the hub's runwayml/stable-diffusion-v1-5 (tiny sizes): `weights`
    "bin" (the 2022 files: old VAE names, CLIP position ids) or "safetensors"; `plain` writes the fp32 files,
    `fp16_variant` the `*.fp16.*` ones."""
    root.mkdir(parents=True, exist_ok=True)
    _json(
        root / "model_index.json",
        {
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.6.0",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        },
    )
    _json(
        root / "feature_extractor" / "preprocessor_config.json",
        {
            "crop_size": 224,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": 224,
        },
    )
    # never read by us: a config and weights that would fail to load if anything tried
    _json(root / "safety_checker" / "config.json", {"architectures": ["StableDiffusionSafetyChecker"]})
    torch.save({"not.a.model": torch.zeros(1)}, root / "safety_checker" / "pytorch_model.bin")
    _json(
        root / "scheduler" / "scheduler_config.json",
        {
            "_class_name": "PNDMScheduler",
            "_diffusers_version": "0.6.0",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "num_train_timesteps": 1000,
            "set_alpha_to_one": False,
            "skip_prk_steps": True,
            "steps_offset": 1,
            "trained_betas": None,
            "clip_sample": False,
        },
    )
    _write_tokenizer(root / "tokenizer")

    text = pipe.text_encoder
    config = text.config
    _json(
        root / "text_encoder" / "config.json",
        {
            "_name_or_path": "openai/clip-vit-large-patch14",
            "architectures": ["CLIPTextModel"],
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "dropout": 0.0,
            "eos_token_id": 2,
            "hidden_act": config.hidden_act,
            "hidden_size": config.hidden_size,
            "initializer_factor": 1.0,
            "initializer_range": 0.02,
            "intermediate_size": config.intermediate_size,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": config.max_position_embeddings,
            "model_type": "clip_text_model",
            "num_attention_heads": config.num_attention_heads,
            "num_hidden_layers": config.num_hidden_layers,
            "pad_token_id": 1,
            "projection_dim": config.projection_dim,
            "torch_dtype": "float32",
            "transformers_version": "4.22.0.dev0",
            "vocab_size": config.vocab_size,
        },
    )
    text_state = {f"text_model.{k}": v for k, v in text.state_dict().items()}  # transformers 4.22's nesting
    text_state = with_position_ids(text_state, "text_model.", config.max_position_embeddings)
    _json(
        root / "unet" / "config.json",
        {
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.6.0",
            **_pick(pipe.tdm_unet.config, OLD_UNET_KEYS),
        },
    )
    _json(
        root / "vae" / "config.json",
        {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", **_pick(pipe.vae.config, OLD_VAE_KEYS)},
    )
    parts = {
        "unet": ("diffusion_pytorch_model", pipe.tdm_unet.state_dict()),
        "vae": ("diffusion_pytorch_model", old_vae_state(pipe.vae)),
        "text_encoder": ("model" if weights == "safetensors" else "pytorch_model", text_state),
    }
    for folder, (stem, state) in parts.items():
        if plain:
            write_checkpoint(state, root / folder / f"{stem}.{weights}")
        if fp16_variant:
            half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
            write_checkpoint(half, root / folder / f"{stem}.fp16.{weights}")
    return root


def _write_tokenizer(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(Path(clip_tokenizer_dir()) / name, folder / name)

    def token(text):
        return {
            "__type": "AddedToken",
            "content": text,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
            "single_word": False,
        }

    _json(
        folder / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
        },
    )
    _json(
        folder / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "bos_token": token("<|startoftext|>"),
            "do_lower_case": True,
            "eos_token": token("<|endoftext|>"),
            "errors": "replace",
            "model_max_length": 77,
            "name_or_path": "openai/clip-vit-large-patch14",
            "pad_token": "<|endoftext|>",
            "special_tokens_map_file": "./special_tokens_map.json",
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": token("<|endoftext|>"),
        },
    )


def _pick(config, keys) -> dict:
    return {key: (list(config[key]) if isinstance(config[key], tuple) else config[key]) for key in keys}


def _json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2))
