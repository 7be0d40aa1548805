"""Sampling in fewer steps: DPM-Solver++ (20, 25 steps) and UniPC (20) against 50-step DDIM, in one process.

Every run uses the same pipeline (tiny VAE/text/subject encoders, mid-size UNets), prompt, reference photo
(the astronaut), seeds and stage fractions (α=0.3, β=0.6 carry over to any scheduler and step count). For each
setting it prints, averaged over the seeds:
- latent distance: ‖z − z_ref‖ / ‖z_ref‖ of the final latents against 50-step DDIM,
- image PSNR (dB) of the decoded image against the 50-step DDIM image,
- mask IoU: each fusion step's mask against the reference's mask at the same point of the schedule (nearest
  fraction of the way through), averaged over the fusion steps,
- time ratio: median wall time of the call / that of 50-step DDIM.
20-step DDIM is printed as well, to show what the better solver buys at the same step count.

    .venv/bin/python benchmarks/fewer_steps.py [--width 64 --size 128 --seeds 2 --repeats 2 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from facediffuser.models.tiny import tiny_pipeline
from facediffuser.sample_photos import ASTRONAUT
from facediffuser.schedulers import make_scheduler

PROMPT = "a woman <|image|> walking on the moon"
REFERENCE = ("ddim", 50)
SETTINGS = [("dpm++", 20), ("dpm++", 25), ("unipc", 20), ("ddim", 20)]


def sample(pipe, scheduler: str, steps: int, seed: int, size: int):
    """→ (final latents, image [3, H, W], masks [fusion steps, h, w], fusion fractions, seconds)."""
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    start = time.perf_counter()
    result = pipe(
        PROMPT,
        [str(ASTRONAUT)],
        check_references=False,  # sampling timed alone: the reference checks run on the CPU, apart
        num_inference_steps=steps,
        seed=seed,
        height=size,
        width=size,
        alpha=0.3,
        beta=0.6,
        return_masks=True,
        output_type="latent",
    )
    image = pipe.decode_latents(result.images)[0]
    seconds = time.perf_counter() - start
    fractions = [i / result.num_iterations for i in result.fusion_steps]
    return result.images[0], image, result.masks[:, 0], fractions, seconds


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = torch.mean((image - reference) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def compare(run, reference) -> dict:
    latents, image, masks, fractions, _ = run
    ref_latents, ref_image, ref_masks, ref_fractions, _ = reference
    nearest = [min(range(len(ref_fractions)), key=lambda j: abs(ref_fractions[j] - f)) for f in fractions]
    return {
        "latent": ((latents - ref_latents).norm() / ref_latents.norm()).item(),
        "psnr": psnr(image, ref_image),
        "iou": statistics.mean(iou(masks[k], ref_masks[j]) for k, j in enumerate(nearest)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=64, help="UNet base channels (tiny: 32, SD1.5: 320)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (latents: size/8)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per setting (median kept)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = tiny_pipeline(seed=0, unet_width=args.width)
    print(
        f"inputs: UNet width {args.width}, {args.size}², seeds 0..{args.seeds - 1}, {args.repeats} timed calls, "
        f"{args.threads} torch threads, α=0.3 β=0.6, prompt {PROMPT!r}",
        flush=True,
    )

    def runs(scheduler, steps):
        per_seed = [sample(pipe, scheduler, steps, seed, args.size) for seed in range(args.seeds)]
        timings = [sample(pipe, scheduler, steps, 0, args.size)[-1] for _ in range(args.repeats - 1)]
        return per_seed, statistics.median([per_seed[0][-1], *timings])

    reference, reference_seconds = runs(*REFERENCE)
    print(f"{'setting':<12} {'latent dist':>11} {'PSNR dB':>8} {'mask IoU':>8} {'s/image':>8} {'time ratio':>10}")
    print(f"{'ddim 50':<12} {0.0:>11.4f} {'ref':>8} {1.0:>8.3f} {reference_seconds:>8.2f} {1.0:>10.2f}")
    for scheduler, steps in SETTINGS:
        candidate, seconds = runs(scheduler, steps)
        scores = [compare(c, r) for c, r in zip(candidate, reference)]
        mean = {key: statistics.mean(s[key] for s in scores) for key in scores[0]}
        print(
            f"{scheduler + ' ' + str(steps):<12} {mean['latent']:>11.4f} {mean['psnr']:>8.2f} {mean['iou']:>8.3f} "
            f"{seconds:>8.2f} {seconds / reference_seconds:>10.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
