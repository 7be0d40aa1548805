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
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from facediffuser import faults
from facediffuser.config import add_arguments as add_config_arguments
from facediffuser.config import arg, from_args
from facediffuser.metrics.protocol import METHODS, PROTOCOLS, check_methods
from facediffuser.metrics.subjects import (
    DEFAULT_NOUN,
    EvalSubject,
    check_references,
    load_eval_subjects,
    make_tasks,
    task_key,
)
from facediffuser.reference import DEFAULT_REFERENCE_MODE, REFERENCE_MODES, check_mode
from pipelines.evaluate_report import save_row, showcase_keys, write_report

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


# --------------------------------------------------------------------------------------------- the driver


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
        raise ValueError(
            f"--out {out} holds a results.jsonl without {SETTINGS_FILE} (not a run to continue): "
            "use another --out, or delete it"
        )
    previous = json.loads(saved.read_text())
    changed = sorted(k for k in {*settings, *previous} if settings.get(k) != previous.get(k))
    if changed:
        raise ValueError(
            f"--out {out} holds a run with other settings ({', '.join(changed)}): use the same "
            "settings to continue it, another --out, or delete it to start over"
        )
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
    return [row for images in found.values() if set(images) == set(range(images_per_prompt)) for row in images.values()]


def evaluate(config: EvaluateConfig, verbose: bool = False) -> dict:
    """Run the benchmark on the current Ray cluster (a local one is started when none is). Returns report.json.

    With OUT holding an unfinished run of the same settings, only its missing images are generated."""
    subjects, tasks = _checked_inputs(config)
    out = Path(config.out)
    kept = _open_output(config, out, subjects, tasks)
    started = time.time()
    done = {task_key(row) for row in kept}
    todo = [task for task in tasks if task_key(task) not in done]
    expected = len(tasks) * config.images_per_prompt
    if kept:
        print(f"evaluate: continuing {out}: {len(kept)} of {expected} images already there", flush=True)
    showcase = showcase_keys(tasks, config.showcase)
    with open(out / "results.jsonl", "a") as writer:
        new = _generate(config, todo, out, writer, set(showcase), verbose, (len(kept), expected)) if todo else []
    rows = kept + new
    if len(rows) != expected:  # every task accounted for: one row per requested image
        raise RuntimeError(f"evaluation lost images: {expected} requested, {len(rows)} came back")
    order = {task_key(task): task["task"] for task in tasks}
    rows.sort(key=lambda row: (order[task_key(row)], row["image_index"]))  # the same numbers however they came
    return write_report(config, out, subjects, tasks, rows, showcase, time.time() - started, len(new))


def _checked_inputs(config: EvaluateConfig) -> tuple[list[EvalSubject], list[dict]]:
    """The settings, the subjects (each reference photo showing a face) and FaceNet's weights checked before any
    model loads in an actor; → (subjects, tasks)."""
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
    return subjects, tasks


def _open_output(config: EvaluateConfig, out: Path, subjects: list[EvalSubject], tasks: list[dict]) -> list[dict]:
    """OUT with this run's run.json and the usable rows of a previous run of the same settings in results.jsonl
    (torn lines dropped); → those rows."""
    settings = run_settings(config, subjects)
    kept = resume_rows(out, settings, tasks, config.images_per_prompt)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    (out / "results.jsonl.tmp").write_text("".join(json.dumps(row) + "\n" for row in kept))
    (out / "results.jsonl.tmp").replace(out / "results.jsonl")
    return kept


def _generate(
    config: EvaluateConfig, todo: list[dict], out: Path, writer, showcase: set, verbose: bool, progress: tuple[int, int]
) -> list[dict]:
    """Generate and score `todo` on Ray Data; each image is written and its row appended as it arrives."""
    import ray
    from ray.data import ActorPoolStrategy
    from tqdm.auto import tqdm

    from cluster.runtime import init_ray
    from cluster.stopping import deferred
    from pipelines.evaluate_actors import GenerateImages, ScoreImages

    init_ray(verbose)  # joins a running Ray (a test session's, a cluster under `ray job submit`) or starts one
    ds = ray.data.from_items(todo, override_num_blocks=min(len(todo), 200))
    ds = ds.map_batches(
        GenerateImages,
        fn_constructor_args=(config,),
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=config.generate_actors),
        num_cpus=config.actor_cpus,
        num_gpus=config.num_gpus,
    )
    ds = ds.map_batches(
        ScoreImages,
        fn_constructor_args=(config,),
        batch_size=config.images_per_prompt,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=config.score_actors),
        num_cpus=config.actor_cpus,
        num_gpus=config.score_gpus,
    )
    stop_after = faults.armed_int("evaluate.stop_after")  # tests only (facediffuser/faults.py); None: off
    rows: list[dict] = []
    stream = ds.iter_rows()
    with tqdm(initial=progress[0], total=progress[1], desc="evaluate", unit="image") as bar:
        for row in stream:
            with deferred():  # a stop (SIGTERM/SIGINT) waits until the image and its line are both written
                rows.append(save_row(out, row, showcase))
                writer.write(json.dumps(rows[-1]) + "\n")
                writer.flush()
            bar.update(1)
            if stop_after and len(rows) >= stop_after:
                getattr(stream, "close", lambda: None)()  # stop the streaming executor (its actors) now
                faults.fire("evaluate.stop_after")
    return rows


# --------------------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, EvaluateConfig)


def run(args: argparse.Namespace) -> int:
    from cluster.stopping import stoppable

    with stoppable():  # SIGTERM/SIGINT: the rows in results.jsonl (and their images) stay, a rerun does the rest
        report = evaluate(from_args(EvaluateConfig, args), verbose=args.verbose)
    for protocol, methods in report["results"].items():
        for method, summary in methods.items():
            numbers = ", ".join(f"{k} {v:.3f}" for k, v in summary.items() if isinstance(v, float))
            print(f"{protocol:6s} {method:9s} {numbers}")
    print(f"evaluate: {report['counts']['images']} images in {report['wall_time_s']:.1f} s → {args.out}/report.md")
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("evaluate")
