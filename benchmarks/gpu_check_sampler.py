"""benchmarks/gpu_check.py's in-process phases: the model directory it runs on, and the sampler phase (our
FaceDiffuserPipeline against diffusers' StableDiffusionPipeline on the same TDM UNet, VAE, text encoder and DDIM
scheduler). The heavy imports are inside the functions, so that `gpu_check.py --help` stays quick."""

from __future__ import annotations

import time
from pathlib import Path

PROMPT = "a man <|image|> on a beach"


def build_model(check, model_dir: Path, seed: int = 0):
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
    check.row(
        "setup",
        "model directory",
        "tiny" if check.dry else "SD1.5 sizes, random init",
        time.perf_counter() - started,
        True,
        str(model_dir),
    )
    return pipe


def diffusers_pipeline(pipe):
    """diffusers' StableDiffusionPipeline on our pipeline's TDM UNet, VAE, text encoder and (DDIM) scheduler."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.tdm_unet,
        scheduler=DDIMScheduler.from_config(pipe.scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    sd.set_progress_bar_config(disable=True)
    return sd


def best_rates(ours, theirs, device: str, steps: int, reps: int) -> tuple[float, float]:
    """Images/s of each (best of two interleaved rounds of `reps` images, after a warm-up) → (ours, theirs)."""
    import torch

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
    return max(rates["ours"]), max(rates["theirs"])


def sampler_phase(check, pipe, size: int, steps: int, reps: int) -> None:
    import torch
    from PIL import Image
    from skimage.data import astronaut

    from facediffuser.schedulers import make_scheduler

    started = time.perf_counter()
    device, dtype = ("cpu", torch.float32) if check.dry else ("cuda", torch.float16)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    sd = diffusers_pipeline(pipe)
    reference = Image.fromarray(astronaut())
    plain = PROMPT.replace(" <|image|>", "")

    def ours(seed: int, n_steps: int):
        pipe(  # the sampler timed alone: the reference checks (CPU, ~0.3 s a photo) are not diffusion
            PROMPT,
            [reference],
            num_inference_steps=n_steps,
            guidance_scale=5.0,
            seed=seed,
            height=size,
            width=size,
            check_references=False,
        )

    def theirs(seed: int, n_steps: int):
        sd(
            plain,
            num_inference_steps=n_steps,
            guidance_scale=5.0,
            height=size,
            width=size,
            generator=torch.Generator(device).manual_seed(seed),
        )

    ours_rate, sd_rate = best_rates(ours, theirs, device, steps, reps)
    sampler_rows(check, size, steps, (ours_rate, sd_rate), time.perf_counter() - started)
    sd = None  # noqa: F841  (frees the pipeline object; the modules are shared with ours)
    pipe.to("cpu")
    if device == "cuda":
        torch.cuda.empty_cache()


def sampler_rows(check, size: int, steps: int, rates: tuple[float, float], seconds: float) -> None:
    """The sampler phase's rows: diffusers' images/s, ours (`rates` = ours, diffusers') and their ratio."""
    ours_rate, sd_rate = rates
    what = f"{'fp32 CPU' if check.dry else 'fp16'} {size}², {steps} DDIM steps, batch 1"
    check.row(
        "sampler",
        f"StableDiffusionPipeline, same UNet ({what})",
        f"{sd_rate:.3f} images/s",
        seconds,
        True,
    )
    check.row("sampler", "FaceDiffuserPipeline (SNF, both UNets in fusion)", f"{ours_rate:.3f} images/s", 0, True)
    check.row(
        "sampler",
        "ratio ours / diffusers",
        f"{ours_rate / sd_rate:.2f}x",
        0,
        True,
        "dry run: not a figure" if check.dry else "",
    )
