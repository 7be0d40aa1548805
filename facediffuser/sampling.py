"""The one denoising loop of Face-diffuser: scene (TDM) → Saliency-adaptive Noise Fusion → subject (SDM).

Stage boundaries are inclusive iteration indices, as in the official code (METHOD.md §5):

    i <= s       stage 1, TDM only, CFG over [null, text]
    s < i <= f   stage 2, both models; per-pixel choice by saliency (SNF)
    i > f        stage 3, SDM only, CFG over [text, augmented]

Degenerate windows are allowed and documented: s = -1 skips stage 1, f = s skips stage 2 and
f = N - 1 skips stage 3. Everything else outside -1 <= s <= f <= N - 1 is an error.

Rows of a batch can be dropped between iterations (`keep_rows`, for cancelled requests): the loop goes on with the
other rows only, and `SNFOutput.rows` says which of the original rows the returned latents are.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F

from facediffuser.batch_rows import drop_rows, kept_positions
from facediffuser.layout import SubjectRegions, boxed_attention


@dataclass(frozen=True)
class FusionOptions:
    """How stage 2 mixes the two noise predictions.

    The defaults are the official numerics. Every other value is an opt-in improvement (METHOD.md §8).
    """

    mode: Literal["saliency", "average"] = "saliency"  # "average": naive 0.5/0.5 mix (an ablation)
    kernel_size: int = 4  # official AvgPool2d(4, stride 1, pad 1) shrinks h×w by one; resize undoes it
    padding: int = 1
    temperature_tdm: float = 1.0  # MagicFusion-style per-model softmax temperatures; official: 1
    temperature_sdm: float = 1.0
    soft: bool = False  # sigmoid of the log-ratio of saliencies instead of a hard argmax

    def __post_init__(self):
        if self.mode not in ("saliency", "average"):
            raise ValueError(f"fusion mode must be 'saliency' or 'average', got {self.mode!r}")
        if self.kernel_size < 1 or self.padding < 0:
            raise ValueError("fusion kernel_size must be >= 1 and padding >= 0")
        if self.temperature_tdm <= 0 or self.temperature_sdm <= 0:
            raise ValueError("fusion temperatures must be > 0")


OFFICIAL_FUSION = FusionOptions()

Stage = Literal["scene", "fusion", "subjects"]


def stage_of(i: int, start_merge_step: int, final_step: int) -> Stage:
    """The stage iteration i belongs to (boundaries inclusive, as in the loop): scene (TDM), fusion, subjects (SDM)."""
    if i <= start_merge_step:
        return "scene"
    return "fusion" if i <= final_step else "subjects"


@dataclass
class SNFOutput:
    latents: torch.Tensor  # [len(rows), C, h, w]
    masks: list[torch.Tensor] | None = None  # one [len(rows), 1, h, w] float32 mask per fusion step (1 = SDM)
    fusion_steps: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # the original batch index of each returned row


def _saliency(response: torch.Tensor, opts: FusionOptions, temperature: float) -> torch.Tensor:
    """|guidance direction| [B, C, h, w] → spatial probability map [B, h, w], computed in fp32."""
    batch, _, height, width = response.shape
    smoothed = F.avg_pool2d(response.float(), opts.kernel_size, stride=1, padding=opts.padding)
    if smoothed.shape[-2:] != (height, width):
        smoothed = F.interpolate(smoothed, size=(height, width), mode="bilinear", align_corners=False)
    per_pixel = smoothed.mean(dim=1).reshape(batch, height * width)
    return torch.softmax(per_pixel / temperature, dim=1).reshape(batch, height, width)


def snf_mask(
    tdm_direction: torch.Tensor,
    sdm_direction: torch.Tensor,
    options: FusionOptions = OFFICIAL_FUSION,
) -> torch.Tensor:
    """Per-sample fusion mask [B, 1, h, w] in fp32: 1 where the SDM's noise is used, 0 for the TDM's.

    `tdm_direction` = w·(T(text) − T(null)), `sdm_direction` = w·(S(aug) − S(text)). Because w scales
    both, it acts as the softmax's inverse temperature, exactly as in the official code.
    """
    saliency_tdm = _saliency(tdm_direction.abs(), options, options.temperature_tdm)
    saliency_sdm = _saliency(sdm_direction.abs(), options, options.temperature_sdm)
    if options.soft:
        tiny = torch.finfo(torch.float32).tiny
        mask = torch.sigmoid(torch.log(saliency_sdm + tiny) - torch.log(saliency_tdm + tiny))
    else:
        mask = (saliency_sdm > saliency_tdm).float()  # ties go to the TDM
    return mask.unsqueeze(1)


def check_boundaries(start_merge_step: int, final_step: int, num_iterations: int) -> None:
    if not -1 <= start_merge_step <= num_iterations - 1:
        raise ValueError(
            f"start_merge_step={start_merge_step} is outside [-1, {num_iterations - 1}] "
            f"for a schedule of {num_iterations} iterations"
        )
    if not -1 <= final_step <= num_iterations - 1:
        raise ValueError(
            f"final_step={final_step} is outside [-1, {num_iterations - 1}] "
            f"for a schedule of {num_iterations} iterations"
        )
    if final_step < start_merge_step:
        raise ValueError(f"final_step={final_step} is before start_merge_step={start_merge_step}")


def boundaries_from_fractions(alpha: float, beta: float, num_iterations: int) -> tuple[int, int]:
    """Fractions of the schedule → inclusive iteration indices s = round(αN), f = round(βN), capped at N−1.

    With DDIM and 50 steps, α=0.3 and β=0.6 give the official inference script's s=15, f=30.
    """
    if not 0.0 <= alpha <= beta <= 1.0:
        raise ValueError(f"need 0 <= alpha <= beta <= 1, got alpha={alpha}, beta={beta}")
    last = num_iterations - 1
    return min(round(alpha * num_iterations), last), min(round(beta * num_iterations), last)


def _step_kwargs(scheduler, generator, eta) -> dict:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in accepted and generator is not None:
        kwargs["generator"] = generator
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


def _guided(unet, latent_input, t, first, second, guidance_scale):
    """One batched UNet call on [first; second] conditionings → (ε_first, w·(ε_second − ε_first))."""
    out = unet(torch.cat([latent_input, latent_input]), t, encoder_hidden_states=torch.cat([first, second])).sample
    eps_first, eps_second = out.chunk(2)
    return eps_first, guidance_scale * (eps_second - eps_first)


def _fusion_mask(tdm_direction, sdm_direction, fusion: FusionOptions, region) -> torch.Tensor:
    """[B, 1, h, w] fp32 weight of the SDM's noise in one fusion step; `region` (layout boxes) confines it."""
    if fusion.mode == "average":
        mask = torch.full_like(tdm_direction[:, :1], 0.5, dtype=torch.float32)
    else:
        mask = snf_mask(tdm_direction, sdm_direction, fusion)
    return mask if region is None else mask * region  # outside the boxes the TDM's noise is used


