"""The one-command GPU check: everything that needs CUDA, on a machine with one CUDA GPU, in under 8 minutes.

    .venv/bin/python benchmarks/gpu_check.py              # on a machine with one CUDA GPU (the real check)
    .venv/bin/python benchmarks/gpu_check.py --dry-run    # any CPU machine: the plumbing only, no GPU figures

Real-size SD1.5 models at random init (facediffuser/models/sd15.py; no download), saved once as a model directory
that every phase uses. On a one-node Ray cluster started like a user starts one (cluster/local.py,
`--num-gpus 1`):

1. sampler: our FaceDiffuserPipeline against diffusers' StableDiffusionPipeline built on the same TDM UNet, VAE,
   text encoder and DDIM scheduler, fp16, 512², 50 steps, batch 1, in this process: images/s each and the ratio
   (ours runs both UNets in the fusion stage, so below 1 is expected; METHOD.md §5);
2. serve: `facediffuser serve --model DIR --num-gpus 1 --dtype float16` under a short closed-loop HTTP load
   (benchmarks/loadtest.py): requests/s, p50, all answered 200;
3. preprocess: `facediffuser preprocess --num-gpus-per-stage 1 --detector mtcnn` on the sample photos: MTCNN on
   the GPU (an actor pool), counts balanced;
4. train: `facediffuser train --use-gpu` for 5 steps of the TDM, then of the SDM (fp16 autocast, NCCL).

One table at the end (and `--json-out`). `--dry-run` runs the same phases with the tiny models at 64², 4 steps,
on a head plus one worker node declaring a logical GPU, with FACEDIFFUSER_CPU_UNDER_GPU=1 (CPU kernels under the
logical GPU, gloo instead of NCCL): it proves that the script runs, and its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check_cluster import preprocess_phase, serve_phase, train_phase  # noqa: E402
from benchmarks.gpu_check_sampler import build_model, sampler_phase  # noqa: E402

BUDGET_S = 8 * 60


class Check:
    def __init__(self, dry_run: bool):
        self.dry = dry_run
        self.rows: list[dict] = []
        self.started = time.perf_counter()

    def row(self, phase: str, what: str, figure: str, seconds: float, ok: bool, note: str = "") -> None:
        self.rows.append(
            {"phase": phase, "what": what, "figure": figure, "seconds": round(seconds, 1), "ok": ok, "note": note}
        )
        print(
            f"[{time.perf_counter() - self.started:6.0f} s] {phase}: {what}: {figure} "
            f"({'ok' if ok else 'FAILED'}{'; ' + note if note else ''})",
            flush=True,
        )

    def table(self) -> str:
        lines = ["| phase | what | figure | s | ok |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['phase']} | {r['what']} | {r['figure']} | {r['seconds']} | {'yes' if r['ok'] else 'NO'} |"
            for r in self.rows
        ]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU: tiny models, a logical GPU and FACEDIFFUSER_CPU_UNDER_GPU=1; no GPU figures",
    )
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def make_cluster(dry_run: bool):
    from cluster.local import LocalCluster, NodeSpec

    if dry_run:  # a head and one worker node declaring a logical GPU; CPU kernels under it
        return LocalCluster(
            head_cpus=2, workers=[NodeSpec("gpu_node", num_cpus=1, num_gpus=1)], env={"FACEDIFFUSER_CPU_UNDER_GPU": "1"}
        )
    return LocalCluster(head_cpus=max(2, (os.cpu_count() or 4) - 1), head_gpus=1, object_store_bytes=4 * 1024**3)


def cluster_phases(check: Check, dry_run: bool, model_dir: Path, work: Path, sizes: tuple) -> bool:
    """Start the cluster; serve, preprocess and train on it, each on its own (a failure is a row) → any failed."""
    size, steps, _, requests, resolution = sizes
    failed = False
    cluster = make_cluster(dry_run)
    started = time.perf_counter()
    with cluster:
        check.row(
            "setup", "Ray cluster (ray start)", ", ".join(cluster.node_ids()), time.perf_counter() - started, True
        )
        env = cluster.env
        for name, phase in (
            ("serve", lambda: serve_phase(check, env, model_dir, size, steps, requests, work)),
            ("preprocess", lambda: preprocess_phase(check, env, work)),
            ("train", lambda: train_phase(check, env, model_dir, work / "data", work, resolution)),
        ):
            try:
                phase()
            except Exception as exc:
                failed = True
                check.row(name, "phase", "failed", 0, False, f"{type(exc).__name__}: {str(exc)[-500:]}")
    return failed


def report(check: Check, dry_run: bool, total: float, json_out: str | None) -> None:
    print(
        f"\nGPU check{' (DRY RUN: CPU, tiny models, logical GPU; the figures mean nothing)' if dry_run else ''}"
        f" — {total:.0f} s in all (budget {BUDGET_S} s)"
    )
    print(check.table())
    if not dry_run:
        import torch

        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if json_out:
        Path(json_out).write_text(
            json.dumps({"dry_run": dry_run, "total_s": round(total, 1), "rows": check.rows}, indent=2)
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check = Check(args.dry_run)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(
                "gpu_check: torch sees no CUDA GPU here; run it on a GPU machine, or --dry-run for the plumbing",
                file=sys.stderr,
            )
            return 2
    sizes = (64, 4, 1, 4, 64) if args.dry_run else (512, 50, 3, 8, 512)  # size, steps, reps, requests, resolution
    scratch = tempfile.TemporaryDirectory(prefix="gpu-check-") if args.work is None else None
    work = Path(args.work or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    pipe = build_model(check, model_dir)
    failed = False
    try:
        sampler_phase(check, pipe, *sizes[:3])
    except Exception as exc:
        failed = True
        check.row("sampler", "ours vs StableDiffusionPipeline", "failed", 0, False, f"{type(exc).__name__}: {exc}")
    del pipe
    failed = cluster_phases(check, args.dry_run, model_dir, work, sizes) or failed
    total = time.perf_counter() - check.started
    failed = failed or not all(r["ok"] for r in check.rows)
    report(check, args.dry_run, total, args.json_out)
    if scratch is not None:
        scratch.cleanup()
    return 1 if failed or total > BUDGET_S else 0


if __name__ == "__main__":
    raise SystemExit(main())
