"""Seeded initial noise: one generator per image, so an image does not depend on the others drawn with it (the
pipeline's images, and each request in a served batch)."""

from __future__ import annotations

from typing import Sequence

import torch


def seeded_latents(shape: tuple[int, ...], seeds: Sequence[int]) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Initial noise [len(seeds), *shape] (float32, CPU), image i drawn from its own generator seeded with seeds[i],
    so an image does not depend on the others drawn with it (the pipeline's images, and each request in a served
    batch). → (latents, the generators after the draw: they can go on feeding a stochastic scheduler)."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    latents = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return latents, generators
