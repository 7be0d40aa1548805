"""Importing the released Face-diffuser checkpoints (one state dict per model) onto an SD1.5 base directory.

What the official environment (transformers 4.25–4.29, diffusers 0.16.1, torch 1.13, accelerate 0.19, bf16 mixed
precision) wrote, read off its model code and the libraries' histories:
  - one state dict per model holding every submodule of the training wrapper: `unet.*`, `vae.*`, `text_encoder.*`,
    and for the SDM `image_encoder.*` (CLIP vision tower `vision_model.*` + `visual_projection.*`) and
    `postfuse_module.*`, with no wrapper prefix (the official inference loads it strictly);
  - CLIP's `embeddings.position_ids` as a persistent int64 buffer: transformers made it non-persistent in 4.31, so
    today's modules do not expect it;
  - the VAE's mid-block attention under diffusers' old names (query/key/value/proj_attn; METHOD.md §5 quirk 13);
  - trained parts in fp32 and frozen ones in bf16 (accelerate's mixed-precision `weight_dtype`).

Only `unet.*` (both), `image_encoder.*` and `postfuse_module.*` (SDM) are taken; VAE, text encoder and tokenizer
come from the base, so the old VAE names never reach a loader. Of the rest, exactly the legacy position ids are
accepted (and checked to be what they must be); any other key, missing key or shape is refused. `.bin` files are
read with `torch.load(weights_only=True)` (no arbitrary unpickling), `.safetensors` with safetensors; fp32, fp16 and
bf16 tensors are all accepted and cast to the requested dtype.

`facediffuser import-official` writes the imported pair as a Face-diffuser model directory (sdm/ + tdm/, safetensors)
that every other command loads with --model.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path
from typing import Any

import torch

from facediffuser import model_dir
from facediffuser.models.subject_encoder import CLIP_VIT_L14, SubjectEncoder
from facediffuser.prompts import ensure_image_token

CHECKPOINT_NAMES = ("model.safetensors", "pytorch_model.bin")  # looked for when a checkpoint is a directory
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def official_components(
    base_sd_dir: str | Path,
    sdm_checkpoint: str | Path,
    tdm_checkpoint: str | Path,
    vision_config: dict | None = None,
    torch_dtype=torch.float32,
    variant: str | None = None,
) -> dict:
    """→ the FaceDiffuserPipeline components; `vision_config` defaults to CLIP ViT-L/14, `variant` picks the base's
    weight files (e.g. "fp16" for `*.fp16.safetensors`)."""
    from diffusers import UNet2DConditionModel

    base = str(base_sd_dir)
    shared = model_dir.load_shared_parts(base, torch_dtype=torch_dtype, variant=variant)
    unet_config = UNet2DConditionModel.load_config(base, subfolder=model_dir.UNET)

    def unet_from(state: dict, name: str) -> UNet2DConditionModel:
        unet = UNet2DConditionModel.from_config(unet_config)
        load_exact(unet, with_prefix(state, "unet.", name), f"{name} unet")
        return unet.to(torch_dtype)

    sdm_state = read_state_dict(sdm_checkpoint)
    subject_encoder = SubjectEncoder(
        vision_config=vision_config or CLIP_VIT_L14, text_embed_dim=shared["text_encoder"].config.hidden_size
    )
    subject_state = {
        f"{prefix}{key}": value
        for prefix in ("image_encoder.", "postfuse_module.")
        for key, value in with_prefix(sdm_state, prefix, "sdm").items()
    }
    load_exact(subject_encoder, subject_state, "sdm subject encoder")
    sdm_unet = unet_from(sdm_state, "sdm")
    del sdm_state, subject_state  # one checkpoint in memory at a time (each is several GB at real size)
    return dict(
        **shared,
        subject_encoder=subject_encoder.to(torch_dtype),
        sdm_unet=sdm_unet,
        tdm_unet=unet_from(read_state_dict(tdm_checkpoint), "tdm"),
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint file (`.safetensors`, or a torch `.bin`/`.pt` read with weights_only) or a directory holding
    model.safetensors / pytorch_model.bin → its state dict."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in CHECKPOINT_NAMES if (path / name).is_file()), None)
        if found is None:
            raise FileNotFoundError(f"checkpoint not found: {path} holds neither {' nor '.join(CHECKPOINT_NAMES)}")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    # mmap keeps a multi-GB file out of memory until its tensors are copied into the model (zip format only:
    # torch.save's default since 1.6, so also torch 1.13's)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def with_prefix(state: dict, prefix: str, name: str) -> dict[str, torch.Tensor]:
    picked = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not picked:
        raise ValueError(f"the {name} checkpoint has no '{prefix}*' weights")
    return picked


def load_exact(module: torch.nn.Module, state: dict[str, Any], name: str) -> None:
    """Load `state` into `module`, refusing any key, shape or dtype the architecture does not have, except the
    legacy persistent buffers an older library wrote (`legacy_buffers`), which are checked and dropped."""
    own = module.state_dict()
    state = {key: value for key, value in state.items() if key not in legacy_buffers(module, state, name)}
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
        if own[key].is_floating_point() and value.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: {key} is {value.dtype}, expected float32, float16 or bfloat16")
    module.load_state_dict(state, strict=True)  # copies cast each tensor to the parameter's dtype


def legacy_buffers(module: torch.nn.Module, state: dict[str, Any], name: str) -> set[str]:
    """Keys of `state` that are buffers `module` holds but no longer saves (CLIP's position ids, persistent before
    transformers 4.31). Each must equal the module's own value: anything else is a different model."""
    transient = {key: value for key, value in module.named_buffers() if key not in module.state_dict()}
    legacy = set(state) & set(transient)
    for key in legacy:
        value = state[key]
        if value.shape != transient[key].shape or not torch.equal(value.to(transient[key].dtype), transient[key]):
            raise ValueError(
                f"{name}: checkpoint does not match the architecture ({key} has shape "
                f"{tuple(value.shape)} or values other than the model's {tuple(transient[key].shape)})"
            )
    return legacy


# ------------------------------------------------------------------------------------------------ command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="Stable Diffusion 1.5 directory (the hub layout)")
    parser.add_argument(
        "--sdm",
        required=True,
        help="the released SDM checkpoint (pytorch_model.bin, .safetensors, or a directory holding one)",
    )
    parser.add_argument("--tdm", required=True, help="the released TDM checkpoint")
    parser.add_argument("--out", required=True, help="model directory to write (sdm/ and tdm/, safetensors)")
    parser.add_argument("--variant", default=None, help="the base's weight variant, e.g. fp16 (*.fp16.safetensors)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} exists and is not empty; give a new directory")
    for flag in ("sdm", "tdm"):
        path = Path(getattr(args, flag))
        if not path.exists():
            raise FileNotFoundError(f"--{flag}: checkpoint not found: {path}")
    model_dir.check_base(args.base, args.variant)
    print(f"import-official: reading {args.sdm} and {args.tdm} onto {args.base}", flush=True)
    parts = official_components(args.base, args.sdm, args.tdm, variant=args.variant)
    ensure_image_token(parts["tokenizer"])  # as a FaceDiffuserPipeline holding these parts would
    for which in model_dir.MODELS:
        model_dir.save(
            out / which,
            which,
            unet=parts[f"{which}_unet"],
            subject_encoder=parts["subject_encoder"],
            **{part: parts[part] for part in model_dir.SHARED_PARTS},
        )
    print(f"import-official: wrote {out} (sdm/, tdm/); use it with --model {out}", flush=True)
    return 0
