"""Cost of a live preview (fixed linear latent → RGB map, PNG, fusion mask PNG) against a denoising step and a VAE
decode.

In one process, alternating, at 64×64 latents (a 512² image), batch 1:
- step: one fusion-stage iteration of `snf_denoise` (both UNets, CFG pairs, mask, scheduler step), measured as a
  whole all-fusion call of `--steps` iterations divided by the iterations;
- preview: what the server sends every k steps: `preview_images` (×2 nearest) → PNG bytes, plus the mean of the
  fusion masks so far → grayscale PNG bytes;
- VAE decode: the same latents through a VAE decoder (the preview a VAE would give; the baseline).
UNets and VAE are the tiny random-init ones (`--width` sets the UNet's base channels; SD1.5's is 320), so a real
UNet step is far dearer and the real preview/step ratio far smaller than printed here.

    .venv/bin/python benchmarks/preview.py [--latent 64 --steps 2 --width 32 --repeats 3 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import DDIMScheduler

from facediffuser.images import png_bytes
from facediffuser.models.tiny import SD15_SCHEDULE, tiny_unet, tiny_vae
from facediffuser.preview import mask_image, mask_so_far, preview_images
from facediffuser.sampling import snf_denoise


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=64, help="latent side (512 px images: 64)")
    parser.add_argument("--steps", type=int, default=2, help="iterations per timed snf_denoise call (all fusion)")
    parser.add_argument("--width", type=int, default=32, help="UNet base channels (tiny: 32, SD1.5: 320)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    denoise, preview, decode, params = workloads(args)
    denoise(), preview(), decode()  # warm-up
    steps, previews, decodes = [], [], []
    for _ in range(args.repeats):
        steps.append(timed(denoise) / args.steps)
        previews.append(timed(preview))
        decodes.append(timed(decode))
    report(args, *(statistics.median(x) for x in (steps, previews, decodes)), params)


def workloads(args: argparse.Namespace):
    """The three timed calls on tiny random models (seeded): → (denoise, preview, decode, the UNet's parameters
    in millions)."""
    torch.manual_seed(0)
    tdm, sdm = (
        tiny_unet(args.width, sample_size=args.latent).eval(),
        tiny_unet(args.width, sample_size=args.latent).eval(),
    )
    vae = tiny_vae(sample_size=args.latent * 8).eval()
    null, text, aug = (torch.randn(1, 77, 32) for _ in range(3))
    latents = torch.randn(1, 4, args.latent, args.latent)
    masks = [(torch.rand(1, 1, args.latent, args.latent) > 0.5).float() for _ in range(10)]

    def denoise():
        snf_denoise(
            tdm,
            sdm,
            DDIMScheduler(**SD15_SCHEDULE),
            latents,
            null,
            text,
            aug,
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            start_merge_step=-1,
            final_step=args.steps - 1,
        )

    def preview():
        png_bytes(preview_images(latents)[0])
        png_bytes(mask_image(mask_so_far([m[0] for m in masks])))

    @torch.no_grad()
    def decode():
        vae.decode(latents / vae.config.scaling_factor)

    return denoise, preview, decode, sum(p.numel() for p in sdm.parameters()) / 1e6


def report(args: argparse.Namespace, step: float, cost: float, vae_cost: float, params: float) -> None:
    """The inputs, the medians and their ratios."""
    print(
        f"inputs: latent {args.latent}x{args.latent} (image {args.latent * 8}²), batch 1, UNet width {args.width} "
        f"({params:.1f}M params each), tiny VAE, DDIM, {args.steps} fusion iterations per call, "
        f"{args.repeats} rounds, {args.threads} torch threads"
    )
    print(
        f"median: denoising step {1000 * step:.2f} ms   preview {1000 * cost:.2f} ms   "
        f"VAE decode {1000 * vae_cost:.2f} ms"
    )
    print(
        f"preview / step {cost / step:.4f}   preview / VAE decode {cost / vae_cost:.4f}   "
        f"VAE decode / step {vae_cost / step:.3f}"
    )


if __name__ == "__main__":
    main()
