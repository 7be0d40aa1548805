"""Named, explicit schedulers (METHOD.md §5 quirk 6). SNF only alters ε, so multistep solvers are fine."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),  # the paper's sampler (η = 0)
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),  # what the official scripts actually ran (SD1.5 default)
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}


def make_scheduler(name: str, base_config):
    """A scheduler of kind `name` sharing the model's noise schedule (`base_config`)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **overrides)


def scheduler_name(scheduler) -> str:
    for name, (cls, _) in SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    return type(scheduler).__name__


def load_scheduler(folder: str):
    """The scheduler class named in a scheduler folder's config (a model directory's scheduler/; SD1.5 ships PNDM)."""
    import diffusers

    config = diffusers.PNDMScheduler.load_config(folder)
    cls = getattr(diffusers, config.get("_class_name", "PNDMScheduler"))
    return cls.from_config(config)
