"""The preprocessing settings (`facediffuser preprocess` flags, read from the fields) and their checks. No Ray here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from facediffuser.config import arg
from facediffuser.data import io as dataio
from facediffuser.data.captions import TEMPLATE, check_captioner
from facediffuser.data.faces import DEFAULT_MIN_SCORE, DETECTORS
from facediffuser.images import DEFAULT_MAX_PIXELS

SOURCES = ("images", "fastcomposer")


@dataclass
class PreprocessConfig:
    input: str = arg(help="directory or s3:// prefix of photos (or a FastComposer tree)")
    output: str = arg(help="directory or s3:// prefix for shards/, rejects/, manifest.json")
    source: str = arg(
        "images", "images: run the models; fastcomposer: convert jpg+json+npy without models", choices=SOURCES
    )
    detector: str = arg("mediapipe", "face detector", choices=DETECTORS)
    captioner: str = arg(TEMPLATE, "'template' or a transformers image-to-text model directory / hub id")
    max_subjects: int = arg(4, "images with more faces are rejected")
    resolution: int = arg(512, "short side of stored images (downscale only)")
    num_gpus_per_stage: float = arg(0.0, "GPUs per actor of the stages that use one (MTCNN, a captioner model)")
    batch_size: int = arg(
        8,
        "images per map_batches call of a pool before the last (the last pool takes one "
        "block, written as one shard file, per call)",
    )
    workers_per_stage: int | None = arg(
        None,
        "concurrent workers of each stage pool: tasks on CPUs, actors on GPUs "
        "(default: what the cluster's CPUs and GPUs hold)",
    )
    rows_per_shard: int = arg(1000, "rows per Parquet shard file")
    max_pixels: int = arg(DEFAULT_MAX_PIXELS, "larger images are rejected before decoding")
    min_face_score: float = arg(DEFAULT_MIN_SCORE, cli=False)  # detector confidence; library callers set it

    def validate(self) -> None:
        """Everything that can be wrong with the settings (input and output reachable, captioner loadable),
        checked before any work starts."""
        if self.source not in SOURCES:
            raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        for name in ("max_subjects", "resolution", "batch_size", "rows_per_shard", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_gpus_per_stage < 0:
            raise ValueError(f"--num-gpus-per-stage must be >= 0, got {self.num_gpus_per_stage}")
        if self.workers_per_stage is not None and self.workers_per_stage < 1:
            raise ValueError(f"--workers-per-stage must be at least 1, got {self.workers_per_stage}")
        dataio.check_input_dir(self.input)
        dataio.check_output_dir(self.output)
        if self.source == "images":
            check_captioner(self.captioner)

    def to_dict(self) -> dict:
        return asdict(self)
