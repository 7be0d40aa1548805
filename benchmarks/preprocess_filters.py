"""What the preprocessing filters cost per image: the stages with every filter against the same stages with every
filter off, in the same run, on the same photos.

    .venv/bin/python -m benchmarks.preprocess_filters --images 120

Inputs: N astronaut-based photos (benchmarks/preprocess.py's `make_inputs`: 1–3 people, random crops, mirrors and
brightness, ~470 px high), mediapipe, template captions, one core (pinned, as benchmarks/preprocess.py pins).
  stages      `process_locally` over the N photos, filters off (min side, face area, focus 0; duplicates kept) and
              on (the defaults, one hash index over the run); alternated off/on/off/on, the faster of each kept
  per filter  the filter's own work per photo: face focus, the perceptual hash, an index query among 100 000 hashes
  Ray         the run's near-duplicate actor on a local Ray: its start (seeded with 100 000 hashes, as a resumed
              run's) and one `seen?` round trip per photo, which is what each photo pays on Ray
Prints JSON: the per-image milliseconds, the ratio on/off and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.preprocess import make_inputs, pinned  # noqa: E402

OFF = {"min_side": 0, "min_face_percent": 0.0, "min_face_focus": 0.0, "duplicate_distance": -1}


def time_stages(inputs: str, settings: dict, models) -> tuple[float, list[dict]]:
    from facediffuser.data import stages
    from facediffuser.data.preprocess_config import PreprocessConfig

    config = PreprocessConfig(input=inputs, output="-", **settings)
    items = stages.list_image_items(inputs)
    start = time.perf_counter()
    done = stages.process_locally(items, config, *models, progress=False)
    return time.perf_counter() - start, done


def per_filter_ms(inputs: str, repeats: int = 3) -> dict:
    """Each filter's own work per photo, on the stored (resized) photos: focus of one face, the hash, a query."""
    import numpy as np
    from PIL import Image

    from facediffuser.data import dedup, filters

    photos = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(inputs).glob("*.jpg"))]
    face = [174, 68, 278, 172]

    def each(function) -> float:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for photo in photos:
                function(photo)
            best = min(best, time.perf_counter() - start)
        return round(1000 * best / len(photos), 3)

    rng = random.Random(0)
    index = dedup.HashIndex(dedup.DEFAULT_DUPLICATE_DISTANCE)
    for n in range(100_000):
        index.add(f"seed{n}", rng.getrandbits(64))
    hashes = [dedup.perceptual_hash(p) for p in photos]
    start = time.perf_counter()
    for n, value in enumerate(hashes):
        index.nearest(f"q{n}", value)
    query_ms = 1000 * (time.perf_counter() - start) / len(hashes)
    return {
        "face_focus_ms": each(lambda photo: filters.face_focus(photo, face)),
        "perceptual_hash_ms": each(dedup.perceptual_hash),
        "index_query_among_100k_ms": round(query_ms, 3),
    }


def ray_actor_ms(calls: int) -> dict:
    """The near-duplicate actor on a fresh one-CPU local Ray: start (seeded with 100 000 hashes) and round trips."""
    import ray

    from pipelines import preprocess_dedup

    rng = random.Random(1)
    ray.init(address="local", num_cpus=1, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        actor = preprocess_dedup.start_index("bench", 6, {f"seed{n}": rng.getrandbits(64) for n in range(100_000)})
        started_s = time.perf_counter() - start
        ask = preprocess_dedup.AskSeenHashes(actor)
        start = time.perf_counter()
        for n in range(calls):
            ask(f"photo{n}", rng.getrandbits(64))
        round_trip_ms = 1000 * (time.perf_counter() - start) / calls
        preprocess_dedup.stop_index(actor)
    finally:
        ray.shutdown()
    return {"actor_start_s": round(started_s, 2), "round_trip_ms": round(round_trip_ms, 3), "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    args = parser.parse_args()
    from facediffuser.data.faces import make_detector
    from facediffuser.data.masks import PersonSegmenter

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work, pinned(1):
        make_inputs(Path(work), args.images)
        models = (make_detector("mediapipe"), PersonSegmenter())
        time_stages(work, OFF, models)  # warm-up: the models' first calls
        runs = {"off": [], "on": []}
        for name in ("off", "on", "off", "on"):
            seconds, done = time_stages(work, OFF if name == "off" else {}, models)
            runs[name].append(seconds)
            outcome = {"written": sum(not i["stage"] for i in done), "rejected": sum(bool(i["stage"]) for i in done)}
            runs[f"{name}_outcome"] = outcome
        filters_ms = per_filter_ms(work)
        actor = ray_actor_ms(min(2000, 20 * args.images))
    off_s, on_s = min(runs["off"]), min(runs["on"])
    result = {
        "inputs": {
            "images": args.images,
            "source": "skimage astronaut, 1-3 people per image, ~470 px high (benchmarks/preprocess.py)",
            "detector": "mediapipe",
            "captioner": "template",
            "cores": 1,
            "filters_off": OFF,
            "filters_on": "the defaults",
            "outcome_off": runs["off_outcome"],
            "outcome_on": runs["on_outcome"],
            "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "stages_runs_s": {"off": [round(s, 2) for s in runs["off"]], "on": [round(s, 2) for s in runs["on"]]},
        "stages_ms_per_image": {"off": round(1000 * off_s / args.images, 2), "on": round(1000 * on_s / args.images, 2)},
        "filters_ms_per_image": round(1000 * (on_s - off_s) / args.images, 2),
        "on_vs_off": round(on_s / off_s, 3),
        "per_filter": filters_ms,
        "ray_near_duplicate_actor": actor,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
