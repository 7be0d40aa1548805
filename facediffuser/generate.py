"""`facediffuser generate`: images + fusion masks + a JSON manifest into an output directory."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from facediffuser.images import load_image
from facediffuser.manifest import package_versions
from facediffuser.model_dir import identity, load_pipeline
from facediffuser.prompts import IMAGE_TOKEN, count_markers
from facediffuser.pipeline import DEFAULT_ALPHA, DEFAULT_BETA
from facediffuser.schedulers import SCHEDULERS, make_scheduler, scheduler_name
from facediffuser.visualize import mask_grid, mask_overlay


def write_results(out_dir: Path, result, *, prefix: str = "image") -> dict[str, list[str] | str]:
    """Images, and when masks were asked for: a mask grid (rows = images, columns = fusion steps) and overlays."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, list[str] | str] = {"images": [], "overlays": []}
    for index, image in enumerate(result.images):
        name = f"{prefix}_{index}.png"
        image.save(out_dir / name)
        files["images"].append(name)
    if result.masks is not None:
        mask_grid(result.masks).save(out_dir / "fusion_masks.png")
        files["fusion_masks"] = "fusion_masks.png"
        if result.masks.shape[0]:
            mean_mask = result.masks.mean(dim=0)
            for index, image in enumerate(result.images):
                name = f"{prefix}_{index}_overlay.png"
                mask_overlay(image, mean_mask[index]).save(out_dir / name)
                files["overlays"].append(name)
    return files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (FaceDiffuserPipeline, or one holding sdm/ and tdm/), or a "
                                        "training run's directory (runs/NAME: its final/ is used)")
    source.add_argument("--tiny", action="store_true", help="small random models for trying the tool on a CPU")
    parser.add_argument("--prompt", required=True, help='e.g. "a man <|image|> and a woman <|image|> on a beach"')
    parser.add_argument("--reference", action="append", required=True, metavar="IMAGE",
                        help="reference photo, one per <|image|> marker, in order")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--alpha", type=float, default=None, help=f"fraction of the schedule before fusion (default {DEFAULT_ALPHA})")
    parser.add_argument("--beta", type=float, default=None, help=f"fraction of the schedule before SDM-only (default {DEFAULT_BETA})")
    parser.add_argument("--start-merge-step", type=int, default=None, help="inclusive iteration index s (instead of --alpha)")
    parser.add_argument("--final-step", type=int, default=None, help="inclusive iteration index f (instead of --beta)")
    parser.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS))
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--no-identity-scores", action="store_true",
                        help="skip the per-image dlib face similarity to each reference (manifest identity_scores)")


def run(args: argparse.Namespace) -> int:
    markers = count_markers(args.prompt)
    if markers != len(args.reference):
        raise ValueError(f"the prompt has {markers} {IMAGE_TOKEN} marker(s) but {len(args.reference)} --reference given")
    references = [load_image(path) for path in args.reference]  # fails early, naming the bad file
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    started = time.perf_counter()
    pipe = load_pipeline(args.model, args.tiny)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with tqdm(total=None, desc="sampling", unit="step") as bar:  # closed before any error is printed

        def progress(i: int, total: int) -> None:
            bar.total = total
            bar.update(1)

        result = pipe(
            args.prompt, references, negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
            seed=args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
            alpha=args.alpha, beta=args.beta, start_merge_step=args.start_merge_step, final_step=args.final_step,
            height=args.height, width=args.width, return_masks=True, callback=progress,
            identity_scores=not args.no_identity_scores,
        )
    files = write_results(out_dir, result)
    manifest = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "references": [str(Path(p).resolve()) for p in args.reference],
        "seeds": result.seeds,
        "scheduler": scheduler_name(pipe.scheduler),
        "steps": args.steps,
        "iterations": result.num_iterations,
        "guidance_scale": args.guidance_scale,
        "boundaries": {"start_merge_step": result.start_merge_step, "final_step": result.final_step,
                       "alpha": args.alpha, "beta": args.beta, "fusion_steps": result.fusion_steps},
        "size": list(result.images[0].size),
        "identity_scores": result.identity_scores,  # per image, per subject; null: no face found
        **identity(pipe, args.model),  # model, hashes, model_version
        "files": files,
        "versions": package_versions(),
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"wrote {len(files['images'])} image(s), fusion masks and manifest.json to {out_dir}")
    return 0
