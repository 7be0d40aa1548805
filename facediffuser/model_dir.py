"""The model-directory contract: the one module that knows what a model directory holds (its folder names, as the
constants and functions below), the one writer (`save`), the one reader of its layouts (`resolve`, `kind`,
`model_root`, `shared_root`, `subject_encoder_dir`, `load_shared_parts`) and the model version (`part_hashes`,
`content_version`). Loading a pipeline from one is facediffuser/model_loading.py; mirroring an s3:// one,
facediffuser/model_mirror.py. docs/model-directory.md says the same for users.

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

The model version (`identity`'s "model_version", facediffuser/model_loading.py) is a sha256 over the parts'
content hashes (sdm, tdm or the whole pipeline directory; the same for a local copy and an s3:// copy of one model),
or for --tiny over the weights. Manifests and the Serve app's /v1/info carry it, so two processes can check that
they run one model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

from facediffuser.cache import cache_root, write_atomic
from facediffuser.data import io as dataio
from facediffuser.manifest import directory_hash

SDM, TDM = "sdm", "tdm"
MODELS = (SDM, TDM)
# the folders of one model directory (also `save`'s keyword arguments)
UNET, VAE, TEXT_ENCODER, TOKENIZER, SCHEDULER = "unet", "vae", "text_encoder", "tokenizer", "scheduler"
SUBJECT_ENCODER = "subject_encoder"  # the SDM's only
SHARED_PARTS = (VAE, TEXT_ENCODER, TOKENIZER, SCHEDULER)  # the same in the SDM and the TDM
SD_PARTS = (UNET, *SHARED_PARTS)
MODEL_PARTS = (*SD_PARTS, SUBJECT_ENCODER)
PIPELINE_INDEX = "model_index.json"  # a FaceDiffuserPipeline (or another diffusers pipeline) directory
FINAL = "final"  # a training run's exported Face-diffuser model
EXPORT_NOTE = "export.json"  # in final/: which models were trained

_SAID: set[str] = set()


# ------------------------------------------------------------------------------------------------ writing
def save(
    out_dir: str | Path, which: str, *, unet, vae, text_encoder, tokenizer, scheduler, subject_encoder=None
) -> None:
    """Write the SDM or the TDM as one model directory (the only writer of this layout: training checkpoints,
    the export of an untrained base, `facediffuser import-official` and `FaceDiffuserPipeline.save_model_dir` all
    come here)."""
    if which not in MODELS:
        raise ValueError(f"which must be 'sdm' or 'tdm', got {which!r}")
    if which == SDM and subject_encoder is None:
        raise ValueError("an SDM model directory needs its subject_encoder")
    out = Path(out_dir)
    unet.save_pretrained(out / UNET)
    vae.save_pretrained(out / VAE)
    text_encoder.save_pretrained(out / TEXT_ENCODER)
    tokenizer.save_pretrained(out / TOKENIZER)
    scheduler.save_pretrained(out / SCHEDULER)
    if which == SDM:
        subject_encoder.save_pretrained(out / SUBJECT_ENCODER)


def final_dir(run_dir: str) -> str:
    """STORAGE/NAME → STORAGE/NAME/final (local path or s3:// URI), where a training run exports its models."""
    return dataio.join(run_dir, FINAL)


def final_model_dir(run_dir: str, which: str) -> str:
    """STORAGE/NAME → STORAGE/NAME/final/<which>: the model directory of `which` that a training run exports."""
    return dataio.join(final_dir(run_dir), which)


def run_folder(run_dir: str, which: str) -> str:
    """STORAGE/NAME → STORAGE/NAME/<which>: Ray Train's run folder of `which` (checkpoints, metrics.csv)."""
    return dataio.join(run_dir, which)


def has_unet(model_uri: str) -> bool:
    """A model directory (local or s3://) holds its UNet: `save` has written it."""
    return dataio.exists(dataio.join(model_uri, UNET))


# ------------------------------------------------------------------------------------------------ reading
def resolve(model: str) -> str:
    """A training run directory (`runs/NAME`, holding `final/` beside the Ray run folders) → its `final/`, said
    once per run; any other model directory (local or s3://) is returned as it is."""
    final = final_dir(model)
    if has_unet(dataio.join(model, SDM)) or not dataio.exists(dataio.join(final, EXPORT_NOTE)):
        return model
    if model not in _SAID:
        _SAID.add(model)
        print(f"--model {model}: a training run; using its final models in {final}", flush=True)
    return final


def kind(root: Path) -> str | None:
    """ "pipeline" (a FaceDiffuserPipeline's model_index.json), "stable-diffusion" (another pipeline's, e.g. an
    SD1.5 directory from the hub), "sdm+tdm" (sdm/unet and tdm/unet) or None for a local directory."""
    index = root / PIPELINE_INDEX
    if index.is_file():
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            class_name = None
        return "pipeline" if class_name == "FaceDiffuserPipeline" else "stable-diffusion"
    if all((root / which / UNET).is_dir() for which in MODELS):
        return "sdm+tdm"
    return None


def pipeline_unet(which: str) -> str:
    """The folder of `which`'s UNet in a FaceDiffuserPipeline directory: sdm_unet or tdm_unet."""
    return f"{which}_{UNET}"


def model_root(base: Path, which: str) -> tuple[Path, str]:
    """Where the UNet of `which` lives in `base` → (directory, UNet folder in it): a training export holding sdm/
    and tdm/ (sdm/, unet), a FaceDiffuserPipeline directory (base, sdm_unet) or an SD/model directory (base, unet)."""
    if (base / which / UNET).is_dir():
        return base / which, UNET
    if (base / pipeline_unet(which)).is_dir():
        return base, pipeline_unet(which)
    if (base / UNET).is_dir():
        return base, UNET
    raise FileNotFoundError(f"base model {base}: no {UNET}/ (nor {pipeline_unet(which)}/ or {which}/{UNET}/) directory")


def shared_root(base: Path, which: str) -> Path:
    """The directory holding the shared parts (vae/, text_encoder/, tokenizer/, scheduler/) that go with `which`'s
    UNet in `base`: beside it (a model directory), else `base` itself."""
    root, _ = model_root(base, which)
    return root if (root / VAE).is_dir() else base


def subject_encoder_dir(base: Path, which: str) -> Path | None:
    """`which`'s subject_encoder/ in `base` (beside its UNet, else in `base`), or None when it has none."""
    root, _ = model_root(base, which)
    return next((d for d in (root / SUBJECT_ENCODER, base / SUBJECT_ENCODER) if d.is_dir()), None)


# ------------------------------------------------------------------------------------------------ base directories
WEIGHTED_SHARED_PARTS = (VAE, TEXT_ENCODER)  # the shared parts whose weights may come as variants (hub SD layout)
WEIGHTED_PARTS = (UNET, *WEIGHTED_SHARED_PARTS)
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
    vae_safetensors = has_safetensors(Path(root) / VAE, variant)  # else diffusers logs a failed try before .bin
    root = str(root)
    return dict(
        vae=AutoencoderKL.from_pretrained(
            root, subfolder=VAE, torch_dtype=torch_dtype, variant=variant, use_safetensors=vae_safetensors
        ),
        text_encoder=CLIPTextModel.from_pretrained(
            root, subfolder=TEXT_ENCODER, torch_dtype=torch_dtype, variant=variant
        ),
        tokenizer=CLIPTokenizer.from_pretrained(root, subfolder=TOKENIZER),
        scheduler=load_scheduler(str(Path(root) / SCHEDULER)),
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
    return list(MODELS) if (root / SDM).is_dir() else ["."]


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


def version_mismatch(seen: dict[str, dict]) -> str | None:
    """{"encoder": identity, "sampler": identity, ...} → None when all carry one model_version, else a line
    naming each one's version."""
    versions = {name: (value or {}).get("model_version") for name, value in seen.items()}
    if len(set(versions.values())) == 1 and None not in versions.values():
        return None
    return "the deployments loaded different models: " + ", ".join(
        f"{name} {str(version)[:12]}" for name, version in sorted(versions.items())
    )


def named_hashes(name: str, hashes: dict[str, str]) -> dict[str, str]:
    """Hash keys as manifests name them: the parts under the model directory's own name (final/sdm, or final)."""

    def key(part: str) -> str:
        if not name:
            return part
        return name if part == "." else f"{name}/{part}"

    return {key(part): value for part, value in hashes.items()}


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
