"""One training step of the SDM or the TDM as plain torch (METHOD.md §3).

`TrainingModel` holds the frozen VAE and text encoder beside the trained parts and turns a batch from
`facediffuser.training.data.ExampleBuilder` into losses; `TrainStep` adds AdamW, gradient clipping and mixed
precision. Ray Train wraps `TrainingModel` in DDP; `benchmarks/train.py` runs the same step without Ray.

Trained: SDM = UNet + post-fuse MLP + the last 2 CLIP vision encoder layers; TDM = the full UNet.
Frozen weights stay fp32 (so checkpoints save them bit-exact); mixed precision comes from autocast.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from diffusers import DDPMScheduler

from facediffuser.training.losses import (
    LOCALIZATION_WEIGHT,
    MASKED_LOSS_PROB,
    CrossAttentionCapture,
    denoising_loss,
    localization_loss,
    union_mask,
)

TRAINED_VISION_LAYERS = 2


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5  # constant: the official 500 warm-up steps were never applied
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    localization_weight: float = LOCALIZATION_WEIGHT
    masked_loss_prob: float = MASKED_LOSS_PROB
    mixed_precision: str = "no"  # "bf16" | "fp16" | "no"

    def __post_init__(self):
        if self.mixed_precision not in ("bf16", "fp16", "no"):
            raise ValueError(f"mixed precision must be bf16, fp16 or no, got {self.mixed_precision!r}")
        if not self.lr > 0:
            raise ValueError(f"learning rate must be > 0, got {self.lr}")


class TrainingModel(nn.Module):
    """Frozen VAE + text encoder, trained UNet (+ subject encoder for the SDM); `forward(batch)` → losses."""

    def __init__(
        self,
        which: str,
        unet,
        vae,
        text_encoder,
        scheduler_config,
        subject_encoder=None,
        config: OptimConfig = OptimConfig(),
        seed: int = 0,
    ):
        super().__init__()
        if which not in ("sdm", "tdm"):
            raise ValueError(f"model must be 'sdm' or 'tdm', got {which!r}")
        if which == "sdm" and subject_encoder is None:
            raise ValueError("the SDM needs a subject encoder")
        self.which, self.config = which, config
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.subject_encoder = subject_encoder if which == "sdm" else None
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        self.rng = random.Random(seed)  # the once-per-batch masked-loss coin
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet.requires_grad_(True)
        self.capture = None
        if which == "sdm":
            self.subject_encoder.requires_grad_(False)
            self.subject_encoder.postfuse_module.requires_grad_(True)
            for layer in self.subject_encoder.image_encoder.vision_model.encoder.layers[-TRAINED_VISION_LAYERS:]:
                layer.requires_grad_(True)
            self.capture = CrossAttentionCapture(self.unet)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        self.vae.eval()  # frozen parts never train (no dropout)
        self.text_encoder.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        pixel_values = batch["pixel_values"]
        with torch.no_grad():
            latents = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
            text_embeds = self.text_encoder(batch["input_ids"])[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise

        if self.which == "tdm":
            prediction = self.unet(noisy, timesteps, text_embeds).sample
            loss_den = denoising_loss(prediction, target)
            return {"loss": loss_den, "loss_den": loss_den.detach(), "loss_loc": torch.zeros_like(loss_den).detach()}

        valid = batch["subject_valid"].bool()
        encoder_states = self._augmented_embeds(text_embeds, batch, valid)
        self.capture.clear()
        prediction = self.unet(noisy, timesteps, encoder_states).sample
        masked = self.rng.random() < self.config.masked_loss_prob
        mask = union_mask(batch["subject_masks"], valid, tuple(latents.shape[-2:])) if masked else None
        loss_den = denoising_loss(prediction, target, mask)
        loss_loc = localization_loss(self.capture.maps, batch["subject_masks"], batch["token_index"], valid)
        self.capture.clear()
        loss = loss_den + self.config.localization_weight * loss_loc
        return {"loss": loss, "loss_den": loss_den.detach(), "loss_loc": loss_loc.detach()}

    def _augmented_embeds(self, text_embeds, batch, valid):
        """Fuse each valid subject's image embedding into its noun token. A batch without subjects still runs
        the trained encoder layers on nothing (0 × output), so DDP sees every trained parameter used."""
        encoder = self.subject_encoder
        objects = batch["object_pixel_values"][valid]  # [N, 3, S, S]
        if objects.shape[0] == 0:
            dummy = encoder.embed_images(batch["object_pixel_values"][:1, 0]).sum()
            dummy = dummy + encoder.postfuse_module(text_embeds[:1, :1], text_embeds[:1, :1]).sum()
            return text_embeds + 0.0 * dummy
        embeds = encoder.embed_images(objects).to(text_embeds.dtype)
        subject_embeds = text_embeds.new_zeros(*valid.shape, text_embeds.shape[-1])
        subject_embeds[valid] = embeds
        # subjects fill slots 0..n-1 in caption order (ExampleBuilder guarantees it)
        return encoder.fuse(text_embeds, batch["image_token_mask"], subject_embeds, batch["num_subjects"])


def make_optimizer(model: TrainingModel, config: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.trainable_parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, eps=config.eps
    )


class TrainStep:
    """forward → backward → clip to `max_grad_norm` → AdamW step. `model` may be a DDP wrapper of TrainingModel."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: OptimConfig, device: torch.device):
        self.model, self.optimizer, self.config, self.device = model, optimizer, config, torch.device(device)
        self.parameters = [p for group in optimizer.param_groups for p in group["params"]]
        use_amp = config.mixed_precision != "no" and self.device.type == "cuda"
        self.amp_dtype = (
            {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision) if use_amp else None
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        autocast = torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with autocast:
            losses = self.model(batch)
        loss = losses["loss"]
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.config.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": float(loss.detach()),
            "loss_den": float(losses["loss_den"]),
            "loss_loc": float(losses["loss_loc"]),
            "grad_norm": float(grad_norm),
            "lr": self.optimizer.param_groups[0]["lr"],
        }
