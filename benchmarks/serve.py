"""Serve throughput and latency with request batching on vs. off, in one run, on the same warm replicas.

    .venv/bin/python benchmarks/serve.py --tiny                       # CPU, tiny random models
    .venv/bin/python benchmarks/serve.py --model DIR --num-gpus 1     # real models on a GPU

For each mode (batching off = max_batch_size 1, then on) and each concurrency (1, 4, 8), a bounded closed-loop
load over loopback HTTP (serving/loadtest.py) measures requests/s and p50/p99 latency. The app runs one
sampler replica (autoscaling pinned) so that only batching differs. Prints a table and the ratio
batched/unbatched requests/s at the highest concurrency (target ≥ 2).
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model")
    source.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=4, help="requests = this × concurrency (min 8)")
    parser.add_argument("--batch-size", type=int, default=8, help="max_batch_size when batching is on")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    parser.add_argument("--num-gpus", type=float, default=0.0)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2, help="CPUs for the local Ray")
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="0: a free port")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args(argv)

    import numpy as np
    import ray
    from PIL import Image
    from ray import serve
    from skimage.data import astronaut

    from serving.app import ServeConfig, start
    from serving.loadtest import generate_payload, run_load

    top = max(args.concurrency)
    if not args.port:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    config = ServeConfig(
        model=args.model, tiny=args.tiny, port=args.port, app_name="facediffuser-bench", num_gpus=args.num_gpus,
        num_cpus=0.5 if not args.num_gpus else 1.0, encoder_num_cpus=0.25, ingress_num_cpus=0.1,
        torch_threads=args.torch_threads, min_replicas=1, max_replicas=1,
        max_batch_size=args.batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_ongoing_requests=max(2 * top, args.batch_size), max_queued_requests=-1,
    )
    ray.init(address="local", num_cpus=args.num_cpus, num_gpus=None if args.num_gpus else 0,
             include_dashboard=False, log_to_driver=False)
    try:
        started = time.perf_counter()
        url = start(config)
        print(f"app ready in {time.perf_counter() - started:.1f} s at {url}", flush=True)
        buffer = io.BytesIO()
        Image.fromarray(astronaut()).save(buffer, format="PNG")
        payload = generate_payload(base64.b64encode(buffer.getvalue()).decode(), steps=args.steps)
        sampler = serve.get_deployment_handle("Sampler", app_name=config.app_name)
        endpoint = url + "/v1/generate"
        run_load(endpoint, payload, concurrency=2, requests=4)  # warm-up: caches, allocator, first-call costs

        rows = []
        for mode, batch_size in (("unbatched", 1), ("batched", args.batch_size)):
            sampler.configure_batching.remote(batch_size, args.batch_wait_timeout_s).result()
            for concurrency in args.concurrency:
                requests = max(8, args.requests_per_client * concurrency)
                report = run_load(endpoint, payload, concurrency=concurrency, requests=requests)
                row = {"mode": mode, **report.summary()}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    def rate(mode, concurrency):
        return next(r["requests_per_s"] for r in rows if r["mode"] == mode and r["concurrency"] == concurrency)

    print(f"\nmodel={'tiny' if args.tiny else args.model} steps={args.steps} size=default scheduler=ddim "
          f"replicas=1 max_batch_size={args.batch_size} batch_wait={args.batch_wait_timeout_s}s "
          f"ray_cpus={args.num_cpus} gpus={args.num_gpus}")
    print("| mode | concurrency | requests | req/s | p50 s | p99 s | mean batch |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['p50_s']:.3f} | "
              f"{r['p99_s']:.3f} | {r['mean_batch_size']} |")
    ratio = rate("batched", top) / rate("unbatched", top)
    print(f"\nbatched / unbatched throughput at concurrency {top}: {ratio:.2f}x (target >= 2x)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "ratio": ratio, "args": vars(args)}, indent=2))
    failed = [r for r in rows if r["ok"] != r["requests"]]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
