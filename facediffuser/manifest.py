"""Provenance written beside every result: package versions and content hashes of model directories."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import platform
from pathlib import Path

PACKAGES = ("facediffuser", "torch", "diffusers", "transformers", "ray", "numpy", "pyarrow", "mediapipe")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def directory_hash(path: str | Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order (streamed; large files are fine).
    Hidden files (e.g. a cache's bookkeeping) are not part of the model."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def module_hash(*modules) -> str:
    """sha256 over the tensors of in-memory modules (for models that have no directory, e.g. --tiny)."""
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sampling_record(
    *,
    scheduler: str,
    steps: int,
    iterations: int,
    guidance_scale: float,
    size,
    boxes,
    subject_scales,
    boundaries: tuple[int, int],
    alpha: float,
    beta: float,
    fusion_steps: list[int],
) -> dict:
    """How the images were sampled: the part of a generation manifest made where the loop ran (the pipeline's
    caller, or the service's sampler replica)."""
    start_merge_step, final_step = boundaries
    return {
        "scheduler": scheduler,
        "steps": steps,
        "iterations": iterations,
        "guidance_scale": guidance_scale,
        "size": list(size),
        "boxes": boxes,
        "subject_scales": subject_scales,
        "boundaries": {
            "start_merge_step": start_merge_step,
            "final_step": final_step,
            "alpha": alpha,
            "beta": beta,
            "fusion_steps": fusion_steps,
        },
    }


def generation_manifest(
    *,
    prompt: str,
    negative_prompt: str | None,
    references,
    reference_mode: str,
    embedding_sha256: list[str],
    seeds: list[int],
    sampling: dict,
    identity_scores,
    seconds: float,
    **extra,
) -> dict:
    """The provenance of generated images, the same for `facediffuser generate` (manifest.json) and the service
    (the response's `manifest`): what was asked, with which photos and seeds, how it was sampled (`sampling`:
    sampling_record plus the model's identity and package versions), the identity scores and the time taken."""
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "references": references,  # per person: the photos (paths in the CLI, sha256 of the bytes in the service)
        "reference_mode": reference_mode,
        "embedding_sha256": embedding_sha256,  # per person: the embedding their photos gave
        "seeds": seeds,
        **sampling,
        "identity_scores": identity_scores,  # per image, per subject; null: no face found
        "identity_metric": "dlib cosine" if identity_scores is not None else None,
        **extra,
        "seconds": round(seconds, 3),
    }


def guard_record(*, thresholds, selection, identity_warnings, candidates, warnings: list[str]) -> dict:
    """The identity guard's part of a generation manifest: the reference checks' thresholds (None: off), best_of /
    min_identity, each image's blend warnings, every candidate sampled (seed, round, scores; so any of them can be
    regenerated) and what went wrong without failing."""
    return {
        "reference_checks": None if thresholds is None else thresholds.as_dict(),
        "selection": None if selection is None or not selection.active else dataclasses.asdict(selection),
        "identity_warnings": identity_warnings,
        "candidates": candidates,
        "warnings": warnings,
    }
