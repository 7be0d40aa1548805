"""Loading training bases and writing checkpoints, all in safetensors (no pickle anywhere).

A checkpoint directory holds
  model/                      one model directory, written by `facediffuser.model_dir.save` (SD layout for the TDM,
                              SD + subject_encoder/ for the SDM; docs/model-directory.md), loadable by
                              `FaceDiffuserPipeline.from_sdm_and_tdm`
  training_state.safetensors  AdamW moments + step counters; scalars and param groups in the JSON metadata
  metrics.csv                 every step's metrics so far (so a resumed run keeps its history)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from facediffuser import model_dir

MODEL_SUBDIR = "model"
save_model_dir = model_dir.save  # the layout's one writer, under the name the training code calls
STATE_FILE = "training_state.safetensors"


def check_base_dir(base: str | Path, which: str, variant: str | None = None) -> None:
    """Cheap validation before any heavy work: the directories the loader needs exist and hold weights of the
    asked variant (`variant="fp16"`: the hub's `*.fp16.*` files)."""
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(f"base model directory not found: {base}")
    root, unet_folder = model_dir.model_root(base, which)
    shared = model_dir.shared_root(base, which)
    for part in model_dir.SHARED_PARTS:
        if not (shared / part).is_dir():
            raise FileNotFoundError(f"base model {base}: missing {part}/")
    model_dir.check_weights(root / unet_folder, variant)
    for part in model_dir.WEIGHTED_SHARED_PARTS:
        model_dir.check_weights(shared / part, variant)


def load_components(
    base: str | Path | None,
    which: str,
    *,
    tiny: bool = False,
    image_encoder: str | Path | None = None,
    variant: str | None = None,
    log=print,
) -> dict:
    """→ dict(unet, vae, text_encoder, tokenizer, scheduler, subject_encoder) for training `which`, in float32
    whatever the files hold (training keeps fp32 master weights).

    `tiny`: the random CPU test stack. Otherwise `base` is a local directory (see `model_dir.model_root`): one of
    ours, or
    a Stable Diffusion directory as users have it from the hub (`.bin` or `.safetensors`; `variant="fp16"` reads
    its `*.fp16.*` files). When an SDM is trained from a base without `subject_encoder/`, a SubjectEncoder with
    the CLIP ViT-L/14 layout is created; its vision tower comes from `image_encoder` (a
    CLIPVisionModelWithProjection directory, e.g. openai/clip-vit-large-patch14) when given, else it starts random
    (and this is logged).
    """
    import torch
    from diffusers import UNet2DConditionModel

    from facediffuser.prompts import ensure_image_token

    if tiny:
        return _tiny_components(which)
    check_base_dir(base, which, variant)
    base = Path(base)
    root, unet_folder = model_dir.model_root(base, which)
    shared = model_dir.shared_root(base, which)
    parts = model_dir.load_shared_parts(shared, torch_dtype=torch.float32, variant=variant)
    ensure_image_token(parts["tokenizer"])
    parts["unet"] = UNet2DConditionModel.from_pretrained(
        str(root),
        subfolder=unet_folder,
        torch_dtype=torch.float32,
        variant=variant,
        use_safetensors=model_dir.has_safetensors(root / unet_folder, variant),
    )
    parts["subject_encoder"] = None
    if which == model_dir.SDM:
        parts["subject_encoder"] = _subject_encoder(
            base, which, parts["text_encoder"].config.hidden_size, image_encoder, log
        )
    return parts


def _tiny_components(which: str) -> dict:
    """The random CPU test stack with `which`'s UNet as `unet`."""
    from facediffuser.models.tiny import tiny_components

    parts = tiny_components(seed=0)
    unet = parts.pop("sdm_unet" if which == "sdm" else "tdm_unet")
    parts.pop("tdm_unet" if which == "sdm" else "sdm_unet")
    return {**parts, "unet": unet}


def _subject_encoder(base: Path, which: str, text_embed_dim: int, image_encoder: str | Path | None, log):
    """The base's subject_encoder/, or a new one (CLIP ViT-L/14 layout) from `image_encoder` or random."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    from facediffuser.models.subject_encoder import CLIP_VIT_L14, SubjectEncoder

    subject_dir = model_dir.subject_encoder_dir(base, which)
    if subject_dir is not None:
        return SubjectEncoder.from_pretrained(str(subject_dir))
    if image_encoder:
        vision = CLIPVisionModelWithProjection.from_pretrained(str(image_encoder), torch_dtype=torch.float32)
        layout = {key: getattr(vision.config, key) for key in CLIP_VIT_L14}  # the tower's own sizes
        encoder = SubjectEncoder(vision_config=layout, text_embed_dim=text_embed_dim)
        encoder.image_encoder.load_state_dict(vision.state_dict())
        log(f"base {base} has no subject_encoder/: new SubjectEncoder, CLIP vision tower from {image_encoder}")
        return encoder
    log(
        f"base {base} has no subject_encoder/: new SubjectEncoder (CLIP ViT-L/14 layout, random init; "
        "give --image-encoder DIR to start from pretrained CLIP)"
    )
    return SubjectEncoder(vision_config=CLIP_VIT_L14, text_embed_dim=text_embed_dim)


def save_training_state(
    path: str | Path, optimizer: torch.optim.Optimizer, step: int, extra: dict | None = None
) -> None:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    metadata = {
        "step": str(int(step)),
        "param_groups": json.dumps(state["param_groups"]),
        "extra": json.dumps(extra or {}),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_training_state(path: str | Path, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore AdamW state from `save_training_state`'s file; → (step, extra)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    param_groups = json.loads(metadata["param_groups"])
    for group in param_groups:  # JSON turns tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    return int(metadata["step"]), json.loads(metadata["extra"])
