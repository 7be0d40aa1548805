"""Preprocessing speed: the Ray Data pipeline vs a plain single-process loop over the same stage functions.

    .venv/bin/python benchmarks/preprocess.py --images 300

Inputs: N photos built from skimage's astronaut (1–3 people side by side, random crops, mirrors and
brightness), JPEG, in a temporary directory. All three runs process the same files with the same stage
functions and write the same shards + rejects:
  plain   one process, one image at a time (facediffuser.data.stages.process_locally), models loaded once
  ray@1   pipelines.preprocess on a local Ray with num_cpus=1
  ray@2   the same with num_cpus=2
"1 CPU" means one core: the plain loop and the whole local Ray of ray@1 (every process it starts inherits the
affinity) are pinned to core 0, since mediapipe's TFLite runtime would otherwise spread over every core it sees;
ray@2 gets cores 0 and 1. Times include model loading (plain) and the stage workers' start-up (Ray), not
`ray.init`. The plain loop runs before and after the Ray runs and the faster of the two is the baseline (run-to-run
spread here is up to 25%). Beside each Ray run: the CPU seconds of its stage workers, and of its other processes
(Ray Data's helper actors, raylet, GCS, this driver) meanwhile, which on one core come straight out of the stage
workers' time.
ray@1 also runs a second time on the same cluster, as a later job on a running cluster would (Ray Data's helper
actors and the worker process are then up already). Targets: ray@1 ≥ 0.85× plain, ray@2 ≥ 1.7× ray@1. The load
average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_inputs(folder: Path, count: int, seed: int = 0) -> None:
    from skimage.data import astronaut

    photo = astronaut()
    rng = np.random.default_rng(seed)
    for index in range(count):
        people = int(rng.integers(1, 4))
        row = np.concatenate([photo if rng.random() < 0.5 else photo[:, ::-1] for _ in range(people)], axis=1)
        top, left = int(rng.integers(0, 40)), int(rng.integers(0, 40))
        row = row[top : top + 470, left : left + 512 * people - 40]
        row = np.clip(row.astype(np.float32) * rng.uniform(0.7, 1.2), 0, 255).astype(np.uint8)
        Image.fromarray(row).save(folder / f"img{index:04d}.jpg", quality=92)


def run_plain(input_dir: str, output_dir: str) -> float:
    import pyarrow.parquet as pq

    from facediffuser.data import preprocess_config, stages, work_items
    from facediffuser.data.faces import make_detector
    from facediffuser.data.masks import PersonSegmenter

    start = time.perf_counter()
    config = preprocess_config.PreprocessConfig(input=input_dir, output=output_dir)
    items = stages.list_image_items(input_dir)
    done = stages.process_locally(items, config, make_detector(config.detector), PersonSegmenter())
    Path(output_dir, "shards").mkdir(parents=True, exist_ok=True)
    Path(output_dir, "rejects").mkdir(parents=True, exist_ok=True)
    pq.write_table(work_items.shard_table(done), Path(output_dir, "shards", "part-0.parquet"))
    pq.write_table(work_items.reject_table(done), Path(output_dir, "rejects", "rejects.parquet"))
    return time.perf_counter() - start


def pinned(cores: int):
    """Pin this process (and so everything it starts) to the first `cores` cores; restores the old set after."""
    import contextlib

    @contextlib.contextmanager
    def scope():
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, set(sorted(before)[:cores]))
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)

    return scope()


def run_ray(input_dir: str, output_dirs: list[str], num_cpus: int) -> list[tuple[float, dict]]:
    """One local Ray with `num_cpus`, and one pipeline run per output dir on it (the first on a fresh cluster,
    the next ones as later jobs on a running cluster would be); → (seconds, manifest) per run."""
    import ray

    from cluster.runtime import init_ray
    from facediffuser.data.preprocess_config import PreprocessConfig
    from pipelines.preprocess import preprocess

    for attempt in range(3):  # on a crowded machine the raylet can miss Ray's fixed 30 s start-up window
        try:
            init_ray(address="local", num_cpus=num_cpus, num_gpus=0)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        return [_timed_run(preprocess, PreprocessConfig(input=input_dir, output=output)) for output in output_dirs]
    finally:
        ray.shutdown()


# the stage workers: a task worker is titled by its task while it runs one and ray::IDLE between; a GPU actor
# is a MapWorker
STAGE_WORKER_TITLES = ("ray::IDLE", "ray::MapBatches", "ray::MapWorker")


def _timed_run(preprocess, config) -> tuple[float, dict]:
    before = process_cpu()
    start = time.perf_counter()
    manifest = preprocess(config)
    elapsed = time.perf_counter() - start
    after = process_cpu()
    spent: dict[str, float] = {}  # by title: processes of one kind add up
    for pid, (title, cpu) in after.items():
        kind = "stage workers" if title.startswith(STAGE_WORKER_TITLES) else title
        spent[kind] = spent.get(kind, 0.0) + cpu - before.get(pid, (title, 0.0))[1]
    manifest["stage_worker_cpu_s"] = round(spent.pop("stage workers", 0.0), 2)
    manifest["other_process_cpu_s"] = {
        title: round(cpu, 2) for title, cpu in sorted(spent.items(), key=lambda item: -item[1]) if cpu >= 0.1
    }
    return elapsed, manifest


def process_cpu() -> dict[int, tuple[str, float]]:
    """pid → (title, user + system CPU seconds) for this process and everything it started that is still alive."""
    import psutil  # installed with accelerate

    me = psutil.Process()
    found = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            args = process.cmdline() or [process.name()]
            # Ray's workers and actors are titled "ray::Name"; its other processes are named by their program
            title = (
                args[0].strip()
                if args[0].startswith("ray::")
                else next((Path(a).name for a in args if a.endswith(".py")), Path(args[0]).name)
            )
            times = process.cpu_times()
            found[process.pid] = ("driver" if process.pid == me.pid else title, times.user + times.system)
        except psutil.Error:
            pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    runs = run_phases(args.images, args.workdir)
    result = make_result(args.images, runs)
    assert runs["ray1"][1]["counts"] == runs["ray2"][1]["counts"], "the two Ray runs disagree"
    print(json.dumps(result, indent=2))


def run_phases(images: int, workdir: str | None) -> dict:
    """The plain loop on 1 core, Ray on 1 core (twice on one cluster), Ray on 2 cores, the plain loop again; → the
    seconds (with each Ray run's manifest) and the load average before and after."""
    with tempfile.TemporaryDirectory(dir=workdir) as work:
        inputs = Path(work, "inputs")
        inputs.mkdir()
        make_inputs(inputs, images)
        load_before = os.getloadavg()[0]
        with pinned(1):
            plain_before = run_plain(str(inputs), str(Path(work, "plain")))
            ray1, (warm1_s, _) = run_ray(str(inputs), [str(Path(work, "ray1")), str(Path(work, "ray1-warm"))], 1)
        with pinned(2):
            (ray2,) = run_ray(str(inputs), [str(Path(work, "ray2"))], 2)
        with pinned(1):
            plain_after = run_plain(str(inputs), str(Path(work, "plain")))
        load_after = os.getloadavg()[0]
    return {
        "plain": (plain_before, plain_after),
        "ray1": ray1,
        "warm1_s": warm1_s,
        "ray2": ray2,
        "load": (load_before, load_after),
    }


def make_result(n: int, runs: dict) -> dict:
    """Throughputs and ratios of `run_phases`' runs over `n` images, with the inputs and the targets."""
    plain_before, plain_after = runs["plain"]
    plain_s = min(plain_before, plain_after)  # the faster plain run: the ratio errs against Ray
    (ray1_s, manifest1), (ray2_s, manifest2), warm1_s = runs["ray1"], runs["ray2"], runs["warm1_s"]
    load_before, load_after = runs["load"]
    return {
        "inputs": {
            "images": n,
            "source": "skimage astronaut, 1-3 people per image, ~470 px high",
            "written": manifest1["counts"]["written"],
            "rejected": manifest1["counts"]["rejected"],
            "detector": "mediapipe",
            "captioner": "template",
            "cpu_count": os.cpu_count(),
            "cores": {"plain": 1, "ray@1": 1, "ray@2": 2},
            "load_average_before_after": [round(load_before, 2), round(load_after, 2)],
        },
        "plain_runs_s": [round(plain_before, 2), round(plain_after, 2)],
        "plain_images_per_s": round(n / plain_s, 2),
        "ray_1cpu_images_per_s": round(n / ray1_s, 2),
        "ray_2cpu_images_per_s": round(n / ray2_s, 2),
        "ray_1cpu_stage_worker_cpu_s": manifest1["stage_worker_cpu_s"],
        "ray_1cpu_other_process_cpu_s": manifest1["other_process_cpu_s"],
        "ray_2cpu_other_process_cpu_s": manifest2["other_process_cpu_s"],
        "ray_1cpu_vs_plain": round(plain_s / ray1_s, 3),
        # the same cluster's second run: Ray Data's helper actors and the stage worker process already up
        "ray_1cpu_second_run_images_per_s": round(n / warm1_s, 2),
        "ray_1cpu_second_run_vs_plain": round(plain_s / warm1_s, 3),
        "ray_2cpu_vs_1cpu": round(ray1_s / ray2_s, 3),
        "targets": {"ray_1cpu_vs_plain": 0.85, "ray_2cpu_vs_1cpu": 1.7},
    }


if __name__ == "__main__":
    main()
