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
import time
from dataclasses import asdict
from pathlib import Path

from facediffuser import faults
from facediffuser.config import add_arguments as add_config_arguments
from facediffuser.config import from_args
from facediffuser.metrics.subjects import (
    DEFAULT_NOUN,
    EvalSubject,
    check_references,
    load_eval_subjects,
    make_tasks,
    task_key,
)
from pipelines.evaluate_config import RUN_ONLY_FIELDS, SETTINGS_FILE, EvaluateConfig
from pipelines.evaluate_report import save_row, showcase_keys, write_report

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
    for warning in check_references(subjects):
        print(f"evaluate: warning: {warning}", flush=True)
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
