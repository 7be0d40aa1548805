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
import base64
import gc
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a woman <|image|> on the moon"
GIB = 2**30
MEMORY_EXIT = 75  # a phase's exit status when it stopped itself at the memory limit
PHASES = ("pipeline", "train-sdm", "train-tdm", "serve")


# ------------------------------------------------------------------------------------------------ helpers
def tree_rss(process) -> int:
    """RSS of a process and all its descendants, bytes (shared pages count once per process)."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class MemoryGuard:
    """Samples this process tree's RSS every 0.1 s (keeps the peak); over `limit_gb`, or when the machine has under
    0.5 GiB available, it kills the tree's children (processes this phase started) and exits with MEMORY_EXIT."""

    def __init__(self, limit_gb: float):
        import psutil

        self.limit, self.peak, self.process = limit_gb * GIB, 0, psutil.Process()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        import psutil

        while True:
            rss = tree_rss(self.process)
            self.peak = max(self.peak, rss)
            available = psutil.virtual_memory().available
            if rss > self.limit or available < GIB // 2:
                print(f"memory guard: tree RSS {rss / GIB:.1f} GiB (limit {self.limit / GIB:.1f}), machine has "
                      f"{available / GIB:.1f} GiB available: stopping this phase", file=sys.stderr, flush=True)
                for child in self.process.children(recursive=True):
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass
                os._exit(MEMORY_EXIT)
            time.sleep(0.1)


def max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def nbytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


def reference_photo():
    from PIL import Image
    from skimage.data import astronaut

    return Image.fromarray(astronaut())


# ------------------------------------------------------------------------------------------------ phases (children)
def phase_pipeline(a: dict) -> dict:
    import torch

    from facediffuser.models.sd15 import sd15_pipeline

    started = time.perf_counter()
    pipe = sd15_pipeline(seed=0, torch_dtype=getattr(torch, a["dtype"]))
    pipe.set_progress_bar_config(disable=True)
    build_s, rss_built = time.perf_counter() - started, rss_now()
    weights = nbytes(p for name in ("sdm_unet", "tdm_unet", "vae", "text_encoder", "subject_encoder")
                     for p in getattr(pipe, name).parameters())
    calls: list[tuple[float, float]] = []  # UNet forward (start, end)
    marks: list[float] = []  # end of each denoising iteration

    def pre(module, args):
        calls.append((time.perf_counter(), 0.0))

    def post(module, args, output):
        calls[-1] = (calls[-1][0], time.perf_counter())

    for unet in (pipe.tdm_unet, pipe.sdm_unet):
        unet.register_forward_pre_hook(pre)
        unet.register_forward_hook(post)
    begin = time.perf_counter()
    result = pipe(PROMPT, [reference_photo()], num_inference_steps=a["steps"], guidance_scale=5.0, alpha=0.3,
                  beta=0.6, height=a["size"], width=a["size"], seed=0, output_type="pt",
                  callback=lambda i, n: marks.append(time.perf_counter()))
    end = time.perf_counter()
    assert torch.isfinite(result.images).all(), "non-finite pixels"
    steps = [end_ - start_ for start_, end_ in zip([calls[0][0], *marks[:-1]], marks)]  # first iteration timed from its first call
    unet_s = [e - s for s, e in calls]
    return {
        "build_s": build_s, "encode_s": calls[0][0] - begin, "step_s": steps, "s_per_step": statistics.mean(steps),
        "unet_calls": len(calls), "s_per_unet_call": statistics.median(unet_s), "decode_s": end - marks[-1],
        "total_s": end - begin, "boundaries": [result.start_merge_step, result.final_step],
        "weights_gib": weights / GIB, "rss_built_gib": rss_built / GIB, "peak_rss_gib": max_rss() / GIB,
    }


