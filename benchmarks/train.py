"""Seconds per training step: the Ray Train loop vs a plain torch loop of the same step and data, one run.

    .venv/bin/python benchmarks/train.py --model sdm --steps 20 --batch-size 2 --resolution 64 --threads 1

Both loops run `facediffuser.training.step.TrainStep` on `ExampleBuilder` batches of the same shards (sample
rows: the astronaut photo + synthetic people, or --data), with the same number of torch threads (--threads: the
plain loop sets it, the Ray Train worker gets that many CPUs and sets it from them). The plain loop builds each
batch inline; the Ray Train worker gets its rows from Ray Data and builds each batch in its collate function
(inline on CPU workers, on Ray Data's prefetch thread on GPU workers). Per-step times come from each loop's own
clock; the first --warmup steps are dropped. The plain loop runs before and after the Ray run and the faster of the
two is the baseline (the conservative choice on a machine whose speed drifts). Prints medians, the ratio Ray / plain
and every input.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_shards(folder: Path, rows: int) -> str:
    import pyarrow.parquet as pq
    from skimage.data import astronaut

    from facediffuser.data.schema import to_table
    from facediffuser.training.sample_rows import sample_records

    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(to_table(sample_records(rows, astronaut())), folder / "part-0.parquet")
    return str(folder)


def plain_loop(config, steps: int) -> tuple[list[float], list[float]]:
    """→ (seconds per step with inline data, seconds per step of the step alone)."""
    import pyarrow.parquet as pq
    import torch

    from facediffuser.training.checkpoint import load_components
    from facediffuser.training.data import DataConfig, ExampleBuilder
    from facediffuser.training.ingest import model_sizes
    from facediffuser.training.step import OptimConfig, TrainingModel, TrainStep, make_optimizer

    torch.set_num_threads(int(config.cpus_per_worker))
    torch.manual_seed(config.seed)
    parts = load_components(config.base, config.model, tiny=config.tiny)
    optim = OptimConfig(lr=config.lr, mixed_precision=config.mixed_precision)
    model = TrainingModel(
        config.model,
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        parts["scheduler"].config,
        parts["subject_encoder"],
        optim,
        seed=config.seed,
    )
    device = torch.device("cuda" if config.use_gpu else "cpu")
    model.to(device).train()
    step = TrainStep(model, make_optimizer(model, optim), optim, device)
    resolution, object_resolution = model_sizes(config.model, config.base, config.tiny, config.resolution)
    builder = ExampleBuilder(
        DataConfig(config.model, resolution=resolution, object_resolution=object_resolution), parts["tokenizer"]
    )
    table = pq.read_table(config.data)
    with_data, step_only = [], []
    position = 0
    for _ in range(steps):
        started = time.perf_counter()
        if position + config.batch_size > table.num_rows:
            position = 0
        batch = {k: torch.from_numpy(v) for k, v in builder(table.slice(position, config.batch_size)).items()}
        position += config.batch_size
        before_step = time.perf_counter()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        ended = time.perf_counter()
        with_data.append(ended - started)
        step_only.append(ended - before_step)
    return with_data, step_only


def ray_loop(config) -> list[float]:
    import csv

    from pipelines.train import train

    [summary] = train([config])
    with open(summary["metrics"], newline="") as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sdm", "tdm"), default="sdm")
    parser.add_argument("--data", default=None, help="shards directory (default: 16 sample rows)")
    parser.add_argument("--base", default=None, help="base model directory (default: the tiny models)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16", "no"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of both loops (CPUs of the Ray worker)")
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="CPUs of the local Ray started here (default: --threads + 2, so the reads and Ray "
        "Data's file listing fit beside the worker)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="facediffuser-train-bench-"))
    data = args.data or make_shards(work / "shards", 16)
    plain_before, ray_steps, ray_wall, plain_after = run_phases(args, bench_config(args, data, work))
    keep = slice(args.warmup, None)
    plain_with_data, plain_step = min((plain_before, plain_after), key=lambda run: statistics.median(run[0][keep]))
    ray_median = statistics.median(ray_steps[keep])
    plain_median = statistics.median(plain_with_data[keep])
    step_median = statistics.median(plain_step[keep])
    report = make_report(args, data, (ray_median, plain_median, step_median), ray_wall, (plain_before, plain_after))
    print(json.dumps(report, indent=2))
    print(
        f"Ray Train {ray_median:.3f} s/step vs plain torch {plain_median:.3f} s/step (data inline; step alone "
        f"{step_median:.3f}): ratio {report['ray_over_plain']:.3f} (target <= 1.10)"
    )


def bench_config(args: argparse.Namespace, data: str, work: Path):
    """The Ray Train run's TrainConfig: one worker with --threads CPUs, one checkpoint at the end."""
    from pipelines.train_config import TrainConfig

    return TrainConfig(
        model=args.model,
        data=str(Path(data).resolve()),
        storage=str(work / "runs"),
        name="bench",
        base=args.base,
        tiny=args.base is None,
        workers=1,
        use_gpu=args.use_gpu,
        cpus_per_worker=float(args.threads),
        data_cpus=0.25,
        max_steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-5,
        checkpoint_every=args.steps,
        mixed_precision=args.mixed_precision,
        resolution=args.resolution,
        max_failures=0,
    )


