"""`facediffuser evaluate` / `python -m pipelines.evaluate`: the FastComposer/Face-diffuser benchmark on Ray Data.

tasks (protocol × subjects × prompt × method, fixed seeds) → GenerateImages actors (the pipeline loaded once per
actor; `--num-gpus` each) → ScoreImages actors (dlib / FaceNet identity, CLIP prompt consistency) → the driver
streams the rows, writes every image and results.jsonl, then report.md, report.json, a bar chart, a result grid
per method, a method-comparison grid and fusion-mask overlays into OUT.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from facediffuser.metrics.protocol import METHODS, PROTOCOLS, build_tasks, check_methods, load_subjects, method_arguments

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class EvaluateConfig:
    subjects: str
    out: str
    model: str | None = None
    tiny: bool = False
    protocol: str = "both"  # single | multi | both
    images_per_prompt: int = 4
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    facenet_weights: str | None = None  # InceptionResnetV1 weights file; FastComposer's metric when given
    clip: str | None = None  # CLIP directory or hub id; prompt consistency when given
    prompts_per_kind: int | None = None  # None: all 10 per kind (the protocol); fewer for a quick look
    max_pairs: int | None = None  # multi-subject: at most this many subject pairs (None: all)
    steps: int = 50
    guidance_scale: float = 5.0
    scheduler: str = "ddim"
    alpha: float | None = None
    beta: float | None = None
    seed: int = 42
    resolution: int | None = None  # None: the model's native size
    num_gpus: float = 0.0  # per generation actor
    score_gpus: float = 0.0  # per scoring actor
    generate_actors: int = 1
    score_actors: int = 1
    actor_cpus: float = 1.0
    showcase: int = 8  # prompts per protocol shown in the grids and overlays

    @property
    def protocols(self) -> list[str]:
        return list(PROTOCOLS) if self.protocol == "both" else [self.protocol]

    def validate(self) -> None:
        """Everything checkable about the arguments, before any model is loaded."""
        if self.protocol not in (*PROTOCOLS, "both"):
            raise ValueError(f"--protocol must be single, multi or both, got {self.protocol!r}")
        check_methods(self.methods)
        for name, value, low, high in [("--images-per-prompt", self.images_per_prompt, 1, 64),
                                       ("--steps", self.steps, 1, 1000),
                                       ("--prompts-per-kind", self.prompts_per_kind or 1, 1, 10),
                                       ("--generate-actors", self.generate_actors, 1, 1024),
                                       ("--score-actors", self.score_actors, 1, 1024)]:
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
            root = Path(self.model or "")
            if not self.model or not root.is_dir():
                raise FileNotFoundError(f"model directory not found: {self.model}")
            if not (root / "model_index.json").is_file() and not all((root / d).is_dir() for d in ("sdm/unet", "tdm/unet")):
                raise ValueError(f"{root} is neither a FaceDiffuserPipeline directory nor holds sdm/ and tdm/")
        if self.facenet_weights and not Path(self.facenet_weights).is_file():
            raise FileNotFoundError(f"--facenet-weights file not found: {self.facenet_weights}")
        if self.clip and not Path(self.clip).exists() and not HUB_ID.match(self.clip):
            raise FileNotFoundError(f"--clip {self.clip}: neither a directory nor a hub id (owner/name)")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")


# ---------------------------------------------------------------------------------------- Ray Data stages


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _device(gpus: float) -> str:
    return "cuda" if gpus > 0 else "cpu"


class GenerateImages:
    """One pipeline per actor; each task (one prompt, one method) → `images_per_prompt` image rows."""

    def __init__(self, config: EvaluateConfig):
        from facediffuser.generate import load_pipeline
        from facediffuser.schedulers import make_scheduler

        self.config = config
        self.pipe = load_pipeline(config.model, config.tiny).to(_device(config.num_gpus))
        self.pipe.scheduler = make_scheduler(config.scheduler, self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.num_iterations = self.pipe.resolve_boundaries(config.steps)[0]
        self.references: dict[str, object] = {}

    def _reference(self, path: str):
        from facediffuser.images import load_image

        if path not in self.references:
            self.references[path] = load_image(path)
        return self.references[path]

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        config, rows = self.config, []
        for task in batch.to_pylist():
            with_masks = task["method"] in ("snf", "average")
            result = self.pipe(
                task["prompt"], [self._reference(p) for p in json.loads(task["references"])],
                num_images_per_prompt=config.images_per_prompt, seed=task["seed"],
                num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                height=config.resolution, width=config.resolution, return_masks=with_masks,
                **method_arguments(task["method"], self.num_iterations, config.alpha, config.beta),
            )
            for index, image in enumerate(result.images):
                mask = b""
                if with_masks and result.masks.shape[0]:
                    mean = result.masks[:, index].mean(dim=0).clamp(0, 1).numpy()
                    mask = _png(Image.fromarray((mean * 255).round().astype("uint8")))
                rows.append({**task, "image_index": index, "image_seed": result.seeds[index],
                             "image": _png(image), "mask": mask})
        return pa.Table.from_pylist(rows)


class ScoreImages:
    """Identity (dlib always, FaceNet with --facenet-weights) and CLIP prompt consistency (with --clip)."""

    def __init__(self, config: EvaluateConfig):
        from facediffuser.metrics.identity import DlibEmbedder, FacenetEmbedder, IdentityScorer
        from facediffuser.metrics.prompt import ClipPromptScorer

        device = _device(config.score_gpus)
        self.scorers = [IdentityScorer(DlibEmbedder())]
        if config.facenet_weights:
            self.scorers.append(IdentityScorer(FacenetEmbedder(config.facenet_weights, device)))
        self.clip = ClipPromptScorer(config.clip, device) if config.clip else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from PIL import Image

        rows = batch.to_pylist()
        images = [Image.open(io.BytesIO(row["image"])).convert("RGB") for row in rows]
        for scorer in self.scorers:
            name = scorer.name
            for row, image in zip(rows, images):
                references = [scorer.reference(path, key=path) for path in json.loads(row["references"])]
                result = scorer.score(image, references)
                row.update({f"identity_{name}": result.score, f"faces_{name}": result.num_faces,
                            f"missing_{name}": result.missing_faces, f"duplicate_{name}": result.duplicate,
                            f"similarities_{name}": json.dumps(result.similarities)})
        if self.clip is not None:
            for row, score in zip(rows, self.clip.score(images, [row["prompt"] for row in rows])):
                row["prompt_clip"] = score
        return pa.Table.from_pylist(rows)


# --------------------------------------------------------------------------------------------- the driver


def check_references(subjects) -> None:
    """Every reference photo must decode and show a face (else its identity scores would mean nothing)."""
    from facediffuser.images import load_image
    from facediffuser.metrics.identity import DlibEmbedder

    embedder = DlibEmbedder()
    for subject in subjects:
        if not len(embedder.embed_faces(load_image(subject.reference))):
            raise ValueError(f"subject {subject.id}: no face found in its reference photo {subject.reference}")


def evaluate(config: EvaluateConfig, verbose: bool = False) -> dict:
    """Run the benchmark on the current Ray cluster (a local one is started when none is). Returns report.json."""
    import ray
    from PIL import Image
    from ray.data import ActorPoolStrategy
    from tqdm.auto import tqdm

    from pipelines.ray_runtime import init_ray

    config.validate()
    subjects = load_subjects(config.subjects)
    tasks = build_tasks(subjects, config.protocols, config.methods, images_per_prompt=config.images_per_prompt,
                        seed=config.seed, prompts_per_kind=config.prompts_per_kind, max_pairs=config.max_pairs)
    check_references(subjects)
    if config.facenet_weights:  # a wrong file fails here, in one line, not inside an actor
        from facediffuser.metrics.identity import FacenetEmbedder

        FacenetEmbedder(config.facenet_weights)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    init_ray(verbose)  # joins a running Ray (a test session's, a cluster under `ray job submit`) or starts one

    ds = ray.data.from_items(tasks, override_num_blocks=min(len(tasks), 200))
    ds = ds.map_batches(GenerateImages, fn_constructor_args=(config,), batch_size=1, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=config.generate_actors),
                        num_cpus=config.actor_cpus, num_gpus=config.num_gpus)
    ds = ds.map_batches(ScoreImages, fn_constructor_args=(config,), batch_size=config.images_per_prompt,
                        batch_format="pyarrow", compute=ActorPoolStrategy(size=config.score_actors),
                        num_cpus=config.actor_cpus, num_gpus=config.score_gpus)

    showcase = _showcase_keys(tasks, config.showcase)
    kept_images: dict[tuple, Image.Image] = {}
    kept_masks: dict[tuple, Image.Image] = {}
    rows = []
    expected = len(tasks) * config.images_per_prompt
    with open(out / "results.jsonl", "w") as results, tqdm(total=expected, desc="evaluate", unit="image") as bar:
        for row in ds.iter_rows():
            image_bytes, mask_bytes = row.pop("image"), row.pop("mask")
            name = f"images/{row['protocol']}/{row['method']}/{row['subjects']}_{row['prompt_position']:02d}_{row['image_index']}.png"
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(image_bytes)
            row["file"] = name
            key = (row["protocol"], row["subjects"], row["prompt_position"])
            if key in showcase:
                kept_images[(*key, row["method"], row["image_index"])] = Image.open(io.BytesIO(image_bytes)).convert("RGB")
                if mask_bytes and row["image_index"] == 0:
                    kept_masks[(*key, row["method"])] = Image.open(io.BytesIO(mask_bytes))
            results.write(json.dumps(row) + "\n")
            rows.append(row)
            bar.update(1)
    if len(rows) != expected:  # every task accounted for: one row per requested image
        raise RuntimeError(f"evaluation lost images: {expected} requested, {len(rows)} came back")

    from facediffuser.manifest import directory_hash, package_versions
    from facediffuser.metrics.report import aggregate, bar_chart, write_reports

    identity_names = ["dlib"] + (["facenet"] if config.facenet_weights else [])
    table = aggregate(rows, identity_names, with_clip=bool(config.clip))
    pictures = _pictures(out, config, showcase, kept_images, kept_masks, tasks)
    bar_chart(table, out / pictures["chart"])
    wall = time.time() - started
    missing = ([] if config.facenet_weights else ["FastComposer identity (give --facenet-weights)"]) + (
        [] if config.clip else ["prompt consistency (give --clip)"])
    meta = {
        "model": "tiny" if config.tiny else config.model,
        "model_hashes": {} if config.tiny else {
            str(p): directory_hash(p) for p in ([Path(config.model) / "sdm", Path(config.model) / "tdm"]
                                                if (Path(config.model) / "sdm").is_dir() else [Path(config.model)])},
        "config": asdict(config),
        "subjects": [asdict(s) for s in subjects],
        "counts": {"tasks": len(tasks), "images": len(rows)},
        "missing_metrics": missing,
        "versions": package_versions((*("facediffuser", "torch", "diffusers", "transformers", "ray", "numpy"),
                                      "facenet-pytorch", "dlib-bin")),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(len(rows) / max(wall, 1e-9), 4),
    }
    write_reports(out, table, meta, pictures)
    return json.loads((out / "report.json").read_text())


def _showcase_keys(tasks: list[dict], per_protocol: int) -> list[tuple]:
    """Up to `per_protocol` (protocol, subjects, prompt position) per protocol, cycling through the kinds."""
    keys: list[tuple] = []
    for protocol in dict.fromkeys(t["protocol"] for t in tasks):
        by_kind: dict[str, list[tuple]] = {}
        for task in tasks:
            if task["protocol"] == protocol and task["method"] == tasks[0]["method"]:
                by_kind.setdefault(task["kind"], []).append((protocol, task["subjects"], task["prompt_position"]))
        queues = list(by_kind.values())
        chosen: list[tuple] = []
        while len(chosen) < per_protocol and any(queues):
            for queue in queues:
                if queue and len(chosen) < per_protocol:
                    chosen.append(queue.pop(0))
        keys += chosen
    return keys


def _pictures(out: Path, config: EvaluateConfig, showcase, images, masks, tasks) -> dict:
    """A grid per protocol and method (rows: prompts, columns: seeds), a method-comparison grid per protocol
    (rows: prompts, columns: methods; first seed) and the SNF fusion-mask overlays of the showcased prompts."""
    from facediffuser.prompts import strip_markers
    from facediffuser.visualize import image_grid, mask_overlay

    import numpy as np
    import torch

    prompts = {(t["protocol"], t["subjects"], t["prompt_position"]): t["prompt"] for t in tasks}
    pictures: dict = {"chart": "metrics.png", "grids": {}, "overlays": []}
    for protocol in config.protocols:
        keys = [k for k in showcase if k[0] == protocol]
        for method in config.methods:
            cells = [images[(*k, method, i)] for k in keys for i in range(config.images_per_prompt)]
            labels = [f"{k[1]}: {strip_markers(prompts[k])}" if i == 0 else "" for k in keys
                      for i in range(config.images_per_prompt)]
            name = f"grid_{protocol}_{method}.png"
            image_grid(cells, columns=config.images_per_prompt, labels=labels).save(out / name)
            pictures["grids"][f"{protocol}-subject, {method}"] = name
        cells = [images[(*k, m, 0)] for k in keys for m in config.methods]
        labels = [m for _ in keys for m in config.methods]
        image_grid(cells, columns=len(config.methods), labels=labels).save(out / f"compare_{protocol}.png")
        pictures["grids"][f"{protocol}-subject, methods side by side (same seed)"] = f"compare_{protocol}.png"
        fused = "snf" if "snf" in config.methods else "average"
        for index, key in enumerate(k for k in keys if (*k, fused) in masks):
            mask = torch.from_numpy(np.asarray(masks[(*key, fused)], dtype=np.float32) / 255.0)
            name = f"overlay_{protocol}_{index}.png"
            mask_overlay(images[(*key, fused, 0)], mask).save(out / name)
            pictures["overlays"].append(name)
    return pictures


# --------------------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (FaceDiffuserPipeline, or one holding sdm/ and tdm/)")
    source.add_argument("--tiny", action="store_true", help="small random models (tests, trying the tool)")
    parser.add_argument("--subjects", required=True, help="directory of <id>/ref.jpg + <id>/noun.txt (man|woman)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--facenet-weights", default=None, metavar="PATH",
                        help="InceptionResnetV1 (VGGFace2) weights, .safetensors or .pt: FastComposer's identity metric")
    parser.add_argument("--clip", default=None, metavar="DIR_OR_ID", help="CLIP model for prompt consistency")
    parser.add_argument("--prompts-per-kind", type=int, default=None, help="use the first N prompts of each kind (≤10)")
    parser.add_argument("--max-pairs", type=int, default=None, help="multi-subject: at most N subject pairs")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--scheduler", default="ddim")
    parser.add_argument("--alpha", type=float, default=None, help="SNF window start as a fraction of the schedule")
    parser.add_argument("--beta", type=float, default=None, help="SNF window end as a fraction of the schedule")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--resolution", type=int, default=None, help="square image size (default: the model's)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per generation actor")
    parser.add_argument("--score-gpus", type=float, default=0.0, help="GPUs per scoring actor")
    parser.add_argument("--generate-actors", type=int, default=1)
    parser.add_argument("--score-actors", type=int, default=1)
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--showcase", type=int, default=8, help="prompts per protocol shown in grids and overlays")

    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines and progress dumps")

def config_from_args(args: argparse.Namespace) -> EvaluateConfig:
    return EvaluateConfig(
        subjects=args.subjects, out=args.out, model=args.model, tiny=args.tiny, protocol=args.protocol,
        images_per_prompt=args.images_per_prompt, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        facenet_weights=args.facenet_weights, clip=args.clip, prompts_per_kind=args.prompts_per_kind,
        max_pairs=args.max_pairs, steps=args.steps, guidance_scale=args.guidance_scale, scheduler=args.scheduler,
        alpha=args.alpha, beta=args.beta, seed=args.seed, resolution=args.resolution, num_gpus=args.num_gpus,
        score_gpus=args.score_gpus, generate_actors=args.generate_actors, score_actors=args.score_actors,
        actor_cpus=args.actor_cpus, showcase=args.showcase,
    )


def run(args: argparse.Namespace) -> int:
    report = evaluate(config_from_args(args), verbose=args.verbose)
    for protocol, methods in report["results"].items():
        for method, summary in methods.items():
            numbers = ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
            print(f"{protocol:6s} {method:9s} {numbers}")
    print(f"evaluate: {report['counts']['images']} images in {report['wall_time_s']:.1f} s → {args.out}/report.md")
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("evaluate")
