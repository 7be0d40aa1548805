"""`facediffuser generate`: images + fusion masks + a JSON manifest into an output directory."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from facediffuser import config
from facediffuser.best_of import MAX_BEST_OF, MAX_RETRIES, Selection
from facediffuser.config import arg
from facediffuser.images import load_image
from facediffuser.layout import check_boxes, check_scales
from facediffuser.manifest import generation_manifest, guard_record, package_versions, sampling_record
from facediffuser.model_loading import identity, load_pipeline
from facediffuser.pipeline import DEFAULT_ALPHA, DEFAULT_BETA
from facediffuser.prompts import IMAGE_TOKEN, count_markers
from facediffuser.reference import DEFAULT_REFERENCE_MODE, REFERENCE_MODES, check_mode
from facediffuser.reference_checks import DEFAULT_THRESHOLDS, ReferenceThresholds, check_references, warnings_of
from facediffuser.schedulers import SCHEDULERS, make_scheduler, scheduler_name
from facediffuser.visualize import mask_pictures


def write_results(out_dir: Path, result, *, prefix: str = "image", boxes=None) -> dict[str, list[str] | str]:
    """Images, and when masks were asked for: a mask grid (rows = images, columns = fusion steps) and overlays
    (with the layout boxes drawn, when given)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str] | str] = {"images": [], "overlays": []}
    for index, image in enumerate(result.images):
        name = f"{prefix}_{index}.png"
        image.save(out_dir / name)
        files["images"].append(name)
    if result.masks is not None:
        grid, overlays = mask_pictures(result.images, result.masks, boxes=boxes)
        grid.save(out_dir / "fusion_masks.png")
        files["fusion_masks"] = "fusion_masks.png"
        for index, overlay in enumerate(overlays):
            name = f"{prefix}_{index}_overlay.png"
            overlay.save(out_dir / name)
            files["overlays"].append(name)
    return files


@dataclass
class GenerateConfig:
    prompt: str = arg(help='e.g. "a man <|image|> and a woman <|image|> on a beach"')
    reference: list[str] = arg(
        help="photo(s) of one person, one flag per <|image|> marker in order; several photos of "
        "the same person: a.jpg,b.jpg (their embeddings are averaged)",
        action="append",
        metavar="IMAGE[,IMAGE...]",
    )
    out: str = arg(help="output directory")
    model: str | None = arg(
        None,
        "model directory (FaceDiffuserPipeline, or one holding sdm/ and tdm/), or a training "
        "run's directory (runs/NAME: its final/ is used)",
        group="source",
    )
    tiny: bool = arg(False, "small random models for trying the tool on a CPU", group="source")
    negative_prompt: str | None = arg(None, "what to keep out of the scene")
    num_images: int = arg(1, "images to generate; image k uses seed + k")
    seed: int = arg(0, "seed of the first image")
    steps: int = arg(50, "denoising steps")
    guidance_scale: float = arg(5.0, "classifier-free guidance weight")
    alpha: float | None = arg(None, f"fraction of the schedule before fusion (default {DEFAULT_ALPHA})")
    beta: float | None = arg(None, f"fraction of the schedule before SDM-only (default {DEFAULT_BETA})")
    start_merge_step: int | None = arg(None, "inclusive iteration index s (instead of --alpha)")
    final_step: int | None = arg(None, "inclusive iteration index f (instead of --beta)")
    scheduler: str = arg("ddim", "sampler", choices=sorted(SCHEDULERS))
    width: int | None = arg(None, "image width (default: the model's)")
    height: int | None = arg(None, "image height (default: the model's)")
    box: list[str] | None = arg(
        None,
        "where a person goes: x0,y0,x1,y1 as fractions of the image, one flag per "
        "marker in order (optional; all or none)",
        action="append",
        metavar="X0,Y0,X1,Y1",
    )
    subject_scales: list[float] | None = arg(
        None,
        "per marker, how strongly the person's photos count (1 = full, 0 = the noun alone)",
        nargs="+",
        metavar="S",
    )
    reference_mode: str = arg(
        DEFAULT_REFERENCE_MODE,
        "what the subject encoder sees of each photo: whole (the "
        "official transform: the photo padded square), face (the "
        "largest face with a margin) or person (the segmented person)",
        choices=REFERENCE_MODES,
    )
    no_identity_scores: bool = arg(False, "skip the per-image dlib face similarity to each reference")
    best_of: int = arg(1, f"sample this many candidates per image and keep the best (1..{MAX_BEST_OF})")
    min_identity: float | None = arg(
        None, "resample with new seeds until every image's weakest subject reaches this dlib similarity"
    )
    max_retries: int = arg(2, f"rounds sampled after the first, at most, to meet --min-identity (0..{MAX_RETRIES})")
    no_reference_checks: bool = arg(False, "skip the reference photo checks (one clear face, size, sharpness)")
    min_face_px: int = arg(DEFAULT_THRESHOLDS.min_face_px, "reference check: the smallest face, pixels across")
    min_sharpness: float = arg(DEFAULT_THRESHOLDS.min_sharpness, "reference check: the lowest face sharpness")

    @property
    def photos(self) -> list[list[str]]:
        """Per person, the photo paths given for them."""
        return [[p for p in value.split(",") if p] for value in self.reference]

    @property
    def boxes(self) -> list[list[float]] | None:
        if self.box is None:
            return None
        parsed = []
        for index, text in enumerate(self.box, start=1):
            try:
                parsed.append([float(v) for v in text.split(",")])
            except ValueError:
                raise ValueError(f"--box {text}: expected x0,y0,x1,y1 as numbers (box {index})") from None
        return parsed

    def validate(self) -> None:
        """Everything a user can get wrong, before any model loads."""
        if not self.model and not self.tiny:
            raise ValueError("give --model DIR (or --tiny for the small random test models)")
        markers = count_markers(self.prompt)
        if markers != len(self.reference):
            raise ValueError(
                f"the prompt has {markers} {IMAGE_TOKEN} marker(s) but {len(self.reference)} --reference given"
            )
        for value, photos in zip(self.reference, self.photos):
            if not photos:
                raise ValueError(f"--reference {value!r}: no photo path")
            for path in photos:
                load_image(path)  # fails early, naming the bad file
        check_mode(self.reference_mode)
        check_boxes(self.boxes, markers)
        check_scales(self.subject_scales, markers)
        _ = self.selection  # checks best_of, min_identity, max_retries
        out_dir = Path(self.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out {out_dir} exists and is not a directory")

    @property
    def selection(self) -> Selection:
        return Selection(self.best_of, self.min_identity, self.max_retries)

    @property
    def thresholds(self) -> ReferenceThresholds | None:
        """The reference checks' thresholds; None when --no-reference-checks."""
        if self.no_reference_checks:
            return None
        return DEFAULT_THRESHOLDS.with_minimums(self.min_face_px, self.min_sharpness)

    def check_references(self) -> list[str]:
        """The photos checked at the door (ReferenceRefused names the one that cannot serve) → the warnings."""
        if self.thresholds is None:
            return []
        names = [[f"--reference {path}" for path in photos] for photos in self.photos]
        return warnings_of(check_references(self.photos, self.thresholds, names=names))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser, GenerateConfig)


