"""SNF sampler cost versus plain classifier-free guidance, in one process.

Both loops use UNets of the same size, the same DDIM schedule and one batched (batch-2) UNet call per model per
step. Runs alternate (plain, snf, plain, snf, ...) so drift on a shared machine hits both; the median of each is
compared with the theoretical ratio 1 + (f − s)/N (METHOD.md §7).

    .venv/bin/python benchmarks/sampler.py [--steps 50 --start 15 --final 30 --width 64 --latent 32 --repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler

from facediffuser.models.tiny import SD15_SCHEDULE, tiny_unet
from facediffuser.sampling import snf_denoise


@torch.no_grad()
def plain_cfg(unet, scheduler, latents, uncond, cond, steps, guidance_scale):
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
        latents = scheduler.step(u + guidance_scale * (c - u), t, latents, return_dict=False)[0]
    return latents


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--start", type=int, default=15)
    parser.add_argument("--final", type=int, default=30)
    parser.add_argument("--width", type=int, default=64, help="UNet base channels (SD1.5: 320)")
    parser.add_argument("--latent", type=int, default=32, help="latent side (512 px images: 64)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    run_plain, run_snf, params = workloads(args)
    run_plain(), run_snf()  # warm-up
    plain_times, snf_times = [], []
    for _ in range(args.repeats):
        for fn, times in ((run_plain, plain_times), (run_snf, snf_times)):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    report(args, statistics.median(plain_times), statistics.median(snf_times), params)


def workloads(args: argparse.Namespace):
    """Both samplers on the same tiny random UNets (seeded): → (plain CFG, snf_denoise, the UNet's parameters in
    millions)."""
    torch.manual_seed(0)
    tdm, sdm = (
        tiny_unet(args.width, cross_attention_dim=64).eval(),
        tiny_unet(args.width, cross_attention_dim=64).eval(),
    )
    null, text, aug = (torch.randn(1, 77, 64) for _ in range(3))
    latents = torch.randn(1, 4, args.latent, args.latent)
    scheduler = DDIMScheduler(**SD15_SCHEDULE)

    def run_plain():
        plain_cfg(sdm, scheduler, latents, text, aug, args.steps, 5.0)

    def run_snf():
        snf_denoise(
            tdm,
            sdm,
            scheduler,
            latents,
            null,
            text,
            aug,
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            start_merge_step=args.start,
            final_step=args.final,
        )

    return run_plain, run_snf, sum(p.numel() for p in sdm.parameters()) / 1e6


def report(args: argparse.Namespace, plain: float, snf: float, params: float) -> None:
    """The inputs, both medians, and the measured ratio against 1 + (f − s)/N."""
    theory = 1 + (args.final - args.start) / args.steps
    ratio = snf / plain
    print(
        f"inputs: DDIM steps={args.steps} s={args.start} f={args.final} unet_width={args.width} "
        f"({params:.1f}M params) latent={args.latent}x{args.latent} repeats={args.repeats} threads={args.threads}"
    )
    print(f"plain CFG median {plain:.3f} s   snf_denoise median {snf:.3f} s")
    print(
        f"measured ratio {ratio:.4f}   theoretical 1+(f-s)/N = {theory:.4f}   "
        f"deviation {100 * (ratio / theory - 1):+.2f}%"
    )


if __name__ == "__main__":
    main()
