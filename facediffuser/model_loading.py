"""Loading a Face-diffuser model from what the user gave (--model DIR, an s3:// prefix, a training run's directory,
or --tiny), and naming what was loaded (`identity`: the model version manifests and /v1/info carry).

Above the layout (facediffuser/model_dir.py: what a model directory holds, `resolve`, the hashes), the s3:// mirror
(facediffuser/model_mirror.py) and the pipeline; none of them imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from facediffuser.data import io as dataio
from facediffuser.manifest import module_hash
from facediffuser.model_dir import SDM, TDM, content_version, kind, named_hashes, part_hashes, resolve

if TYPE_CHECKING:  # torch and diffusers load only when a model does (the CLIs validate before that)
    from facediffuser.pipeline import FaceDiffuserPipeline


def load_pipeline(model: str | None = None, tiny: bool = False, torch_dtype=None) -> "FaceDiffuserPipeline":
    """A model directory (local or s3://, or a training run's directory) → pipeline. Accepts a saved
    FaceDiffuserPipeline (model_index.json) or a directory holding `sdm/` and `tdm/` (what training writes).
    `tiny=True` builds the CPU test stack; `torch_dtype` defaults to float32. A mirrored model is read under its
    version's shared lock, and the pipeline remembers that version for `identity`."""
    if tiny:
        from facediffuser.models.tiny import tiny_pipeline

        return tiny_pipeline()
    if not model:
        raise ValueError("give --model DIR (or --tiny for the small random test models)")
    from facediffuser.model_mirror import mirrored

    resolved = resolve(model)
    if not dataio.is_s3(resolved):
        return _from_root(Path(resolved), model, torch_dtype)
    with mirrored(resolved) as copy:
        pipe = _from_root(copy.root, model, torch_dtype)
    pipe._model_dir_identity = {"model": str(model), "hashes": copy.named_hashes(), "model_version": copy.version}
    return pipe


def _from_root(root: Path, model: str, torch_dtype) -> "FaceDiffuserPipeline":
    import torch

    from facediffuser.pipeline import FaceDiffuserPipeline

    torch_dtype = torch.float32 if torch_dtype is None else torch_dtype
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    found = kind(root)
    if found == "pipeline":
        return FaceDiffuserPipeline.from_pretrained(str(root), torch_dtype=torch_dtype)
    if found == "sdm+tdm":
        return FaceDiffuserPipeline.from_sdm_and_tdm(root / SDM, root / TDM, torch_dtype=torch_dtype)
    if found == "stable-diffusion":
        raise ValueError(
            f"{model} is a Stable Diffusion directory, not a Face-diffuser model: import the released "
            f"checkpoints onto it (facediffuser import-official --base {model} --sdm ... --tdm ... --out "
            "DIR), or train from it (facediffuser train --base ...)"
        )
    raise ValueError(f"{model} is neither a FaceDiffuserPipeline directory (model_index.json) nor holds sdm/ and tdm/")


def identity(pipe: "FaceDiffuserPipeline", model: str | None) -> dict:
    """{"model", "hashes", "model_version"} for manifests: what `pipe` was loaded from. Hash keys name the parts
    under the model directory's own name (e.g. final/sdm), as the manifests always did."""
    if not model:
        value = module_hash(pipe.sdm_unet, pipe.tdm_unet, pipe.subject_encoder)
        return {"model": "tiny", "hashes": {"tiny": value}, "model_version": value}
    known = getattr(pipe, "_model_dir_identity", None)
    if known and known["model"] == str(model):
        return dict(known)
    resolved = resolve(model)
    if dataio.is_s3(resolved):
        from facediffuser.model_mirror import mirrored

        with mirrored(resolved) as copy:
            return {"model": str(model), "hashes": copy.named_hashes(), "model_version": copy.version}
    root = Path(resolved)
    hashes = part_hashes(root)
    return {"model": str(model), "hashes": named_hashes(root.name, hashes), "model_version": content_version(hashes)}