@torch.no_grad()
def snf_denoise(
    tdm_unet,
    sdm_unet,
    scheduler,
    latents: torch.Tensor,
    null_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    augmented_embeds: torch.Tensor,
    *,
    num_inference_steps: int,
    guidance_scale: float,
    start_merge_step: int,
    final_step: int,
    return_masks: bool = False,
    fusion: FusionOptions = OFFICIAL_FUSION,
    generator: torch.Generator | list[torch.Generator] | None = None,
    eta: float = 0.0,
    callback: Callable[[int, int], None] | None = None,
    regions: SubjectRegions | None = None,
    keep_rows: Callable[[int], Sequence[int] | None] | None = None,
    on_step: Callable[[int, int, torch.Tensor, torch.Tensor | None], None] | None = None,
) -> SNFOutput:
    """Run the three-stage Face-diffuser sampler from initial `latents` (already scaled by init_noise_sigma).

    All embeddings are [B, L, D] and token-aligned; `null_embeds` is the unconditional (or negative prompt)
    sequence. Each UNet is called once per step on both of its conditionings at once. `callback(i, N)` is
    called after every iteration (for progress bars). `regions` (layout boxes, facediffuser.layout) confines the
    SDM's fusion wins to the union of each sample's boxes and each subject's SDM cross-attention to its box;
    None (the default) is the official sampler.

    `keep_rows(i)` is asked before iteration i: None keeps every row, else the positions (into the current batch,
    which shrinks as rows go) of the rows to keep. Dropped rows cost nothing from then on; with none left the loop
    stops. The kept rows give the latents they would have given in the whole batch, up to float rounding (the
    UNet's batch size changes; tests/test_sampling.py measures it); stochastic schedulers need one generator per
    row (a list) for that, since a shared generator's draws move between rows. `regions` is copied, not changed.
    `on_step(i, N, latents, mask)` is called after every iteration with the current batch's latents and that
    step's fusion mask [B, 1, h, w] (None outside the fusion stage), e.g. for previews (facediffuser.preview).
    """
    if not (latents.shape[0] == null_embeds.shape[0] == text_embeds.shape[0] == augmented_embeds.shape[0]):
        raise ValueError(
            "latents and embeddings must share the batch size, got "
            f"{latents.shape[0]}, {null_embeds.shape[0]}, {text_embeds.shape[0]}, {augmented_embeds.shape[0]}"
        )
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    num_iterations = len(timesteps)
    check_boundaries(start_merge_step, final_step, num_iterations)
    step_kwargs = _step_kwargs(scheduler, generator, eta)

    if keep_rows is not None and regions is not None:
        regions = regions.copy()  # dropping rows subsets it in place; the caller's stays whole
    region = None if regions is None else regions.fusion_region(latents.device)
    masks: list[torch.Tensor] | None = [] if return_masks else None
    fusion_steps: list[int] = []
    rows = list(range(latents.shape[0]))
    with boxed_attention(sdm_unet, regions):  # no regions: the UNet's own attention, untouched
        for i, t in enumerate(timesteps):
            kept = None if keep_rows is None else kept_positions(keep_rows(i), len(rows))
            if kept is not None:  # rows were cancelled: go on with the others only
                rows = [rows[k] for k in kept]
                generator, (latents, null_embeds, text_embeds, augmented_embeds, region) = drop_rows(
                    kept,
                    scheduler,
                    regions,
                    generator,
                    masks,
                    latents,
                    null_embeds,
                    text_embeds,
                    augmented_embeds,
                    region,
                )
                step_kwargs = _step_kwargs(scheduler, generator, eta)
                if not rows:
                    break
            mask = None
            latent_input = scheduler.scale_model_input(latents, t)
            use_tdm = i <= final_step  # stages 1 and 2
            use_sdm = i > start_merge_step  # stages 2 and 3
            if use_tdm:
                tdm_null, tdm_direction = _guided(tdm_unet, latent_input, t, null_embeds, text_embeds, guidance_scale)
                eps_tdm = tdm_null + tdm_direction
            if use_sdm:
                sdm_text, sdm_direction = _guided(
                    sdm_unet, latent_input, t, text_embeds, augmented_embeds, guidance_scale
                )
                eps_sdm = sdm_text + sdm_direction
            if use_tdm and use_sdm:
                mask = _fusion_mask(tdm_direction, sdm_direction, fusion, region)
                fused = mask * eps_sdm.float() + (1.0 - mask) * eps_tdm.float()
                noise_pred = fused.to(eps_sdm.dtype)
                fusion_steps.append(i)
                if masks is not None:
                    masks.append(mask)
            else:
                noise_pred = eps_tdm if use_tdm else eps_sdm
            latents = scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
            if callback is not None:
                callback(i, num_iterations)
            if on_step is not None:
                on_step(i, num_iterations, latents, mask)
    return SNFOutput(latents=latents, masks=masks, fusion_steps=fusion_steps, rows=rows)