def phase_train(a: dict) -> dict:
    import torch

    from facediffuser.data.schema import to_table
    from facediffuser.models.sd15 import sd15_components
    from facediffuser.training.data import DataConfig, ExampleBuilder
    from facediffuser.training.sample_rows import sample_records
    from facediffuser.training.step import OptimConfig, TrainingModel, TrainStep, make_optimizer
    from skimage.data import astronaut

    which = a["model"]
    started = time.perf_counter()
    parts = sd15_components(seed=0, share_unet=True)  # one UNet: the one this run trains
    if which == "tdm":
        parts.pop("subject_encoder")
    gc.collect()
    build_s = time.perf_counter() - started
    unet = parts["sdm_unet"]
    if a["checkpointing"]:
        unet.enable_gradient_checkpointing()
    optim = OptimConfig()  # AdamW as trained (METHOD.md §3); fp32 on a CPU (mixed precision applies on CUDA)
    model = TrainingModel(which, unet, parts["vae"], parts["text_encoder"], parts["scheduler"].config,
                          parts.get("subject_encoder"), optim, seed=0).train()
    optimizer = make_optimizer(model, optim)
    step = TrainStep(model, optimizer, optim, torch.device("cpu"))
    builder = ExampleBuilder(DataConfig(which, resolution=a["resolution"], object_resolution=224,
                                        subject_keep_prob=1.0, uncondition_prob=0.0, caption_dropout_prob=0.0),
                             parts["tokenizer"], seed=0)
    batch = {k: torch.from_numpy(v) for k, v in
             builder(to_table(sample_records(a["batch_size"], astronaut()))).items()}
    rss_built = rss_now()
    trained = model.trainable_parameters()
    trained_ids = {id(p) for p in trained}
    frozen = [p for p in model.parameters() if id(p) not in trained_ids]
    times, losses = [], []
    for _ in range(a["steps"]):
        begin = time.perf_counter()
        losses.append(step(batch))
        times.append(time.perf_counter() - begin)
    moments = nbytes(t for state in optimizer.state.values() for t in state.values()
                     if torch.is_tensor(t) and t.dim() > 0)
    peak = max_rss()
    parts_bytes = {"trained_weights": nbytes(trained), "frozen_weights": nbytes(frozen), "grads": nbytes(trained),
                   "adamw_moments": moments}
    return {
        "build_s": build_s, "step_s": times, "losses": losses, "rss_built_gib": rss_built / GIB,
        "peak_rss_gib": peak / GIB, "trained_params": sum(p.numel() for p in trained),
        "frozen_params": sum(p.numel() for p in frozen), **{k + "_gib": v / GIB for k, v in parts_bytes.items()},
        # what the peak holds beyond the process at rest (imports, tokenizer, batch) + weights, grads and moments:
        # activations kept for backward, recomputation, temporaries, the allocator's slack
        "rest_gib": (peak - rss_built - parts_bytes["grads"] - moments) / GIB,
    }


def phase_save_model(a: dict) -> dict:
    import torch

    from facediffuser.models.sd15 import sd15_pipeline

    started = time.perf_counter()
    pipe = sd15_pipeline(seed=0, torch_dtype=getattr(torch, a["dtype"]))
    build_s = time.perf_counter() - started
    started = time.perf_counter()
    pipe.save_pretrained(a["model_dir"])
    size = sum(f.stat().st_size for f in Path(a["model_dir"]).rglob("*") if f.is_file())
    return {"build_s": build_s, "save_s": time.perf_counter() - started, "disk_gib": size / GIB,
            "peak_rss_gib": max_rss() / GIB}


def phase_serve(a: dict, guard: MemoryGuard) -> dict:
    import httpx
    import ray
    from ray import serve

    from serving.app import start
    from serving.settings import ServeConfig

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    buffer = io.BytesIO()
    reference_photo().save(buffer, format="PNG")
    config = ServeConfig(
        model=a["model_dir"], port=port, app_name="facediffuser-real-size", dtype=a["dtype"],
        num_cpus=0, encoder_num_cpus=0, ingress_num_cpus=0, torch_threads=a["threads"],
        min_replicas=1, max_replicas=1, max_batch_size=1,
    )
    ray.init(address="local", num_cpus=a["threads"], num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        url = start(config)
        start_s = time.perf_counter() - started
        time.sleep(2)
        resident = tree_rss(guard.process)
        guard.peak = 0  # from here: the request's peak
        body = {"prompt": PROMPT, "references": [base64.b64encode(buffer.getvalue()).decode()], "seed": 0,
                "steps": a["steps"], "width": a["size"], "height": a["size"], "guidance_scale": 5.0,
                "alpha": 0.3, "beta": 0.6, "identity_scores": False}
        started = time.perf_counter()
        response = httpx.post(url + "/v1/generate", json=body, timeout=None)
        request_s = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"generate answered {response.status_code}: {response.text[:500]}")
        answer = response.json()
        return {"start_s": start_s, "request_s": request_s, "timings": answer["timings"],
                "tree_rss_resident_gib": resident / GIB, "tree_rss_request_peak_gib": guard.peak / GIB}
    finally:
        serve.shutdown()
        ray.shutdown()