def run(args: argparse.Namespace) -> int:
    cfg = config.from_args(GenerateConfig, args)
    cfg.validate()
    reference_warnings = cfg.check_references()  # before any model loads
    references = [[load_image(path) for path in photos] for photos in cfg.photos]
    started = time.perf_counter()
    pipe = load_pipeline(cfg.model, cfg.tiny)
    pipe.scheduler = make_scheduler(cfg.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result = _sample(cfg, pipe, references)
    result.warnings = reference_warnings + result.warnings
    out_dir = Path(cfg.out)
    files = write_results(out_dir, result, boxes=cfg.boxes)
    manifest = _manifest(cfg, pipe, result, files, started)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    for line in result.warnings + [w for image in result.identity_warnings or [] for w in image]:
        print(f"warning: {line}", file=sys.stderr)
    print(f"wrote {len(files['images'])} image(s), fusion masks and manifest.json to {out_dir}")
    return 0


def _sample(cfg: GenerateConfig, pipe, references: list[list]):
    """The pipeline's call for `cfg`, with a progress bar over the steps."""
    with tqdm(total=None, desc="sampling", unit="step") as bar:  # closed before any error is printed

        def progress(i: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        return pipe(
            cfg.prompt,
            [photos[0] if len(photos) == 1 else photos for photos in references],
            negative_prompt=cfg.negative_prompt,
            num_images_per_prompt=cfg.num_images,
            seed=cfg.seed,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            alpha=cfg.alpha,
            beta=cfg.beta,
            start_merge_step=cfg.start_merge_step,
            final_step=cfg.final_step,
            height=cfg.height,
            width=cfg.width,
            boxes=cfg.boxes,
            subject_scales=cfg.subject_scales,
            return_masks=True,
            callback=progress,
            identity_scores=not cfg.no_identity_scores,
            reference_mode=cfg.reference_mode,
            check_references=False,  # checked by run(), before the models loaded
            best_of=cfg.best_of,
            min_identity=cfg.min_identity,
            max_retries=cfg.max_retries,
        )


def _manifest(cfg: GenerateConfig, pipe, result, files: dict, started: float) -> dict:
    """What manifest.json records: the prompt, references, seeds, sampling settings, model and scores; the
    seconds since `started` (time.perf_counter())."""
    sampling = sampling_record(
        scheduler=scheduler_name(pipe.scheduler),
        steps=cfg.steps,
        iterations=result.num_iterations,
        guidance_scale=cfg.guidance_scale,
        size=result.images[0].size,
        boxes=cfg.boxes,
        subject_scales=cfg.subject_scales,
        boundaries=(result.start_merge_step, result.final_step),
        alpha=cfg.alpha,
        beta=cfg.beta,
        fusion_steps=result.fusion_steps,
    )
    return generation_manifest(
        prompt=cfg.prompt,
        negative_prompt=cfg.negative_prompt,
        references=[[str(Path(p).resolve()) for p in photos] for photos in cfg.photos],
        reference_mode=cfg.reference_mode,
        embedding_sha256=result.embedding_sha256,
        seeds=result.seeds,
        sampling={**sampling, **identity(pipe, cfg.model), "versions": package_versions()},
        identity_scores=result.identity_scores,
        seconds=time.perf_counter() - started,
        files=files,
        **guard_record(
            thresholds=cfg.thresholds,
            selection=cfg.selection,
            identity_warnings=result.identity_warnings,
            candidates=result.candidates,
            warnings=result.warnings,
        ),
    )
