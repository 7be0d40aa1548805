"""The answer to /v1/generate (and a job's result): base64 pictures, timings, identity scores and warnings, and the
manifest of what was made and how (facediffuser/manifest.py, the builder `facediffuser generate` uses too)."""

from __future__ import annotations

import base64
import time

from facediffuser.manifest import generation_manifest, guard_record
from facediffuser.prompts import strip_markers
from serving.schema import GenerateRequest, GenerateResponse
from serving.selection import selection_of


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def generate_response(
    body: GenerateRequest, embeds: dict, output: dict, identity: dict, thresholds, started: float, encode_s: float
) -> GenerateResponse:
    """`identity`: {"scores", "warnings": per image} when scored; with best_of / min_identity also "candidates"
    and a "warning" (min_identity not met, or scoring failed). `thresholds`: the reference checks'."""
    total_s = time.perf_counter() - started
    timings = {"encode_s": encode_s, **output["timings"], "total_s": total_s}
    warnings = embeds.get("warnings", []) + ([identity["warning"]] if identity.get("warning") else [])
    manifest = generation_manifest(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        references=embeds["reference_sha256"],
        reference_mode=body.reference_mode,
        embedding_sha256=embeds["embedding_sha256"],
        seeds=output["seeds"],
        sampling=output["manifest"],
        identity_scores=identity.get("scores"),
        seconds=total_s,
        plain_prompt=strip_markers(body.prompt),
        **guard_record(
            thresholds=thresholds,
            selection=selection_of(body.model_dump(include={"best_of", "min_identity", "max_retries"})),
            identity_warnings=identity.get("warnings"),
            candidates=identity.get("candidates"),
            warnings=warnings,
        ),
    )
    return GenerateResponse(
        images=[_b64(png) for png in output["images"]],
        seeds=output["seeds"],
        fusion_masks=_b64(output["fusion_masks"]) if "fusion_masks" in output else None,
        overlays=[_b64(png) for png in output["overlays"]] if "overlays" in output else None,
        batch_size=output["batch_size"],
        batch_requests=output["batch_requests"],
        timings={k: round(v, 4) for k, v in timings.items()},
        manifest=manifest,
        identity_scores=identity.get("scores"),
        identity_warnings=identity.get("warnings"),
        warnings=warnings,
    )
