"""Serve overhead and batching: the Serve app over real HTTP versus the same pipeline called in-process, one run.

    .venv/bin/python benchmarks/serve.py --tiny                       # CPU, tiny random models (~2.5 min on 2 cores)
    .venv/bin/python benchmarks/serve.py --model DIR --num-gpus 1     # real models on a GPU

Four measurements, interleaved so that a change in machine load hits both sides alike:

1. bare, batch 1: `FaceDiffuserPipeline.__call__` in this process, one image per call (images/s);
2. Serve, batching off (max_batch_size 1), concurrency 1: closed-loop HTTP load on loopback (requests/s);
3. bare, batch 8: one call with `num_images_per_prompt=8` (images/s);
4. Serve, batching on (max_batch_size 8), concurrency 8.

Same models, prompt, reference photo, scheduler (DDIM), steps, guidance, alpha/beta and resolution on both sides;
torch uses the same number of threads in this process and in the Serve replicas. Identity scoring is off in the
requests (the bare pipeline does not score either). Serve requests carry distinct seeds (distinct work).

Targets: (2) >= 0.8x (1) and (4) >= 0.8x (3). The mean formed batch size (requests per snf_denoise call) comes
from the app's own record (GET /v1/stats), as a difference before/after each Serve measurement.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a man <|image|> on a beach"
TARGET = 0.8


def formed_since(before: dict, after: dict) -> dict[int, int]:
    """Formed-batch histogram (requests per snf_denoise call → calls) of what happened between two /v1/stats."""
    old, new = before["sampler"]["formed_batches"], after["sampler"]["formed_batches"]
    diff = {int(k): new[k] - old.get(k, 0) for k in new}
    return {k: v for k, v in sorted(diff.items()) if v}


def mean_size(histogram: dict[int, int]) -> float | None:
    calls = sum(histogram.values())
    return sum(k * v for k, v in histogram.items()) / calls if calls else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model")
    source.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument(
        "--size",
        type=int,
        default=0,
        help="width = height in pixels; 0: 192 with --tiny (big enough that the UNet's compute, not "
        "Python's per-call overhead, dominates a step), else the model's default",
    )
    parser.add_argument("--batch", type=int, default=8, help="bare batch size = Serve concurrency and max_batch_size")
    parser.add_argument("--requests-1", type=int, default=5, help="bare calls / Serve requests at batch 1")
    parser.add_argument("--rounds", type=int, default=2, help="bare batch calls; Serve requests = rounds × batch")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.25)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 2, help="both sides")
    parser.add_argument("--num-gpus", type=float, default=0.0)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs for the local Ray")
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)
    if not args.port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    return args


def bare_pipeline(args: argparse.Namespace, reference):
    """The in-process side: the pipeline loaded here and warmed up; → (bare(count, calls) → its measurement, the
    image side in pixels)."""
    import torch

    from facediffuser.model_loading import load_pipeline

    device = "cuda" if args.num_gpus and torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(args.model, args.tiny).to(device)
    pipe.set_progress_bar_config(disable=True)
    size = args.size or (192 if args.tiny else pipe.sdm_unet.config.sample_size * pipe.vae_scale_factor)
    sampling = dict(num_inference_steps=args.steps, guidance_scale=5.0, alpha=0.3, beta=0.6, height=size, width=size)

    def bare(count: int, calls: int) -> dict:
        started = time.perf_counter()
        for call in range(calls):
            pipe(PROMPT, [reference], num_images_per_prompt=count, seed=1000 + call * count, **sampling)
        seconds = time.perf_counter() - started
        return {
            "calls": calls,
            "batch": count,
            "images": calls * count,
            "seconds": round(seconds, 3),
            "images_per_s": round(calls * count / seconds, 3),
        }

    for count in (1, args.batch):  # warm-up: same shapes, few steps
        pipe(PROMPT, [reference], num_images_per_prompt=count, seed=0, **{**sampling, "num_inference_steps": 2})
    return bare, size


def measure(args: argparse.Namespace, reference_b64: str, size: int, bare) -> dict:
    """The Serve app on a local Ray, and the four measurements interleaved with the bare side (see the top)."""
    import httpx
    import ray
    from ray import serve

    from benchmarks.loadtest import run_load
    from serving.app import start

    config = serve_config(args)
    ray.init(
        address="local",
        num_cpus=args.num_cpus,
        num_gpus=None if args.num_gpus else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        started = time.perf_counter()
        url = start(config)
        print(f"app ready in {time.perf_counter() - started:.1f} s at {url}", flush=True)
        sampler = serve.get_deployment_handle("Sampler", app_name=config.app_name)
        endpoint = url + "/v1/generate"
        payload, warm = payloads(reference_b64, args.steps, size)

        def stats() -> dict:
            return httpx.get(url + "/v1/stats", timeout=60).json()

        def serve_load(batch_size: int, concurrency: int, requests: int) -> dict:
            sampler.configure_batching.remote(batch_size, args.batch_wait_timeout_s).result()
            run_load(endpoint, warm, concurrency=concurrency, requests=concurrency)  # one warm round
            before = stats()
            report = run_load(endpoint, payload, concurrency=concurrency, requests=requests)
            formed = formed_since(before, stats())
            return {
                **report.summary(),
                "max_batch_size": batch_size,
                "formed_batches": formed,
                "mean_formed_batch": round(mean_size(formed), 2) if formed else None,
            }

        run_load(endpoint, warm, concurrency=2, requests=4)  # warm-up: encoder cache, allocator, first calls
        return interleave(args, bare, serve_load)
    finally:
        serve.shutdown()
        ray.shutdown()


def serve_config(args: argparse.Namespace):
    """The app under test: one replica per deployment, no CPU reservations, batching as asked."""
    from serving.settings import ServeConfig

    return ServeConfig(
        model=args.model,
        tiny=args.tiny,
        port=args.port,
        app_name="facediffuser-bench",
        num_gpus=args.num_gpus,
        num_cpus=0,
        encoder_num_cpus=0,
        ingress_num_cpus=0,  # no reservations: the in-process side shares the cores
        torch_threads=args.torch_threads,
        min_replicas=1,
        max_replicas=1,
        max_batch_size=args.batch,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_ongoing_requests=2 * args.batch,
        max_queued_requests=-1,
    )


def payloads(reference_b64: str, steps: int, size: int) -> tuple:
    """→ (the measured requests, the warm-up requests: same shapes, few steps), each `i → request i`."""
    from benchmarks.loadtest import generate_payload

    payload = generate_payload(
        reference_b64,
        steps=steps,
        prompt=PROMPT,
        seed_base=10_000,
        width=size,
        height=size,
        guidance_scale=5.0,
        alpha=0.3,
        beta=0.6,
        identity_scores=False,
    )
    # warm-up rounds: same shapes, few steps
    warm = generate_payload(reference_b64, steps=2, prompt=PROMPT, width=size, height=size, identity_scores=False)
    return payload, warm


def interleave(args: argparse.Namespace, bare, serve_load) -> dict:
    """The four measurements, bare and Serve in turns, so that a change in machine load hits both sides alike."""
    results: dict = {}
    results["bare_1"] = bare(1, args.requests_1)
    print("bare batch 1:", json.dumps(results["bare_1"]), flush=True)
    results["serve_1"] = serve_load(1, 1, args.requests_1)
    print("serve unbatched c=1:", json.dumps(results["serve_1"]), flush=True)
    results["bare_n"] = bare(args.batch, args.rounds)
    print(f"bare batch {args.batch}:", json.dumps(results["bare_n"]), flush=True)
    results["serve_n"] = serve_load(args.batch, args.batch, args.rounds * args.batch)
    print(f"serve batched c={args.batch}:", json.dumps(results["serve_n"]), flush=True)
    return results


def print_report(args: argparse.Namespace, size: int, results: dict) -> tuple[float, float]:
    """The run's settings and the table; → the two ratios (Serve / bare, unbatched and batched)."""
    r1 = results["serve_1"]["requests_per_s"] / results["bare_1"]["images_per_s"]
    rn = results["serve_n"]["requests_per_s"] / results["bare_n"]["images_per_s"]
    n = args.batch
    print(
        f"\nmodel={'tiny' if args.tiny else args.model} steps={args.steps} size={size}x{size} scheduler=ddim "
        f"guidance=5.0 alpha=0.3 beta=0.6 identity_scores=off torch_threads={args.torch_threads} "
        f"ray_cpus={args.num_cpus} gpus={args.num_gpus} replicas=1 batch_wait_timeout_s={args.batch_wait_timeout_s}"
    )
    print(
        f"requests: bare {args.requests_1}x1 and {args.rounds}x{n} images; Serve {results['serve_1']['requests']} at "
        f"concurrency 1 and {results['serve_n']['requests']} at concurrency {n} (after one 2-step warm round each)"
    )
    print("| side | batch / concurrency | images or requests per s | p50 s | mean formed batch | formed batches |")
    print("|---|---|---|---|---|---|")
    print(f"| bare pipeline | batch 1 | {results['bare_1']['images_per_s']:.3f} | | 1 | |")
    s1 = results["serve_1"]
    print(
        f"| Serve, batching off | concurrency 1 | {s1['requests_per_s']:.3f} | {s1['p50_s']:.3f} | "
        f"{s1['mean_formed_batch']} | {s1['formed_batches']} |"
    )
    print(f"| bare pipeline | batch {n} | {results['bare_n']['images_per_s']:.3f} | | {n} | |")
    sn = results["serve_n"]
    print(
        f"| Serve, batching on (max {n}) | concurrency {n} | {sn['requests_per_s']:.3f} | {sn['p50_s']:.3f} | "
        f"{sn['mean_formed_batch']} | {sn['formed_batches']} |"
    )
    print(f"\nServe unbatched c=1 / bare batch 1: {r1:.2f}x (target >= {TARGET}x)")
    print(
        f"Serve batched c={n} / bare batch {n}: {rn:.2f}x (target >= {TARGET}x); "
        f"mean formed batch {sn['mean_formed_batch']} requests"
    )
    return r1, rn


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_started = time.perf_counter()

    import torch
    from PIL import Image
    from skimage.data import astronaut

    torch.set_num_threads(args.torch_threads)
    reference = Image.fromarray(astronaut())
    buffer = io.BytesIO()
    reference.save(buffer, format="PNG")
    reference_b64 = base64.b64encode(buffer.getvalue()).decode()
    bare, size = bare_pipeline(args, reference)
    results = measure(args, reference_b64, size, bare)
    r1, rn = print_report(args, size, results)
    print(f"whole run: {time.perf_counter() - run_started:.0f} s")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {"results": results, "ratios": {"c1": r1, f"c{args.batch}": rn}, "args": vars(args), "size": size},
                indent=2,
            )
        )
    failed = [k for k in ("serve_1", "serve_n") if results[k]["ok"] != results[k]["requests"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
