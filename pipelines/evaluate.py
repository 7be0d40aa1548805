"""`facediffuser evaluate` / `python -m pipelines.evaluate`: the FastComposer/Face-diffuser benchmark on Ray Data.

tasks (protocol × subjects × prompt × method, fixed seeds) → GenerateImages actors (the pipeline loaded once per
actor; `--num-gpus` each) → ScoreImages actors (dlib / FaceNet identity, CLIP prompt consistency) → the driver
streams the rows, writes every image and results.jsonl, then report.md, report.json, a bar chart, a result grid
per method, a method-comparison grid and fusion-mask overlays into OUT.

Subjects: one folder per person holding any number of photos (several photos → one reference, embeddings
averaged) and an optional noun.txt (default noun "person"). A rerun with the same --out and settings continues
from results.jsonl: only the missing tasks are generated, with the same seeds, and the report is written anew.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from facediffuser.metrics.protocol import (IMAGE_SUFFIXES, METHODS, PROTOCOLS, Subject, build_tasks, check_methods,
                                           method_arguments, single_nouns)
from facediffuser.prompts import IMAGE_TOKEN

HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEFAULT_NOUN = "person"  # subjects without noun.txt; their single-subject prompts read "a person <|image|> ..."
SETTINGS_FILE = "run.json"  # the settings that made OUT's results.jsonl; a rerun continues only with the same ones
STOP_AFTER_ENV = "FACEDIFFUSER_EVAL_STOP_AFTER"  # test-only fault: stop once this many new images are recorded
# --quick: a look at a model in minutes, not the protocol; options given explicitly still win
PRESETS = {"full": {"images_per_prompt": 4, "prompts_per_kind": None, "steps": 50, "max_pairs": None},
           "quick": {"images_per_prompt": 1, "prompts_per_kind": 2, "steps": 10, "max_pairs": 1}}
# config fields that change how a run is executed or shown, not its images or numbers (left out of run.json)
RUN_ONLY_FIELDS = ("subjects", "out", "quick", "num_gpus", "score_gpus", "generate_actors", "score_actors",
                   "actor_cpus", "showcase")


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
    quick: bool = False  # the --quick preset filled in the options not given (recorded for the report)

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
            from facediffuser import model_dir

            root = Path(model_dir.resolve(self.model)) if self.model else Path("")  # runs/NAME → its final/
            if not self.model or not root.is_dir():
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


# ---------------------------------------------------------------------------------------- subjects and tasks


@dataclass(frozen=True)
class EvalSubject:
    """One person: every photo in its folder (several → one reference, embeddings averaged) and its class noun."""

    id: str
    photos: tuple[str, ...]
    noun: str
    noun_given: bool = True  # False: no noun.txt, DEFAULT_NOUN used

    @property
    def reference(self):
        """What the pipeline and the identity scorers take for one subject: a path, or a list of paths."""
        return self.photos[0] if len(self.photos) == 1 else list(self.photos)


def load_eval_subjects(directory: str | Path) -> list[EvalSubject]:
    """Every `<id>/` folder of `directory` (hidden ones skipped), sorted by id; errors name the folder at fault."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"--subjects directory not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"--subjects {root}: no subject folders (expected one folder of photos per person)")
    return [_load_subject(folder) for folder in folders]


