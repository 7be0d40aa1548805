"""Importing the released Face-diffuser checkpoints (two `pytorch_model.bin` files) onto an SD1.5 base directory.

Only `unet.*` (both), `image_encoder.*` and `postfuse_module.*` (SDM) are taken from the checkpoints; VAE, text
encoder and tokenizer come from the base (METHOD.md §5 quirk 13). Files are read with `torch.load(weights_only=True)`:
no arbitrary unpickling.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from facediffuser.models.subject_encoder import CLIP_VIT_L14, SubjectEncoder
from facediffuser.schedulers import load_scheduler


def official_components(base_sd_dir: str | Path, sdm_bin: str | Path, tdm_bin: str | Path,
                        vision_config: dict | None = None, torch_dtype=torch.float32) -> dict:
    """→ the FaceDiffuserPipeline components; `vision_config` defaults to CLIP ViT-L/14."""
    base = str(base_sd_dir)
    sdm_state = _load_bin(sdm_bin)
    tdm_state = _load_bin(tdm_bin)
    unet_config = UNet2DConditionModel.load_config(base, subfolder="unet")

    def unet_from(state: dict, name: str) -> UNet2DConditionModel:
        unet = UNet2DConditionModel.from_config(unet_config)
        _load_exact(unet, _with_prefix(state, "unet.", name), f"{name} unet")
        return unet.to(torch_dtype)

    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=torch_dtype)
    subject_encoder = SubjectEncoder(
        vision_config=vision_config or CLIP_VIT_L14, text_embed_dim=text_encoder.config.hidden_size
    )
    subject_state = {
        **{f"image_encoder.{k}": v for k, v in _with_prefix(sdm_state, "image_encoder.", "sdm").items()},
        **{f"postfuse_module.{k}": v for k, v in _with_prefix(sdm_state, "postfuse_module.", "sdm").items()},
    }
    _load_exact(subject_encoder, subject_state, "sdm subject encoder")
    return dict(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=torch_dtype),
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        subject_encoder=subject_encoder.to(torch_dtype),
        sdm_unet=unet_from(sdm_state, "sdm"),
        tdm_unet=unet_from(tdm_state, "tdm"),
        scheduler=load_scheduler(base),
    )


def _load_bin(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _with_prefix(state: dict, prefix: str, name: str) -> dict[str, torch.Tensor]:
    picked = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not picked:
        raise ValueError(f"the {name} checkpoint has no '{prefix}*' weights")
    return picked


def _load_exact(module: torch.nn.Module, state: dict[str, Any], name: str) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{name}: checkpoint does not match the architecture "
            f"({len(missing)} missing, e.g. {missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})"
        )
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{name}: {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
