"""The model-directory contract: what a model directory holds, the one writer, the one reader, and how every
command (train, generate, serve, evaluate, demo) turns what the user gave into local files. docs/model-directory.md
says the same for users.

Layout (all weights in safetensors; nothing is pickled):

  one model directory (`save`)    unet/ vae/ text_encoder/ tokenizer/ scheduler/      the diffusers SD layout
                                  + subject_encoder/ for the SDM                       (TDM: plain SD)
  a Face-diffuser model           sdm/ and tdm/, each one model directory              what training exports
  (`load_pipeline` reads either)  or a FaceDiffuserPipeline.save_pretrained directory (model_index.json,
                                  sdm_unet/ tdm_unet/ subject_encoder/ vae/ text_encoder/ tokenizer/ scheduler/)
  a training run (STORAGE/NAME)   final/sdm, final/tdm  the Face-diffuser model the run exported
                                  final/export.json     which of the two were trained (the other: the base)
                                  sdm/, tdm/            Ray Train run folders (checkpoint_*/model/ = one model dir)
                                  `resolve` turns a run directory into its final/.

Any of these may be an s3:// prefix: `facediffuser.model_mirror.mirror` copies it into FACEDIFFUSER_CACHE
(default ~/.cache/facediffuser) under mirrors/<sha256(uri)[:16]>/, content-addressed:

  .lock                 flock: one process at a time checks or mirrors this URI (the others wait, then reuse it)
  index.json            remote listing (keys, sizes, mtimes) → version: an unchanged remote is not downloaded again
  <version>/            a complete copy; <version> is the model version (see `content_version`)
  <version>.json        its per-part hashes
  <version>.lock        loaders hold it shared while reading; an old version is deleted only when nobody does
  .incoming-*/          a download in progress (a unique temp dir, renamed to <version>/ once complete)

Every object key must be a plain relative path below the prefix: a key with `..`, `.`, an empty part or a leading
`/` is refused before anything is written.

The model version (`identity`'s "model_version") is a sha256 over the parts' content hashes (sdm, tdm or the
whole pipeline directory; the same for a local copy and an s3:// copy of one model), or for --tiny over the
weights. Manifests and the Serve app's /v1/info carry it, so two processes can check that they run one model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

from facediffuser.data import io as dataio
from facediffuser.manifest import directory_hash, module_hash

if TYPE_CHECKING:  # torch and diffusers load only when a model does (the CLIs validate before that)
    from facediffuser.pipeline import FaceDiffuserPipeline

MODELS = ("sdm", "tdm")
SHARED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
FINAL = "final"  # a training run's exported Face-diffuser model
EXPORT_NOTE = "export.json"  # in final/: which models were trained

_SAID: set[str] = set()


# ------------------------------------------------------------------------------------------------ writing
def save(out_dir: str | Path, which: str, *, unet, vae, text_encoder, tokenizer, scheduler,
         subject_encoder=None) -> None:
    """Write the SDM or the TDM as one model directory (the only writer of this layout: training checkpoints,
    the export of an untrained base, and `FaceDiffuserPipeline.save_model_dir` all come here)."""
    if which not in MODELS:
        raise ValueError(f"which must be 'sdm' or 'tdm', got {which!r}")
    if which == "sdm" and subject_encoder is None:
        raise ValueError("an SDM model directory needs its subject_encoder")
    out = Path(out_dir)
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    scheduler.save_pretrained(out / "scheduler")
    if which == "sdm":
        subject_encoder.save_pretrained(out / "subject_encoder")


def final_dir(run_dir: str) -> str:
    """STORAGE/NAME → STORAGE/NAME/final (local path or s3:// URI), where a training run exports its models."""
    return dataio.join(run_dir, FINAL)


# ------------------------------------------------------------------------------------------------ reading
def resolve(model: str) -> str:
    """A training run directory (`runs/NAME`, holding `final/` beside the Ray run folders) → its `final/`, said
    once per run; any other model directory (local or s3://) is returned as it is."""
    final = final_dir(model)
    if dataio.exists(dataio.join(model, "sdm", "unet")) or not dataio.exists(dataio.join(final, EXPORT_NOTE)):
        return model
    if model not in _SAID:
        _SAID.add(model)
        print(f"--model {model}: a training run; using its final models in {final}", flush=True)
    return final


def kind(root: Path) -> str | None:
    """"pipeline" (a FaceDiffuserPipeline's model_index.json), "stable-diffusion" (another pipeline's, e.g. an
    SD1.5 directory from the hub), "sdm+tdm" (sdm/unet and tdm/unet) or None for a local directory."""
    index = root / "model_index.json"
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            class_name = None
        return "pipeline" if class_name == "FaceDiffuserPipeline" else "stable-diffusion"
    if all((root / which / "unet").is_dir() for which in MODELS):
        return "sdm+tdm"
    return None


def local_model_dir(model: str) -> Path:
    """A model directory (or a training run's directory, see `resolve`) as a local path; an s3:// prefix is
    mirrored first (`facediffuser.model_mirror.mirror`)."""
    from facediffuser.model_mirror import mirror

    model = resolve(model)
    return mirror(model) if dataio.is_s3(model) else Path(model)


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
        return FaceDiffuserPipeline.from_sdm_and_tdm(root / "sdm", root / "tdm", torch_dtype=torch_dtype)
    if found == "stable-diffusion":
        raise ValueError(f"{model} is a Stable Diffusion directory, not a Face-diffuser model: import the released "
                         f"checkpoints onto it (facediffuser import-official --base {model} --sdm ... --tdm ... --out "
                         "DIR), or train from it (facediffuser train --base ...)")
    raise ValueError(f"{model} is neither a FaceDiffuserPipeline directory (model_index.json) nor holds sdm/ and tdm/")


# ------------------------------------------------------------------------------------------------ base directories
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTED_PARTS = ("unet", "vae", "text_encoder")  # the parts whose weights may come as variants (hub SD layout)
WEIGHT_SUFFIXES = ("safetensors", "bin")


def load_shared_parts(root: str | Path, *, torch_dtype=None, variant: str | None = None) -> dict:
    """vae, text_encoder, tokenizer and scheduler of a model directory or of a Stable Diffusion directory as users
    have it from the hub (model_index.json, safety_checker/ and feature_extractor/ beside, which are not read;
    `.bin` or `.safetensors`; `variant="fp16"` reads `*.fp16.*` files). Weights are cast to `torch_dtype`
    (default float32), whatever dtype the files hold. `.bin` files are read with weights_only (diffusers and
    transformers both do)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from facediffuser.schedulers import load_scheduler

    torch_dtype = torch.float32 if torch_dtype is None else torch_dtype
    vae_safetensors = has_safetensors(Path(root) / "vae", variant)  # else diffusers logs a failed try before .bin
    root = str(root)
    return dict(
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae", torch_dtype=torch_dtype, variant=variant,
                                          use_safetensors=vae_safetensors),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", torch_dtype=torch_dtype,
                                                   variant=variant),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder="tokenizer"),
        scheduler=load_scheduler(root),
    )


def check_base(base: str | Path, variant: str | None = None) -> None:
    """Cheap validation of a Stable Diffusion directory before any weights are read: its parts exist and hold
    weights of the asked variant."""
    base = Path(base)
    if not base.is_dir():
        raise FileNotFoundError(f"base model directory not found: {base}")
    for part in SD_PARTS:
        if not (base / part).is_dir():
            raise FileNotFoundError(f"base model {base}: missing {part}/")
    for part in WEIGHTED_PARTS:
        check_weights(base / part, variant)


def weight_files(folder: Path) -> set[tuple[str | None, str]]:
    """(variant, suffix) of each weight file in `folder`: (None, "safetensors") for model.safetensors,
    ("fp16", "bin") for pytorch_model.fp16.bin, and so on (the one reader of weight file names)."""
    found: set[tuple[str | None, str]] = set()
    for path in folder.iterdir() if folder.is_dir() else ():
        pieces = path.name.split(".")
        if pieces[-1] in WEIGHT_SUFFIXES and len(pieces) in (2, 3):
            found.add((pieces[1] if len(pieces) == 3 else None, pieces[-1]))
    return found


def weight_variants(folder: Path) -> set[str | None]:
    """The variants whose weight files `folder` holds: None for plain files, "fp16" for *.fp16.*, and so on."""
    return {variant for variant, _ in weight_files(folder)}


def has_safetensors(folder: Path, variant: str | None) -> bool:
    return (variant, "safetensors") in weight_files(folder)


def check_weights(folder: Path, variant: str | None) -> None:
    found = weight_variants(folder)
    if variant in found:
        return
    if not found:
        raise FileNotFoundError(f"{folder}: no weights (*.safetensors or *.bin)")
    held = ", ".join(sorted(f"{name} weights" if name else "plain weights" for name in found))
    named = sorted(name for name in found if name)
    hint = f"; pass --variant {named[0]}" if variant is None and named else ""
    raise FileNotFoundError(f"{folder}: no {variant + ' ' if variant else 'plain '}weights (it holds {held}){hint}")


# ------------------------------------------------------------------------------------------------ identity
def parts(root: Path) -> list[str]:
    """The hashed parts of a Face-diffuser model, relative to its root: sdm and tdm, or "." (a pipeline dir)."""
    return list(MODELS) if (root / "sdm").is_dir() else ["."]


def content_version(hashes: dict[str, str]) -> str:
    """The model version: sha256 over each part's relative name and content hash (directory_hash), sorted."""
    digest = hashlib.sha256()
    for part, value in sorted(hashes.items()):
        digest.update(f"{part}\0{value}\n".encode())
    return digest.hexdigest()


def part_hashes(root: Path) -> dict[str, str]:
    """{part: directory_hash} for `parts(root)`; remembered in the cache by the files' names, sizes and mtimes,
    so a second process loading the same files (the Serve encoder beside the sampler) does not read them again."""
    return {part: _cached_directory_hash(root / part) for part in parts(root)}


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


def version_mismatch(seen: dict[str, dict]) -> str | None:
    """{"encoder": identity, "sampler": identity, ...} → None when all carry one model_version, else a line
    naming each one's version."""
    versions = {name: (value or {}).get("model_version") for name, value in seen.items()}
    if len(set(versions.values())) == 1 and None not in versions.values():
        return None
    return "the deployments loaded different models: " + ", ".join(
        f"{name} {str(version)[:12]}" for name, version in sorted(versions.items()))


def named_hashes(name: str, hashes: dict[str, str]) -> dict[str, str]:
    """Hash keys as manifests name them: the parts under the model directory's own name (final/sdm, or final)."""
    def key(part: str) -> str:
        if not name:
            return part
        return name if part == "." else f"{name}/{part}"

    return {key(part): value for part, value in hashes.items()}


def cache_root() -> Path:
    return Path(os.environ.get("FACEDIFFUSER_CACHE", Path.home() / ".cache" / "facediffuser"))


def _cached_directory_hash(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    stats = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(path.resolve()), stats]).encode()).hexdigest()
    memo = cache_root() / "hashes" / f"{key}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads(memo.read_text())["sha256"]
    value = directory_hash(path)
    with contextlib.suppress(OSError):
        write_atomic(memo, json.dumps({"path": str(path), "sha256": value}))
    return value


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