def _load_subject(folder: Path) -> EvalSubject:
    """Any image file in the folder is a photo of the person (any name; hidden files skipped); each must decode."""
    from facediffuser.images import ImageDecodeError, load_image

    photos = sorted(p for p in folder.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not photos:
        raise ValueError(f"subject {folder.name}: no image ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    for photo in photos:
        try:
            load_image(photo)
        except ImageDecodeError as exc:
            raise ValueError(f"subject {folder.name}: unreadable image in {folder}: {exc}") from None
    nouns = (*single_nouns(), DEFAULT_NOUN)
    noun_file = folder / "noun.txt"
    noun = noun_file.read_text(errors="replace").strip().lower() if noun_file.is_file() else ""
    if noun and noun not in nouns:
        raise ValueError(f"subject {folder.name}: class noun {noun!r} in {noun_file}; use {', '.join(nouns)} "
                         f"(or no noun.txt for {DEFAULT_NOUN!r})")
    return EvalSubject(folder.name, tuple(str(p) for p in photos), noun or DEFAULT_NOUN, bool(noun))


def make_tasks(subjects: list[EvalSubject], config: EvaluateConfig) -> list[dict]:
    """`build_tasks` per protocol, each subject's photos as its reference. Single-subject prompts are listed per
    noun (man, woman): another noun takes the first list with its own noun in place of that one."""
    listed = single_nouns()
    by_id = {s.id: s for s in subjects}
    references = {s.photos[0]: s.reference for s in subjects}
    tasks: list[dict] = []
    for protocol in config.protocols:
        stand_ins = [Subject(s.id, s.photos[0], s.noun if protocol != "single" or s.noun in listed else listed[0])
                     for s in subjects]
        for task in build_tasks(stand_ins, [protocol], config.methods, images_per_prompt=config.images_per_prompt,
                                seed=config.seed, prompts_per_kind=config.prompts_per_kind,
                                max_pairs=config.max_pairs):
            task["references"] = json.dumps([references[path] for path in json.loads(task["references"])])
            noun = by_id[task["subjects"]].noun if protocol == "single" else None
            if noun is not None and noun not in listed:
                task["prompt"] = re.sub(rf"\b{listed[0]}(?= {re.escape(IMAGE_TOKEN)})", noun, task["prompt"])
            tasks.append({**task, "task": len(tasks)})
    return tasks


def task_key(row: dict) -> tuple:
    """What identifies one pipeline call across runs (the task number may differ; the settings must not)."""
    return row["protocol"], row["method"], row["subjects"], row["prompt_position"], row["prompt"], row["seed"]


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
        from facediffuser.model_dir import load_pipeline
        from facediffuser.schedulers import make_scheduler

        self.config = config
        self.pipe = load_pipeline(config.model, config.tiny).to(_device(config.num_gpus))
        self.pipe.scheduler = make_scheduler(config.scheduler, self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.num_iterations = self.pipe.resolve_boundaries(config.steps)[0]
        self.references: dict[str, object] = {}

    def _reference(self, entry):
        """One subject's reference: a path, or a list of paths (several photos of one person)."""
        from facediffuser.images import load_image

        if isinstance(entry, list):
            return [self._reference(path) for path in entry]
        if entry not in self.references:
            self.references[entry] = load_image(entry)
        return self.references[entry]

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
                references = [scorer.reference(entry, key=json.dumps(entry)) for entry in json.loads(row["references"])]
                result = scorer.score(image, references)
                row.update({f"identity_{name}": result.score, f"faces_{name}": result.num_faces,
                            f"missing_{name}": result.missing_faces, f"duplicate_{name}": result.duplicate,
                            f"similarities_{name}": json.dumps(result.similarities)})
        if self.clip is not None:
            for row, score in zip(rows, self.clip.score(images, [row["prompt"] for row in rows])):
                row["prompt_clip"] = score
        return pa.Table.from_pylist(rows)


# --------------------------------------------------------------------------------------------- the driver


class InjectedFault(RuntimeError):
    """Raised by the test-only fault flag (FACEDIFFUSER_EVAL_STOP_AFTER) after that many new images are recorded."""


def check_references(subjects: list[EvalSubject]) -> None:
    """Every reference photo must show a face (else its identity scores would mean nothing)."""
    from facediffuser.images import load_image
    from facediffuser.metrics.identity import DlibEmbedder

    embedder = DlibEmbedder()
    for subject in subjects:
        for photo in subject.photos:
            if not len(embedder.embed_faces(load_image(photo))):
                raise ValueError(f"subject {subject.id}: no face found in its reference photo {photo}")


def run_settings(config: EvaluateConfig, subjects: list[EvalSubject]) -> dict:
    """Everything that decides the images and the numbers: a rerun continues only when these are the same."""
    settings = {k: v for k, v in asdict(config).items() if k not in RUN_ONLY_FIELDS}
    if config.model:
        settings["model"] = str(Path(config.model).resolve())
    settings["subjects"] = [[s.id, s.noun, [Path(p).name for p in s.photos]] for s in subjects]
    return json.loads(json.dumps(settings))


def resume_rows(out: Path, settings: dict, tasks: list[dict], images_per_prompt: int) -> list[dict]:
    """The rows of a previous run in OUT with the same settings, for tasks with every image recorded and on disk.

    Lines that do not parse (one torn by a kill) are skipped; their tasks are generated again.
    """
    results, saved = out / "results.jsonl", out / SETTINGS_FILE
    if not results.is_file():
        return []
    if not saved.is_file():
        raise ValueError(f"--out {out} holds a results.jsonl without {SETTINGS_FILE} (not a run to continue): "
                         "use another --out, or delete it")
    previous = json.loads(saved.read_text())
    changed = sorted(k for k in {*settings, *previous} if settings.get(k) != previous.get(k))
    if changed:
        raise ValueError(f"--out {out} holds a run with other settings ({', '.join(changed)}): use the same "
                         "settings to continue it, another --out, or delete it to start over")
    index = {task_key(task): task for task in tasks}
    found: dict[tuple, dict[int, dict]] = {}
    for line in results.read_text().splitlines():
        try:
            row = json.loads(line)
            task = index.get(task_key(row))
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if task is not None and row.get("file") and (out / row["file"]).is_file():
            found.setdefault(task_key(row), {})[row["image_index"]] = {**row, "task": task["task"]}
    return [row for images in found.values() if set(images) == set(range(images_per_prompt))
            for row in images.values()]


def evaluate(config: EvaluateConfig, verbose: bool = False) -> dict:
    """Run the benchmark on the current Ray cluster (a local one is started when none is). Returns report.json.

    With OUT holding an unfinished run of the same settings, only its missing images are generated."""
    config.validate()
    subjects = load_eval_subjects(config.subjects)
    tasks = make_tasks(subjects, config)
    defaulted = [s.id for s in subjects if not s.noun_given]
    if defaulted:
        print(f"evaluate: no noun.txt for {', '.join(defaulted)}: using the noun {DEFAULT_NOUN!r}", flush=True)
    check_references(subjects)
    if config.facenet_weights:  # a wrong file fails here, in one line, not inside an actor
        from facediffuser.metrics.identity import FacenetEmbedder

        FacenetEmbedder(config.facenet_weights)
    out = Path(config.out)
    settings = run_settings(config, subjects)
    kept = resume_rows(out, settings, tasks, config.images_per_prompt)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    started = time.time()
    done = {task_key(row) for row in kept}
    todo = [task for task in tasks if task_key(task) not in done]
    expected = len(tasks) * config.images_per_prompt
    if kept:
        print(f"evaluate: continuing {out}: {len(kept)} of {expected} images already there", flush=True)
    showcase = _showcase_keys(tasks, config.showcase)
    results = out / "results.jsonl"
    (out / "results.jsonl.tmp").write_text("".join(json.dumps(row) + "\n" for row in kept))
    (out / "results.jsonl.tmp").replace(results)  # the previous run's usable rows, torn lines dropped
    with open(results, "a") as writer:
        new = _generate(config, todo, out, writer, set(showcase), verbose, (len(kept), expected)) if todo else []
    rows = kept + new
    if len(rows) != expected:  # every task accounted for: one row per requested image
        raise RuntimeError(f"evaluation lost images: {expected} requested, {len(rows)} came back")
    order = {task_key(task): task["task"] for task in tasks}
    rows.sort(key=lambda row: (order[task_key(row)], row["image_index"]))  # the same numbers however they came
    return _report(config, out, subjects, tasks, rows, showcase, time.time() - started, len(new))


def _generate(config: EvaluateConfig, todo: list[dict], out: Path, writer, showcase: set, verbose: bool,
              progress: tuple[int, int]) -> list[dict]:
    """Generate and score `todo` on Ray Data; each image is written and its row appended as it arrives."""
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm.auto import tqdm

    from pipelines.ray_runtime import init_ray

    init_ray(verbose)  # joins a running Ray (a test session's, a cluster under `ray job submit`) or starts one
    ds = ray.data.from_items(todo, override_num_blocks=min(len(todo), 200))
    ds = ds.map_batches(GenerateImages, fn_constructor_args=(config,), batch_size=1, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=config.generate_actors),
                        num_cpus=config.actor_cpus, num_gpus=config.num_gpus)
    ds = ds.map_batches(ScoreImages, fn_constructor_args=(config,), batch_size=config.images_per_prompt,
                        batch_format="pyarrow", compute=ActorPoolStrategy(size=config.score_actors),
                        num_cpus=config.actor_cpus, num_gpus=config.score_gpus)
    stop_after = int(os.environ.get(STOP_AFTER_ENV) or 0)
    rows: list[dict] = []
    stream = ds.iter_rows()
    with tqdm(initial=progress[0], total=progress[1], desc="evaluate", unit="image") as bar:
        for row in stream:
            rows.append(_save_row(out, row, showcase))
            writer.write(json.dumps(rows[-1]) + "\n")
            writer.flush()
            bar.update(1)
            if stop_after and len(rows) >= stop_after:
                getattr(stream, "close", lambda: None)()  # stop the streaming executor (its actors) now
                raise InjectedFault(f"injected fault after {len(rows)} new images ({STOP_AFTER_ENV})")
    return rows


def _save_row(out: Path, row: dict, showcase: set) -> dict:
    """Write the row's image (and, for a showcased prompt's first image, its fusion mask); → the row to record."""
    image_bytes, mask_bytes = row.pop("image"), row.pop("mask")
    stem = f"{row['protocol']}/{row['method']}/{row['subjects']}_{row['prompt_position']:02d}"
    row["file"] = f"images/{stem}_{row['image_index']}.png"
    (out / row["file"]).parent.mkdir(parents=True, exist_ok=True)
    (out / row["file"]).write_bytes(image_bytes)
    if mask_bytes and row["image_index"] == 0 and (row["protocol"], row["subjects"], row["prompt_position"]) in showcase:
        row["mask_file"] = f"masks/{stem}.png"
        (out / row["mask_file"]).parent.mkdir(parents=True, exist_ok=True)
        (out / row["mask_file"]).write_bytes(mask_bytes)
    return row


def _report(config: EvaluateConfig, out: Path, subjects, tasks, rows, showcase, wall: float, generated: int) -> dict:
    """report.json / report.md, the bar chart and the pictures, from every row (this run's and a previous one's)."""
    from PIL import Image

    from facediffuser import model_dir
    from facediffuser.manifest import directory_hash, package_versions
    from facediffuser.metrics.report import aggregate, bar_chart, write_reports

    identity_names = ["dlib"] + (["facenet"] if config.facenet_weights else [])
    table = aggregate(rows, identity_names, with_clip=bool(config.clip))
    images, masks = {}, {}
    for row in rows:
        key = (row["protocol"], row["subjects"], row["prompt_position"])
        if key in showcase:
            images[(*key, row["method"], row["image_index"])] = Image.open(out / row["file"]).convert("RGB")
            if row.get("mask_file") and (out / row["mask_file"]).is_file():
                masks[(*key, row["method"])] = Image.open(out / row["mask_file"])
    pictures = _pictures(out, config, showcase, images, masks, tasks)
    bar_chart(table, out / pictures["chart"])
    model = Path(model_dir.resolve(config.model) if config.model else ".")  # runs/NAME → its final/
    missing = ([] if config.facenet_weights else ["FastComposer identity (give --facenet-weights)"]) + (
        [] if config.clip else ["prompt consistency (give --clip)"])
    meta = {
        "model": "tiny" if config.tiny else config.model,
        "model_hashes": {} if config.tiny else {
            str(p): directory_hash(p) for p in ([model / "sdm", model / "tdm"] if (model / "sdm").is_dir() else [model])},
        "config": asdict(config),
        "subjects": [asdict(s) for s in subjects],
        "counts": {"tasks": len(tasks), "images": len(rows)},
        "resumed_images": len(rows) - generated,  # taken from a previous run in OUT
        "missing_metrics": missing,
        "versions": package_versions((*("facediffuser", "torch", "diffusers", "transformers", "ray", "numpy"),
                                      "facenet-pytorch", "dlib-bin")),
        "wall_time_s": round(wall, 3),
        "images_per_s": round(generated / max(wall, 1e-9), 4),  # images generated by this run
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
    parser.add_argument("--subjects", required=True,
                        help="one folder per person: its photos (any image name; several are averaged) and an "
                             f"optional noun.txt (man|woman; default {DEFAULT_NOUN})")
    parser.add_argument("--out", required=True, help="output directory; a rerun with the same settings continues it")
    parser.add_argument("--quick", action="store_true",
                        help="a quick look, not the protocol: defaults become --prompts-per-kind 2 "
                             "--images-per-prompt 1 --steps 10 --max-pairs 1 (given options still win)")
    parser.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both")
    parser.add_argument("--images-per-prompt", type=int, default=None, help="default 4 (--quick: 1)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {','.join(METHODS)}")
    parser.add_argument("--facenet-weights", default=None, metavar="PATH",
                        help="InceptionResnetV1 (VGGFace2) weights, .safetensors or .pt: FastComposer's identity metric")
    parser.add_argument("--clip", default=None, metavar="DIR_OR_ID", help="CLIP model for prompt consistency")
    parser.add_argument("--prompts-per-kind", type=int, default=None,
                        help="use the first N prompts of each kind (≤10; default all 10, --quick: 2)")
    parser.add_argument("--max-pairs", type=int, default=None,
                        help="multi-subject: at most N subject pairs (default all, --quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="default 50 (--quick: 10)")
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
    preset = PRESETS["quick" if args.quick else "full"]
    given = {name: getattr(args, name) for name in preset}
    sizes = {name: preset[name] if value is None else value for name, value in given.items()}
    return EvaluateConfig(
        subjects=args.subjects, out=args.out, model=args.model, tiny=args.tiny, protocol=args.protocol,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()], facenet_weights=args.facenet_weights,
        clip=args.clip, guidance_scale=args.guidance_scale, scheduler=args.scheduler, alpha=args.alpha,
        beta=args.beta, seed=args.seed, resolution=args.resolution, num_gpus=args.num_gpus,
        score_gpus=args.score_gpus, generate_actors=args.generate_actors, score_actors=args.score_actors,
        actor_cpus=args.actor_cpus, showcase=args.showcase, quick=args.quick, **sizes,
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
