"""benchmarks/gpu_check.py's phases on the Ray cluster, each through the `facediffuser` command a user runs: serve
under a short HTTP load, preprocess with MTCNN on the GPU, train both models for 5 steps. Each adds its rows to the
check (gpu_check.Check)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu_check_sampler import PROMPT

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(command: list[str], env: dict, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    print("$ " + " ".join(command), flush=True)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def tail(done: subprocess.CompletedProcess, lines: int = 15) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


def start_serve(check, env: dict, model_dir: Path, work: Path) -> tuple[subprocess.Popen, str]:
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


def serve_phase(check, env: dict, model_dir: Path, size: int, steps: int, requests: int, work: Path) -> None:
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


def preprocess_phase(check, env: dict, work: Path) -> Path:
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


def train_phase(check, env: dict, model_dir: Path, data: Path, work: Path, resolution: int) -> None:
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
