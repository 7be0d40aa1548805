"""The preprocessing settings (`facediffuser preprocess` flags, read from the fields) and their checks. No Ray here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from facediffuser.config import arg
from facediffuser.data import io as dataio
from facediffuser.data.captions import TEMPLATE, check_captioner
from facediffuser.data.dedup import DEFAULT_DUPLICATE_DISTANCE, MAX_DUPLICATE_DISTANCE
from facediffuser.data.faces import DEFAULT_MIN_SCORE, DETECTORS
from facediffuser.data.filters import DEFAULT_MIN_FACE_FOCUS, DEFAULT_MIN_FACE_PERCENT, DEFAULT_MIN_SIDE
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
    max_subjects: int = arg(3, "images with more faces are rejected")  # FaceID-6M keeps photos of at most 3 faces
    # The filters (docs/preprocessing.md, "Filters"; --source images only); 0 turns one off (-1 for the distance)
    min_side: int = arg(
        DEFAULT_MIN_SIDE, "photos whose short side in pixels (as given, before resizing) is under this are rejected"
    )
    min_face_percent: float = arg(
        DEFAULT_MIN_FACE_PERCENT, "photos with a face box under this percentage of the image area are rejected"
    )
    min_face_focus: float = arg(
        DEFAULT_MIN_FACE_FOCUS,
        "photos with a face whose focus (variance of the Laplacian at 64×64 px) is under this are rejected as blurry",
    )
    duplicate_distance: int = arg(
        DEFAULT_DUPLICATE_DISTANCE,
        "a photo whose perceptual hash is within this many of 64 bits of an earlier kept photo's is rejected as a "
        "near duplicate, across the whole run (-1: keep duplicates)",
    )
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
        if self.min_side < 0 or self.min_face_focus < 0 or not 0 <= self.min_face_percent <= 100:
            raise ValueError(
                "--min-side and --min-face-focus must be >= 0 and --min-face-percent in 0..100, got "
                f"{self.min_side}, {self.min_face_focus}, {self.min_face_percent}"
            )
        if not -1 <= self.duplicate_distance <= MAX_DUPLICATE_DISTANCE:
            raise ValueError(
                f"--duplicate-distance must be in -1..{MAX_DUPLICATE_DISTANCE}, got {self.duplicate_distance}"
            )
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
