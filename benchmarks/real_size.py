"""Real Stable Diffusion 1.5 sizes (random weights) on this machine: sampling, a training step, a Serve request.

    .venv/bin/python benchmarks/real_size.py            # full run: 512², 4 steps; training at 512 (else 384, 256)
    .venv/bin/python benchmarks/real_size.py --quick    # smoke test: 256², 1 step; training at 128² only

Models: `facediffuser.models.sd15` (SD1.5's UNet ×2, VAE, CLIP-L text encoder, CLIP ViT-L/14 vision tower and the
post-fuse MLP, at their real sizes, random init; the classes real weights load into). Phases, each in a fresh
subprocess so that its peak RSS is its own (ru_maxrss of the phase's process; for Serve the sum of the RSS of the
phase's process tree, sampled every 0.1 s):

1. pipeline: FaceDiffuserPipeline at --size², --steps DDIM steps (alpha 0.3, beta 0.6: scene, fusion and subject
   steps all occur from 4 steps on), guidance 5, one reference photo (the astronaut). Seconds per denoising
   iteration and per UNet call (forward hooks), encoding and VAE decoding apart.
2. train-sdm, train-tdm: `facediffuser.training.step.TrainStep` (AdamW, clip 1.0; the SDM with the localization
   loss on the real cross-attention maps) with `unet.enable_gradient_checkpointing()`, batch --train-batch-size,
   at the first of --train-resolutions that fits under --memory-limit-gb (a phase over the limit is stopped and
   the next resolution tried). Reports s/step and the memory parts: weights (trained/frozen), gradients,
   AdamW's moments (read from the optimizer), and the rest of the peak (activations, temporaries, the process).
3. serve: the random pipeline is saved with `save_pretrained` to a model directory (phase save-model), then the
   Serve app (`serving.app.start`, --model DIR, one replica per deployment) answers one generate request at
   --size², --steps steps. The response's own timings (encode, denoise) are printed beside the wall time. The
   replicas load the safetensors files memory-mapped, so weights count in RSS once a call has touched them: the
   tree's RSS right after start is below the weights' size, its peak during the request is what the models use.

Run it alone on a quiet machine (load average < 0.5; it prints the load before and after). CPU: fp32 (--dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.real_size_memory import GIB, MEMORY_EXIT  # noqa: E402
from benchmarks.real_size_phases import run_phase  # noqa: E402

PHASES = ("pipeline", "train-sdm", "train-tdm", "serve")


# ------------------------------------------------------------------------------------------------ driver
def child(phase: str, values: dict, log: Path) -> tuple[int, dict | None, float]:
    """Run a phase in a fresh interpreter → (exit status, result or None, wall seconds)."""
    out = Path(tempfile.mkstemp(prefix=f"real-size-{phase}-", suffix=".json")[1])
    values = {**values, "out": str(out)}
    started = time.perf_counter()
    with open(log, "a") as stream:
        stream.write(f"\n===== {phase} {json.dumps(values)}\n")
        stream.flush()
        rc = subprocess.call(
            [sys.executable, __file__, "--phase", phase, "--phase-args", json.dumps(values)],
            stdout=stream,
            stderr=stream,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
    wall = time.perf_counter() - started
    result = json.loads(out.read_text()) if rc == 0 and out.stat().st_size else None
    out.unlink(missing_ok=True)
    return rc, result, wall


def fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: --size 256 --steps 1 --train-resolutions 128 --train-steps 1"
    )
    parser.add_argument("--size", type=int, default=512, help="sampling and Serve: width = height")
    parser.add_argument("--steps", type=int, default=4, help="sampling and Serve: DDIM steps")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="sampling and Serve weights (training keeps fp32 weights)",
    )
    parser.add_argument("--train-resolutions", default="512,384,256", help="tried in this order until one fits")
    parser.add_argument("--train-batch-size", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=2, help="per model; s/step is the last step's")
    parser.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (Ray CPUs for Serve)")
    parser.add_argument(
        "--memory-limit-gb",
        type=float,
        default=0.0,
        help="a phase whose process tree passes this many GiB is stopped (0: 90%% of RAM)",
    )
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where the Serve phase's model directory is written "
        "(default: a temp dir; 9 GB in fp32), removed afterwards",
    )
    parser.add_argument("--log", default=None, help="the phases' own output (default: a temp file)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--phase-args", help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def print_header(args, limit: float, load_before, log: Path) -> None:
    import psutil
    import torch

    print(
        f"real-size benchmark: {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / GIB:.1f} GiB RAM ({psutil.virtual_memory().available / GIB:.1f} "
        f"available), torch {torch.__version__}"
    )
    print(
        f"inputs: size {args.size}² steps {args.steps} (DDIM, guidance 5, alpha 0.3 beta 0.6) dtype {args.dtype}; "
        f"training at {args.train_resolutions} batch {args.train_batch_size} steps {args.train_steps} fp32 AdamW "
        f"gradient checkpointing {'off' if args.no_checkpointing else 'on'}; threads {args.threads}; memory limit "
        f"{limit:.1f} GiB; load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
        f"{'  (NOT QUIET: figures not valid)' if load_before[0] >= 0.5 else ''}"
    )
    print(f"phase output: {log}", flush=True)


def run_train(args, phases: list[str], common: dict, log: Path) -> list[dict]:
    """Each model to train at the first of --train-resolutions that fits under the memory limit → one row each try."""
    rows = []
    for model in [m for m in ("sdm", "tdm") if f"train-{m}" in phases]:
        for resolution in [int(r) for r in args.train_resolutions.split(",")]:
            rc, result, wall = child(
                "train",
                {
                    **common,
                    "model": model,
                    "resolution": resolution,
                    "batch_size": args.train_batch_size,
                    "steps": args.train_steps,
                    "checkpointing": not args.no_checkpointing,
                },
                log,
            )
            fits = "yes" if rc == 0 else ("no: memory limit" if rc in (MEMORY_EXIT, -9) else f"error (rc {rc})")
            rows.append({"model": model, "resolution": resolution, "fits": fits, **(result or {})})
            print(f"train {model} {resolution}²: {fits}, {wall:.0f} s", flush=True)
            if rc not in (MEMORY_EXIT, -9):
                break
    return rows


def run_serve(args, common: dict, log: Path) -> dict:
    """Save the model directory (its own phase), then serve one request from it; the directory is removed."""
    import shutil

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="real-size-model-"))
    model_dir = work / "sd15-random"
    try:
        rc, saved, wall = child("save-model", {**common, "model_dir": str(model_dir), "dtype": args.dtype}, log)
        print(f"save-model: rc {rc}, {wall:.0f} s", flush=True)
        served = None
        if rc == 0:
            rc, served, wall = child(
                "serve",
                {**common, "model_dir": str(model_dir), "size": args.size, "steps": args.steps, "dtype": args.dtype},
                log,
            )
            print(f"serve: rc {rc}, {wall:.0f} s", flush=True)
        return {"save": saved, "serve": served, "rc": rc}
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def print_pipeline_table(args, p: dict) -> None:
    print(
        "| phase | resolution | steps | dtype | threads | build s | encode s | s/step | UNet calls | s/UNet call "
        "| decode s | total s | weights GiB | RSS built GiB | peak RSS GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    if "total_s" in p:
        print(
            f"| pipeline | {args.size}² | {args.steps} (s={p['boundaries'][0]}, f={p['boundaries'][1]}) | "
            f"{args.dtype} | {args.threads} | {fmt(p['build_s'], 1)} | {fmt(p['encode_s'])} | "
            f"{fmt(p['s_per_step'])} | {p['unet_calls']} | {fmt(p['s_per_unet_call'])} | {fmt(p['decode_s'])} "
            f"| {fmt(p['total_s'], 1)} | {fmt(p['weights_gib'])} | {fmt(p['rss_built_gib'])} | "
            f"{fmt(p['peak_rss_gib'])} |"
        )
    else:
        print(f"| pipeline | {args.size}² | {args.steps} | {args.dtype} | {args.threads} | failed (rc {p['rc']}) |")
    print()


def print_train_table(args, rows: list[dict]) -> None:
    print(
        "| model | resolution | batch | grad ckpt | fits | s/step | steps s | trained params | weights trained "
        "/ frozen GiB | grads GiB | AdamW GiB | rest GiB | RSS built GiB | peak RSS GiB | loss (den, loc) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in rows:
        if "step_s" not in t:
            print(
                f"| {t['model']} | {t['resolution']}² | {args.train_batch_size} | "
                f"{'off' if args.no_checkpointing else 'on'} | {t['fits']} | | | | | | | | | | |"
            )
            continue
        last = t["losses"][-1]
        print(
            f"| {t['model']} | {t['resolution']}² | {args.train_batch_size} | "
            f"{'off' if args.no_checkpointing else 'on'} | {t['fits']} | {fmt(t['step_s'][-1], 1)} | "
            f"{', '.join(fmt(s, 1) for s in t['step_s'])} | {t['trained_params'] / 1e6:.1f}M | "
            f"{fmt(t['trained_weights_gib'])} / {fmt(t['frozen_weights_gib'])} | {fmt(t['grads_gib'])} | "
            f"{fmt(t['adamw_moments_gib'])} | {fmt(t['rest_gib'])} | {fmt(t['rss_built_gib'])} | "
            f"{fmt(t['peak_rss_gib'])} | {last['loss_den']:.3f}, {last['loss_loc']:.2e} |"
        )
    print()


def print_serve_table(args, s: dict, log: Path) -> None:
    print(
        "| Serve | resolution | steps | dtype | save s (disk GiB) | app start s | request s | server encode s "
        "| server denoise s | tree RSS after start GiB | tree RSS peak in request GiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    sv, saved = s.get("serve"), s.get("save")
    if sv:
        timings = sv["timings"]
        print(
            f"| one request | {args.size}² | {args.steps} | {args.dtype} | {fmt(saved['save_s'], 1)} "
            f"({fmt(saved['disk_gib'])}) | {fmt(sv['start_s'], 1)} | {fmt(sv['request_s'], 1)} | "
            f"{fmt(timings.get('encode_s'))} | {fmt(timings.get('denoise_s'))} | "
            f"{fmt(sv['tree_rss_resident_gib'])} | {fmt(sv['tree_rss_request_peak_gib'])} |"
        )
    else:
        print(f"| one request | {args.size}² | {args.steps} | {args.dtype} | failed (rc {s['rc']}; see {log}) |")


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.phase:
        return run_phase(args.phase, json.loads(args.phase_args))

    import psutil

    if args.quick:
        args.size, args.steps, args.train_resolutions, args.train_steps = 256, 1, "128", 1
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = set(phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    limit = args.memory_limit_gb or 0.9 * psutil.virtual_memory().total / GIB
    log = Path(args.log or tempfile.mkstemp(prefix="real-size-", suffix=".log")[1])
    common = {"threads": args.threads, "memory_limit_gb": limit}
    load_before = os.getloadavg()
    run_started = time.perf_counter()
    print_header(args, limit, load_before, log)
    results: dict = {"args": vars(args), "load_before": load_before}

    if "pipeline" in phases:
        rc, result, wall = child(
            "pipeline", {**common, "size": args.size, "steps": args.steps, "dtype": args.dtype}, log
        )
        results["pipeline"] = result or {"rc": rc}
        print(f"pipeline: rc {rc}, {wall:.0f} s", flush=True)
    results["train"] = run_train(args, phases, common, log)
    if "serve" in phases:
        results["serve"] = run_serve(args, common, log)

    load_after = os.getloadavg()
    results["load_after"] = load_after
    print(f"\nload average after {load_after[0]:.2f}; whole run {time.perf_counter() - run_started:.0f} s\n")
    p, s = results.get("pipeline"), results.get("serve")
    if p:
        print_pipeline_table(args, p)
    if results["train"]:
        print_train_table(args, results["train"])
    if s:
        print_serve_table(args, s, log)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    failed = (
        (p and "total_s" not in p)
        or any(t["fits"].startswith("error") for t in results["train"])
        or (s and not s.get("serve"))
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