def run_phase(argv_phase: str, values: dict) -> int:
    """Child: run one phase, write its result JSON to values['out']."""
    import torch

    torch.set_num_threads(values["threads"])
    guard = MemoryGuard(values["memory_limit_gb"])
    phase = {"pipeline": phase_pipeline, "train": phase_train, "save-model": phase_save_model}.get(argv_phase)
    result = phase_serve(values, guard) if argv_phase == "serve" else phase(values)
    Path(values["out"]).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------ driver
def child(phase: str, values: dict, log: Path) -> tuple[int, dict | None, float]:
    """Run a phase in a fresh interpreter → (exit status, result or None, wall seconds)."""
    out = Path(tempfile.mkstemp(prefix=f"real-size-{phase}-", suffix=".json")[1])
    values = {**values, "out": str(out)}
    started = time.perf_counter()
    with open(log, "a") as stream:
        stream.write(f"\n===== {phase} {json.dumps(values)}\n")
        stream.flush()
        rc = subprocess.call([sys.executable, __file__, "--phase", phase, "--phase-args", json.dumps(values)],
                             stdout=stream, stderr=stream, cwd=str(Path(__file__).resolve().parents[1]))
    wall = time.perf_counter() - started
    result = json.loads(out.read_text()) if rc == 0 and out.stat().st_size else None
    out.unlink(missing_ok=True)
    return rc, result, wall


def fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: --size 256 --steps 1 --train-resolutions 128 --train-steps 1")
    parser.add_argument("--size", type=int, default=512, help="sampling and Serve: width = height")
    parser.add_argument("--steps", type=int, default=4, help="sampling and Serve: DDIM steps")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="sampling and Serve weights (training keeps fp32 weights)")
    parser.add_argument("--train-resolutions", default="512,384,256", help="tried in this order until one fits")
    parser.add_argument("--train-batch-size", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=2, help="per model; s/step is the last step's")
    parser.add_argument("--no-checkpointing", action="store_true", help="train without gradient checkpointing")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="torch threads (Ray CPUs for Serve)")
    parser.add_argument("--memory-limit-gb", type=float, default=0.0,
                        help="a phase whose process tree passes this many GiB is stopped (0: 90%% of RAM)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--work-dir", default=None, help="where the Serve phase's model directory is written "
                        "(default: a temp dir; 9 GB in fp32), removed afterwards")
    parser.add_argument("--log", default=None, help="the phases' own output (default: a temp file)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--phase-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return run_phase(args.phase, json.loads(args.phase_args))

    import psutil
    import torch

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
    print(f"real-size benchmark: {time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / GIB:.1f} GiB RAM ({psutil.virtual_memory().available / GIB:.1f} "
          f"available), torch {torch.__version__}")
    print(f"inputs: size {args.size}² steps {args.steps} (DDIM, guidance 5, alpha 0.3 beta 0.6) dtype {args.dtype}; "
          f"training at {args.train_resolutions} batch {args.train_batch_size} steps {args.train_steps} fp32 AdamW "
          f"gradient checkpointing {'off' if args.no_checkpointing else 'on'}; threads {args.threads}; memory limit "
          f"{limit:.1f} GiB; load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
          f"{'  (NOT QUIET: figures not valid)' if load_before[0] >= 0.5 else ''}")
    print(f"phase output: {log}", flush=True)
    results: dict = {"args": vars(args), "load_before": load_before}

    if "pipeline" in phases:
        rc, result, wall = child("pipeline", {**common, "size": args.size, "steps": args.steps,
                                              "dtype": args.dtype}, log)
        results["pipeline"] = result or {"rc": rc}
        print(f"pipeline: rc {rc}, {wall:.0f} s", flush=True)

    results["train"] = []
    for model in [m for m in ("sdm", "tdm") if f"train-{m}" in phases]:
        for resolution in [int(r) for r in args.train_resolutions.split(",")]:
            rc, result, wall = child("train", {**common, "model": model, "resolution": resolution,
                                               "batch_size": args.train_batch_size, "steps": args.train_steps,
                                               "checkpointing": not args.no_checkpointing}, log)
            fits = "yes" if rc == 0 else ("no: memory limit" if rc in (MEMORY_EXIT, -9) else f"error (rc {rc})")
            results["train"].append({"model": model, "resolution": resolution, "fits": fits, **(result or {})})
            print(f"train {model} {resolution}²: {fits}, {wall:.0f} s", flush=True)
            if rc not in (MEMORY_EXIT, -9):
                break

    if "serve" in phases:
        work = Path(args.work_dir or tempfile.mkdtemp(prefix="real-size-model-"))
        model_dir = work / "sd15-random"
        try:
            rc, saved, wall = child("save-model", {**common, "model_dir": str(model_dir), "dtype": args.dtype}, log)
            print(f"save-model: rc {rc}, {wall:.0f} s", flush=True)
            served = None
            if rc == 0:
                rc, served, wall = child("serve", {**common, "model_dir": str(model_dir), "size": args.size,
                                                   "steps": args.steps, "dtype": args.dtype}, log)
                print(f"serve: rc {rc}, {wall:.0f} s", flush=True)
            results["serve"] = {"save": saved, "serve": served, "rc": rc}
        finally:
            import shutil

            shutil.rmtree(model_dir, ignore_errors=True)
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)

    load_after = os.getloadavg()
    results["load_after"] = load_after
    print(f"\nload average after {load_after[0]:.2f}; whole run {time.perf_counter() - run_started:.0f} s\n")
    p = results.get("pipeline")
    if p:
        print("| phase | resolution | steps | dtype | threads | build s | encode s | s/step | UNet calls | s/UNet call "
              "| decode s | total s | weights GiB | RSS built GiB | peak RSS GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        if "total_s" in p:
            print(f"| pipeline | {args.size}² | {args.steps} (s={p['boundaries'][0]}, f={p['boundaries'][1]}) | "
                  f"{args.dtype} | {args.threads} | {fmt(p['build_s'], 1)} | {fmt(p['encode_s'])} | "
                  f"{fmt(p['s_per_step'])} | {p['unet_calls']} | {fmt(p['s_per_unet_call'])} | {fmt(p['decode_s'])} "
                  f"| {fmt(p['total_s'], 1)} | {fmt(p['weights_gib'])} | {fmt(p['rss_built_gib'])} | "
                  f"{fmt(p['peak_rss_gib'])} |")
        else:
            print(f"| pipeline | {args.size}² | {args.steps} | {args.dtype} | {args.threads} | failed (rc {p['rc']}) |")
        print()
    if results["train"]:
        print("| model | resolution | batch | grad ckpt | fits | s/step | steps s | trained params | weights trained "
              "/ frozen GiB | grads GiB | AdamW GiB | rest GiB | RSS built GiB | peak RSS GiB | loss (den, loc) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for t in results["train"]:
            if "step_s" not in t:
                print(f"| {t['model']} | {t['resolution']}² | {args.train_batch_size} | "
                      f"{'off' if args.no_checkpointing else 'on'} | {t['fits']} | | | | | | | | | | |")
                continue
            last = t["losses"][-1]
            print(f"| {t['model']} | {t['resolution']}² | {args.train_batch_size} | "
                  f"{'off' if args.no_checkpointing else 'on'} | {t['fits']} | {fmt(t['step_s'][-1], 1)} | "
                  f"{', '.join(fmt(s, 1) for s in t['step_s'])} | {t['trained_params'] / 1e6:.1f}M | "
                  f"{fmt(t['trained_weights_gib'])} / {fmt(t['frozen_weights_gib'])} | {fmt(t['grads_gib'])} | "
                  f"{fmt(t['adamw_moments_gib'])} | {fmt(t['rest_gib'])} | {fmt(t['rss_built_gib'])} | "
                  f"{fmt(t['peak_rss_gib'])} | {last['loss_den']:.3f}, {last['loss_loc']:.2e} |")
        print()
    s = results.get("serve")
    if s:
        print("| Serve | resolution | steps | dtype | save s (disk GiB) | app start s | request s | server encode s "
              "| server denoise s | tree RSS after start GiB | tree RSS peak in request GiB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        sv, saved = s.get("serve"), s.get("save")
        if sv:
            timings = sv["timings"]
            print(f"| one request | {args.size}² | {args.steps} | {args.dtype} | {fmt(saved['save_s'], 1)} "
                  f"({fmt(saved['disk_gib'])}) | {fmt(sv['start_s'], 1)} | {fmt(sv['request_s'], 1)} | "
                  f"{fmt(timings.get('encode_s'))} | {fmt(timings.get('denoise_s'))} | "
                  f"{fmt(sv['tree_rss_resident_gib'])} | {fmt(sv['tree_rss_request_peak_gib'])} |")
        else:
            print(f"| one request | {args.size}² | {args.steps} | {args.dtype} | failed (rc {s['rc']}; see {log}) |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    failed = (p and "total_s" not in p) or any(t["fits"].startswith("error") for t in results["train"]) \
        or (s and not s.get("serve"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