def run_phases(args: argparse.Namespace, config) -> tuple[tuple, list[float], float, tuple]:
    """The plain loop, the Ray Train run on a local Ray started here, the plain loop again; → (plain before, Ray
    seconds per step, the Ray run's wall seconds, plain after)."""
    import ray

    from cluster.runtime import init_ray
    from pipelines.train_config import TrainConfig

    plain_data = config.data  # the plain loop reads one file; the Ray loop reads the directory
    if Path(config.data).is_dir():
        plain_data = sorted(Path(config.data).glob("*.parquet"))[0]
    plain_config = TrainConfig(**{**config.__dict__, "data": str(plain_data)})
    plain_before = plain_loop(plain_config, args.steps)
    init_ray(num_cpus=args.num_cpus or args.threads + 2)
    started = time.perf_counter()
    ray_steps = ray_loop(config)
    ray_wall = time.perf_counter() - started
    ray.shutdown()
    plain_after = plain_loop(plain_config, args.steps)  # the machine may have drifted: keep the faster baseline
    return plain_before, ray_steps, ray_wall, plain_after


def make_report(args: argparse.Namespace, data: str, medians: tuple, ray_wall: float, plains: tuple) -> dict:
    """The inputs, the medians (Ray, plain with data inline, plain step alone) and their ratios, and both plain
    runs' medians (`plains` = before, after)."""
    ray_median, plain_median, step_median = medians
    keep = slice(args.warmup, None)
    report = {
        "inputs": {
            **{
                k: getattr(args, k)
                for k in (
                    "model",
                    "steps",
                    "warmup",
                    "batch_size",
                    "resolution",
                    "use_gpu",
                    "mixed_precision",
                    "threads",
                )
            },
            "ray_num_cpus": args.num_cpus or args.threads + 2,
            "base": args.base or "tiny",
            "data": data,
            "python": platform.python_version(),
            "device": "cuda" if args.use_gpu else "cpu",
        },
        "seconds_per_step": {
            "ray_train": round(ray_median, 4),
            "plain_torch_inline_data": round(plain_median, 4),
            "plain_torch_step_only": round(step_median, 4),
        },
        "ray_over_plain": round(ray_median / plain_median, 3),
        "ray_over_step_only": round(ray_median / step_median, 3),
        "ray_fit_wall_seconds": round(ray_wall, 1),
        "plain_medians_before_after": [round(statistics.median(run[0][keep]), 4) for run in plains],
    }
    return report


if __name__ == "__main__":
    main()
