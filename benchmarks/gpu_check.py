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

from benchmarks.gpu_check_sampler import PROMPT, build_model, sampler_phase  # noqa: E402

BIN = Path(sys.executable).parent
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


def run(command: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    print("$ " + " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def tail(done: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------ phases


def start_serve(check: Check, env: dict, model_dir: Path, work: Path) -> tuple[subprocess.Popen, str]:
    """`facediffuser serve --num-gpus 1` in its own process group, logging to work/serve.log → (process, URL)."""
    from cluster.local import free_port

    port = free_port()
    command = [
        str(BIN / "facediffuser"),
        "serve",
        "--model",
        str(model_dir),
        "--num-gpus",
        "1",
        "--port",
        str(port),
        "--max-replicas",
        "1",
        "--dtype",
        "float32" if check.dry else "float16",
    ]
    print("$ " + " ".join(command), flush=True)
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    return server, f"http://127.0.0.1:{port}"


def wait_healthy(server: subprocess.Popen, url: str, work: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"serve exited with {server.returncode}: " + (work / "serve.log").read_text()[-2000:])
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"serve not ready after {timeout:.0f} s: " + (work / "serve.log").read_text()[-2000:])


def stop_serve(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGINT)  # the CLI's Ctrl-C: shuts the app down
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def serve_phase(check: Check, env: dict, model_dir: Path, size: int, steps: int, requests: int, work: Path) -> None:
    from PIL import Image
    from skimage.data import astronaut

    from benchmarks.loadtest import generate_payload, run_load

    started = time.perf_counter()
    server, url = start_serve(check, env, model_dir, work)
    try:
        wait_healthy(server, url, work)
        ready = time.perf_counter() - started
        buffer = io.BytesIO()
        Image.fromarray(astronaut()).save(buffer, format="PNG")
        reference = base64.b64encode(buffer.getvalue()).decode()
        payload = generate_payload(
            reference, steps=steps, prompt=PROMPT, seed_base=100, width=size, height=size, identity_scores=False
        )
        run_load(
            url + "/v1/generate",
            generate_payload(reference, steps=2, prompt=PROMPT, width=size, height=size, identity_scores=False),
            concurrency=2,
            requests=2,
        )
        report = run_load(url + "/v1/generate", payload, concurrency=4, requests=requests).summary()
        ok = report["ok"] == report["requests"]
        check.row(
            "serve",
            f"serve --num-gpus 1, {requests} requests at concurrency 4 ({size}², {steps} steps)",
            f"{report['requests_per_s']:.3f} requests/s, p50 {report['p50_s']:.2f} s, "
            f"{report['ok']}/{report['requests']} ok",
            time.perf_counter() - started,
            ok,
            f"ready in {ready:.0f} s",
        )
    finally:
        stop_serve(server)


def preprocess_phase(check: Check, env: dict, work: Path) -> Path:
    started = time.perf_counter()
    photos, data = work / "photos", work / "data"
    done = run([str(BIN / "facediffuser"), "sample-photos", "--out", str(photos)], env, 300)
    if done.returncode:
        raise RuntimeError(tail(done))
    done = run(
        [
            str(BIN / "facediffuser"),
            "preprocess",
            "--input",
            str(photos),
            "--output",
            str(data),
            "--num-gpus-per-stage",
            "1",
            "--detector",
            "mtcnn",
        ],
        env,
        400,
    )
    if done.returncode:
        check.row("preprocess", "MTCNN on the GPU", "failed", time.perf_counter() - started, False, tail(done, 3))
        return data
    manifest = json.loads((data / "manifest.json").read_text())
    counts = manifest["counts"]
    detect = next(s for s in manifest["stages"] if "detect" in s["stages"])
    balanced = counts["input"] == counts["written"] + counts["rejected"]
    on_gpu = detect.get("num_gpus") == 1 and "actors" in detect
    check.row(
        "preprocess",
        "--num-gpus-per-stage 1 --detector mtcnn",
        f"{manifest['images_per_s']:.2f} images/s; {counts['input']} in = {counts['written']} written + "
        f"{counts['rejected']} rejected",
        time.perf_counter() - started,
        balanced and on_gpu,
        f"detect: {detect.get('actors')} actor(s) × {detect.get('num_gpus')} GPU on "
        + ", ".join(str(n["node_name"]) for n in detect.get("nodes", [])),
    )
    return data


def train_phase(check: Check, env: dict, model_dir: Path, data: Path, work: Path, resolution: int) -> None:
    for model in ("tdm", "sdm"):
        started = time.perf_counter()
        command = [
            str(BIN / "facediffuser"),
            "train",
            "--model",
            model,
            "--base",
            str(model_dir),
            "--data",
            str(data),
            "--storage",
            str(work / "runs"),
            "--name",
            "gpu-check",
            "--use-gpu",
            "--workers",
            "1",
            "--max-steps",
            "5",
            "--checkpoint-every",
            "5",
            "--batch-size",
            "1",
            "--max-failures",
            "0",
            "--resolution",
            str(resolution),
        ]
        if check.dry:
            command += ["--cpus-per-worker", "0.5", "--data-cpus", "0.25", "--mixed-precision", "no"]
        else:
            command += ["--mixed-precision", "fp16"]
        done = run(command, env, 400)
        text = done.stdout + done.stderr
        steps = re.search(rf"^{model}: (\d+) steps, loss_den ([\d.naninf]+)", text, re.M)
        where = re.search(rf"^{model}: \d+ worker\(s\) on node\(s\) (.*)$", text, re.M)
        ok = done.returncode == 0 and steps is not None and steps.group(1) == "5"
        check.row(
            "train",
            f"{model}: 5 steps --use-gpu, batch 1, {resolution}²",
            f"loss_den {steps.group(2)}" if steps else "failed",
            time.perf_counter() - started,
            ok,
            where.group(1) if where else tail(done, 3),
        )


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
