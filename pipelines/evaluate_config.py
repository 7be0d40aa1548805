"""`facediffuser evaluate`'s settings: `EvaluateConfig` (the flags, the --quick preset) and the checks `validate`
runs before any model loads; which settings make a run's results (the rest are RUN_ONLY_FIELDS)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from facediffuser.config import arg
from facediffuser.metrics.protocol import METHODS, PROTOCOLS, check_methods
from facediffuser.metrics.subjects import DEFAULT_NOUN
from facediffuser.reference import DEFAULT_REFERENCE_MODE, REFERENCE_MODES, check_mode

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
SETTINGS_FILE = "run.json"  # the settings that made OUT's results.jsonl; a rerun continues only with the same ones
# --quick: a look at a model in minutes, not the protocol; options given explicitly still win
PRESETS = {
    "full": {"images_per_prompt": 4, "prompts_per_kind": None, "steps": 50, "max_pairs": None},
    "quick": {"images_per_prompt": 1, "prompts_per_kind": 2, "steps": 10, "max_pairs": 1},
}
# config fields that change how a run is executed or shown, not its images or numbers (left out of run.json)
RUN_ONLY_FIELDS = (
    "subjects",
    "out",
    "quick",
    "num_gpus",
    "score_gpus",
    "generate_actors",
    "score_actors",
    "actor_cpus",
    "showcase",
)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass
class EvaluateConfig:
    subjects: str = arg(
        help="one folder per person: its photos (any image name; several are averaged) and an "
        f"optional noun.txt (man|woman; default {DEFAULT_NOUN})"
    )
    out: str = arg(help="output directory; a rerun with the same settings continues it")
    model: str | None = arg(
        None, "model directory (FaceDiffuserPipeline, or one holding sdm/ and tdm/)", group="source"
    )
    tiny: bool = arg(False, "small random models (tests, trying the tool)", group="source")
    protocol: str = arg("both", "single-subject, multi-subject or both", choices=(*PROTOCOLS, "both"))
    # None below: the preset's value (PRESETS, filled in by __post_init__)
    images_per_prompt: int | None = arg(None, "default 4 (--quick: 1)")
    methods: list[str] = arg(
        list(METHODS), f"comma-separated, from {','.join(METHODS)}", type=_comma_list, metavar="A,B,..."
    )
    facenet_weights: str | None = arg(
        None,
        "InceptionResnetV1 (VGGFace2) weights, .safetensors or .pt: FastComposer's identity metric",
        metavar="PATH",
    )
    clip: str | None = arg(None, "CLIP model for prompt consistency", metavar="DIR_OR_ID")
    prompts_per_kind: int | None = arg(None, "use the first N prompts of each kind (≤10; default all 10, --quick: 2)")
    max_pairs: int | None = arg(None, "multi-subject: at most N subject pairs (default all, --quick: 1)")
    steps: int | None = arg(None, "default 50 (--quick: 10)")
    guidance_scale: float = arg(5.0, "classifier-free guidance weight")
    scheduler: str = arg("ddim", "sampler")
    alpha: float | None = arg(None, "SNF window start as a fraction of the schedule")
    beta: float | None = arg(None, "SNF window end as a fraction of the schedule")
    seed: int = arg(42, "seed of each prompt's first image")
    reference_mode: str = arg(
        DEFAULT_REFERENCE_MODE,
        "what the subject encoder sees of each photo: whole (the official transform), face or person",
        choices=REFERENCE_MODES,
    )
    resolution: int | None = arg(None, "square image size (default: the model's)")
    num_gpus: float = arg(0.0, "GPUs per generation actor")
    score_gpus: float = arg(0.0, "GPUs per scoring actor")
    generate_actors: int = arg(1, "generation actors")
    score_actors: int = arg(1, "scoring actors")
    actor_cpus: float = arg(1.0, "CPUs per actor")
    showcase: int = arg(8, "prompts per protocol shown in grids and overlays")
    quick: bool = arg(
        False,
        "a quick look, not the protocol: defaults become --prompts-per-kind 2 "
        "--images-per-prompt 1 --steps 10 --max-pairs 1 (given options still win)",
    )

    def __post_init__(self):
        for name, value in PRESETS["quick" if self.quick else "full"].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    @property
    def protocols(self) -> list[str]:
        return list(PROTOCOLS) if self.protocol == "both" else [self.protocol]

    def validate(self) -> None:
        """Everything checkable about the arguments, before any model is loaded."""
        if not self.model and not self.tiny:
            raise ValueError("give --model DIR (or --tiny for the small random test models)")
        if self.protocol not in (*PROTOCOLS, "both"):
            raise ValueError(f"--protocol must be single, multi or both, got {self.protocol!r}")
        check_methods(self.methods)
        check_mode(self.reference_mode)
        for name, value, low, high in [
            ("--images-per-prompt", self.images_per_prompt, 1, 64),
            ("--steps", self.steps, 1, 1000),
            ("--prompts-per-kind", self.prompts_per_kind or 1, 1, 10),
            ("--generate-actors", self.generate_actors, 1, 1024),
            ("--score-actors", self.score_actors, 1, 1024),
        ]:
            if not low <= value <= high:
                raise ValueError(f"{name} must be in {low}..{high}, got {value}")
        from facediffuser.schedulers import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown --scheduler {self.scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        if self.num_gpus < 0 or self.score_gpus < 0:
            raise ValueError("--num-gpus and --score-gpus must be >= 0")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        if not self.tiny:
            from facediffuser import model_dir

            root = Path(model_dir.resolve(self.model))  # runs/NAME → its final/
            if not root.is_dir():
                raise FileNotFoundError(f"model directory not found: {self.model}")
            if model_dir.kind(root) is None:
                raise ValueError(f"{root} is neither a FaceDiffuserPipeline directory nor holds sdm/ and tdm/")
        if self.facenet_weights and not Path(self.facenet_weights).is_file():
            raise FileNotFoundError(f"--facenet-weights file not found: {self.facenet_weights}")
        if self.clip and not Path(self.clip).exists() and not HUB_ID.match(self.clip):
            raise FileNotFoundError(f"--clip {self.clip}: neither a directory nor a hub id (owner/name)")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
