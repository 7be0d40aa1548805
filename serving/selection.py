"""best_of and min_identity in the service: rounds of candidates from the sampler, each scored by the encoder's
identity scoring, picked by the library's CandidatePool (facediffuser/best_of.py, the same rule as the pipeline),
then the chosen images' parts of each round's output joined into one output. No Ray imports: the ingress passes its
own `call` (which turns a dead replica into a 503) and the deployment handles.
"""

from __future__ import annotations

import io

from PIL import Image

from facediffuser.best_of import Candidate, CandidatePool, Selection
from facediffuser.images import png_bytes
from facediffuser.visualize import grid_rows
from serving.errors import RequestError

SUMMED_TIMINGS = ("queue_s", "denoise_s", "decode_s")  # every round's, added up


def selection_of(request: dict) -> Selection:
    return Selection(request["best_of"], request["min_identity"], request["max_retries"])


async def sample_best(call, sampler, encoder, request: dict, embeds: dict, references: list, job_id) -> tuple:
    """→ (the sampler's output for the chosen images, best first; {"scores", "warnings": per chosen image,
    "candidates": every candidate in sampling order, "warning": min_identity's, or None}).

    Identity scores decide here, so a scoring failure fails the request (500 with the encoder's error id)."""
    pool = CandidatePool(request["num_images"], request["seed"], selection_of(request))
    outputs: list[dict] = []
    while (next_round := pool.next_round()) is not None:
        seed, count = next_round
        output = await call(sampler.submit, {**request, "seed": seed, "num_images": count}, embeds, job_id)
        if "error" in output:
            raise RequestError(*output["error"])
        scored = await call(encoder.identity_scores, output["images"], references)
        if "error_id" in scored:
            raise RequestError(
                500,
                "internal",
                f"identity scoring failed (error id {scored['error_id']}); best_of and min_identity need it",
                scored["error_id"],
            )
        candidates = [
            Candidate(seed, 0, similarities, weakest, warnings)
            for seed, similarities, weakest, warnings in zip(
                output["seeds"], scored["scores"], scored["weakest"], scored["warnings"]
            )
        ]
        pool.add([(len(outputs), index) for index in range(count)], candidates)
        outputs.append(output)
    picks, chosen, every, warning = pool.result()
    identity = {
        "scores": [c.similarities for c in chosen],
        "warnings": [c.warnings for c in chosen],
        "candidates": [c.as_dict() for c in every],
        "warning": warning,
    }
    return joined(outputs, picks), identity


def joined(outputs: list[dict], picks: list[tuple[int, int]]) -> dict:
    """One output of the picked (round, image) pairs: their images, seeds, overlays and fusion-mask rows; the
    rounds' queue, denoise and decode times added up; the last round's batch and sampling record."""
    last = outputs[-1]
    output = {
        **last,
        "images": [outputs[r]["images"][i] for r, i in picks],
        "seeds": [outputs[r]["seeds"][i] for r, i in picks],
        "timings": {
            **last["timings"],
            **{key: sum(o["timings"].get(key, 0.0) for o in outputs) for key in SUMMED_TIMINGS},
        },
    }
    if "overlays" in last:
        output["overlays"] = [outputs[r]["overlays"][i] for r, i in picks]
    if "fusion_masks" in last:
        grids = [Image.open(io.BytesIO(o["fusion_masks"])) for o in outputs]
        output["fusion_masks"] = png_bytes(grid_rows([(grids[r], i) for r, i in picks]))
    return output
