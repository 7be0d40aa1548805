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
import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
PROMPT = "a man <|image|> on a beach"
BUDGET_S = 8 * 60


class Check:
    def __init__(self, dry_run: bool):
        self.dry = dry_run
        self.rows: list[dict] = []
        self.started = time.perf_counter()

    def row(self, phase: str, what: str, figure: str, seconds: float, ok: bool, note: str = "") -> None:
        self.rows.append({"phase": phase, "what": what, "figure": figure, "seconds": round(seconds, 1), "ok": ok,
                          "note": note})
        print(f"[{time.perf_counter() - self.started:6.0f} s] {phase}: {what}: {figure} "
              f"({'ok' if ok else 'FAILED'}{'; ' + note if note else ''})", flush=True)

    def table(self) -> str:
        lines = ["| phase | what | figure | s | ok |", "|---|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['what']} | {r['figure']} | {r['seconds']} | {'yes' if r['ok'] else 'NO'} |"
                  for r in self.rows]
        return "\n".join(lines)


def run(command: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    print("$ " + " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def tail(done: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------ phases


def build_model(check: Check, model_dir: Path, seed: int = 0):
    """Real-size random SD1.5 components (tiny ones in a dry run), saved as a model directory (fp32: training
    reads it as master weights; serve and the sampler phase cast to fp16)."""
    import torch

    from facediffuser.pipeline import FaceDiffuserPipeline

    started = time.perf_counter()
    if check.dry:
        from facediffuser.models.tiny import tiny_pipeline

        pipe = tiny_pipeline(seed=seed)
    else:
        from facediffuser.models.sd15 import sd15_components

        torch.manual_seed(seed)
        pipe = FaceDiffuserPipeline(**sd15_components(seed))
    pipe.save_pretrained(model_dir)
    check.row("setup", "model directory", "tiny" if check.dry else "SD1.5 sizes, random init",
              time.perf_counter() - started, True, str(model_dir))
    return pipe


def sampler_phase(check: Check, pipe, size: int, steps: int, reps: int) -> None:
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image
    from skimage.data import astronaut

    from facediffuser.schedulers import make_scheduler

    started = time.perf_counter()
    device, dtype = ("cpu", torch.float32) if check.dry else ("cuda", torch.float16)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                 unet=pipe.tdm_unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
                                 safety_checker=None, feature_extractor=None, image_encoder=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    reference = Image.fromarray(astronaut())
    plain = PROMPT.replace(" <|image|>", "")

    def ours(seed: int, n_steps: int):
        pipe(PROMPT, [reference], num_inference_steps=n_steps, guidance_scale=5.0, seed=seed, height=size, width=size)

    def theirs(seed: int, n_steps: int):
        sd(plain, num_inference_steps=n_steps, guidance_scale=5.0, height=size, width=size,
           generator=torch.Generator(device).manual_seed(seed))

    def timed(fn) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for seed in range(reps):
            fn(seed, steps)
        if device == "cuda":
            torch.cuda.synchronize()
        return reps / (time.perf_counter() - t)

    with torch.inference_mode():
        ours(0, 3), theirs(0, 3)  # warm-up: kernels, allocator
        rates = {"theirs": [], "ours": []}
        for _ in range(2):  # interleaved, so a change in load hits both
            rates["theirs"].append(timed(theirs))
            rates["ours"].append(timed(ours))
    ours_rate, sd_rate = max(rates["ours"]), max(rates["theirs"])
    what = f"{'fp32 CPU' if check.dry else 'fp16'} {size}², {steps} DDIM steps, batch 1"
    check.row("sampler", f"StableDiffusionPipeline, same UNet ({what})", f"{sd_rate:.3f} images/s",
              time.perf_counter() - started, True)
    check.row("sampler", "FaceDiffuserPipeline (SNF, both UNets in fusion)", f"{ours_rate:.3f} images/s", 0, True)
    check.row("sampler", "ratio ours / diffusers", f"{ours_rate / sd_rate:.2f}x", 0, True,
              "dry run: not a figure" if check.dry else "")
    sd = None  # noqa: F841  (frees the pipeline object; the modules are shared with ours)
    pipe.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()


def serve_phase(check: Check, env: dict, model_dir: Path, size: int, steps: int, requests: int, work: Path) -> None:
    import httpx
    from skimage.data import astronaut
    from PIL import Image

    from cluster.local import free_port
    from benchmarks.loadtest import generate_payload, run_load

    started = time.perf_counter()
    port = free_port()
    command = [str(BIN / "facediffuser"), "serve", "--model", str(model_dir), "--num-gpus", "1", "--port", str(port),
               "--max-replicas", "1", "--dtype", "float32" if check.dry else "float16"]
    print("$ " + " ".join(command), flush=True)
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"serve exited with {server.returncode}: "
                                   + (work / "serve.log").read_text()[-2000:])
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            raise RuntimeError("serve not ready after 300 s: " + (work / "serve.log").read_text()[-2000:])
        ready = time.perf_counter() - started
        buffer = io.BytesIO()
        Image.fromarray(astronaut()).save(buffer, format="PNG")
        reference = base64.b64encode(buffer.getvalue()).decode()
        payload = generate_payload(reference, steps=steps, prompt=PROMPT, seed_base=100, width=size, height=size,
                                   identity_scores=False)
        run_load(url + "/v1/generate", generate_payload(reference, steps=2, prompt=PROMPT, width=size, height=size,
                                                        identity_scores=False), concurrency=2, requests=2)
        report = run_load(url + "/v1/generate", payload, concurrency=4, requests=requests).summary()
        ok = report["ok"] == report["requests"]
        check.row("serve", f"serve --num-gpus 1, {requests} requests at concurrency 4 ({size}², {steps} steps)",
                  f"{report['requests_per_s']:.3f} requests/s, p50 {report['p50_s']:.2f} s, "
                  f"{report['ok']}/{report['requests']} ok", time.perf_counter() - started, ok, f"ready in {ready:.0f} s")
    finally:
        os.killpg(server.pid, signal.SIGINT)  # the CLI's Ctrl-C: shuts the app down
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def preprocess_phase(check: Check, env: dict, work: Path) -> Path:
    started = time.perf_counter()
    photos, data = work / "photos", work / "data"
    done = run([str(BIN / "facediffuser"), "sample-photos", "--out", str(photos)], env, 300)
    if done.returncode:
        raise RuntimeError(tail(done))
    done = run([str(BIN / "facediffuser"), "preprocess", "--input", str(photos), "--output", str(data),
                "--num-gpus-per-stage", "1", "--detector", "mtcnn"], env, 400)
    if done.returncode:
        check.row("preprocess", "MTCNN on the GPU", "failed", time.perf_counter() - started, False, tail(done, 3))
        return data
    manifest = json.loads((data / "manifest.json").read_text())
    counts = manifest["counts"]
    detect = next(s for s in manifest["stages"] if "detect" in s["stages"])
    balanced = counts["input"] == counts["written"] + counts["rejected"]
    on_gpu = detect.get("num_gpus") == 1 and "actors" in detect
    check.row("preprocess", "--num-gpus-per-stage 1 --detector mtcnn",
              f"{manifest['images_per_s']:.2f} images/s; {counts['input']} in = {counts['written']} written + "
              f"{counts['rejected']} rejected", time.perf_counter() - started, balanced and on_gpu,
              f"detect: {detect.get('actors')} actor(s) × {detect.get('num_gpus')} GPU on "
              + ", ".join(str(n["node_name"]) for n in detect.get("nodes", [])))
    return data


def train_phase(check: Check, env: dict, model_dir: Path, data: Path, work: Path, resolution: int) -> None:
    for model in ("tdm", "sdm"):
        started = time.perf_counter()
        command = [str(BIN / "facediffuser"), "train", "--model", model, "--base", str(model_dir), "--data", str(data),
                   "--storage", str(work / "runs"), "--name", "gpu-check", "--use-gpu", "--workers", "1",
                   "--max-steps", "5", "--checkpoint-every", "5", "--batch-size", "1", "--max-failures", "0",
                   "--resolution", str(resolution)]
        if check.dry:
            command += ["--cpus-per-worker", "0.5", "--data-cpus", "0.25", "--mixed-precision", "no"]
        else:
            command += ["--mixed-precision", "fp16"]
        done = run(command, env, 400)
        text = done.stdout + done.stderr
        steps = re.search(rf"^{model}: (\d+) steps, loss_den ([\d.naninf]+)", text, re.M)
        where = re.search(rf"^{model}: \d+ worker\(s\) on node\(s\) (.*)$", text, re.M)
        ok = done.returncode == 0 and steps is not None and steps.group(1) == "5"
        check.row("train", f"{model}: 5 steps --use-gpu, batch 1, {resolution}²",
                  f"loss_den {steps.group(2)}" if steps else "failed", time.perf_counter() - started, ok,
                  where.group(1) if where else tail(done, 3))


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU: tiny models, a logical GPU and FACEDIFFUSER_CPU_UNDER_GPU=1; no GPU figures")
    parser.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    check = Check(args.dry_run)

    from cluster.local import LocalCluster, NodeSpec

    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA GPU here; run it on a GPU machine, or --dry-run for the plumbing",
                  file=sys.stderr)
            return 2
    size, steps, reps, requests, resolution = (64, 4, 1, 4, 64) if args.dry_run else (512, 50, 3, 8, 512)
    scratch = tempfile.TemporaryDirectory(prefix="gpu-check-") if args.work is None else None
    work = Path(args.work or scratch.name)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    pipe = build_model(check, model_dir)
    failed = False
    try:
        sampler_phase(check, pipe, size, steps, reps)
    except Exception as exc:
        failed = True
        check.row("sampler", "ours vs StableDiffusionPipeline", "failed", 0, False, f"{type(exc).__name__}: {exc}")
    del pipe

    if args.dry_run:  # a head and one worker node declaring a logical GPU; CPU kernels under it
        cluster = LocalCluster(head_cpus=2, workers=[NodeSpec("gpu_node", num_cpus=1, num_gpus=1)],
                               env={"FACEDIFFUSER_CPU_UNDER_GPU": "1"})
    else:
        cluster = LocalCluster(head_cpus=max(2, (os.cpu_count() or 4) - 1), head_gpus=1,
                               object_store_bytes=4 * 1024 ** 3)
    started = time.perf_counter()
    with cluster:
        check.row("setup", "Ray cluster (ray start)", ", ".join(cluster.node_ids()), time.perf_counter() - started, True)
        env = cluster.env
        for name, phase in (("serve", lambda: serve_phase(check, env, model_dir, size, steps, requests, work)),
                            ("preprocess", lambda: preprocess_phase(check, env, work)),
                            ("train", lambda: train_phase(check, env, model_dir, work / "data", work, resolution))):
            try:
                phase()
            except Exception as exc:
                failed = True
                check.row(name, "phase", "failed", 0, False, f"{type(exc).__name__}: {str(exc)[-500:]}")
    total = time.perf_counter() - check.started
    failed = failed or not all(r["ok"] for r in check.rows)
    print(f"\nGPU check{' (DRY RUN: CPU, tiny models, logical GPU; the figures mean nothing)' if args.dry_run else ''}"
          f" — {total:.0f} s in all (budget {BUDGET_S} s)")
    print(check.table())
    if not args.dry_run:
        import torch

        print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"dry_run": args.dry_run, "total_s": round(total, 1),
                                                   "rows": check.rows}, indent=2))
    if scratch is not None:
        scratch.cleanup()
    return 1 if failed or total > BUDGET_S else 0


if __name__ == "__main__":
    raise SystemExit(main())
