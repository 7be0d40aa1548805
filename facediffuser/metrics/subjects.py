"""Benchmark subjects and tasks: one folder of photos per person → the pipeline calls to make (no Ray here).

Subjects: one folder per person holding any number of photos (several photos → one reference, embeddings
averaged) and an optional noun.txt (default noun "person").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

from facediffuser.metrics.protocol import IMAGE_SUFFIXES, build_tasks, single_nouns
from facediffuser.prompts import IMAGE_TOKEN

DEFAULT_NOUN = "person"  # subjects without noun.txt; their single-subject prompts read "a person <|image|> ..."


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

    photos = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
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
        raise ValueError(
            f"subject {folder.name}: class noun {noun!r} in {noun_file}; use {', '.join(nouns)} "
            f"(or no noun.txt for {DEFAULT_NOUN!r})"
        )
    return EvalSubject(folder.name, tuple(str(p) for p in photos), noun or DEFAULT_NOUN, bool(noun))


def make_tasks(subjects: list[EvalSubject], config) -> list[dict]:
    """`build_tasks` per protocol, each subject's photos as its reference. Single-subject prompts are listed per
    noun (man, woman): another noun takes the first list with its own noun in place of that one. `config`: an
    EvaluateConfig (protocols, methods, images_per_prompt, seed, prompts_per_kind, max_pairs)."""
    listed = single_nouns()
    by_id = {s.id: s for s in subjects}
    references = {s.photos[0]: s.reference for s in subjects}
    tasks: list[dict] = []
    for protocol in config.protocols:
        stand_ins = [
            replace(s, photos=s.photos[:1], noun=s.noun if protocol != "single" or s.noun in listed else listed[0])
            for s in subjects
        ]
        for task in build_tasks(
            stand_ins,
            [protocol],
            config.methods,
            images_per_prompt=config.images_per_prompt,
            seed=config.seed,
            prompts_per_kind=config.prompts_per_kind,
            max_pairs=config.max_pairs,
        ):
            task["references"] = json.dumps([references[path] for path in json.loads(task["references"])])
            noun = by_id[task["subjects"]].noun if protocol == "single" else None
            if noun is not None and noun not in listed:
                task["prompt"] = re.sub(rf"\b{listed[0]}(?= {re.escape(IMAGE_TOKEN)})", noun, task["prompt"])
            tasks.append({**task, "task": len(tasks)})
    return tasks


def task_key(row: dict) -> tuple:
    """What identifies one pipeline call across runs (the task number may differ; the settings must not)."""
    return row["protocol"], row["method"], row["subjects"], row["prompt_position"], row["prompt"], row["seed"]


def check_references(subjects: list[EvalSubject], thresholds=None) -> list[str]:
    """Every reference photo checked at the door (facediffuser/reference_checks.py: one clear face, large and sharp
    enough) and no two subjects showing one person; → the warnings. ReferenceRefused names the subject and photo."""
    from facediffuser.reference_checks import DEFAULT_THRESHOLDS, warnings_of
    from facediffuser.reference_checks import check_references as check

    names = [[f"subject {s.id}: {photo}" for photo in s.photos] for s in subjects]
    checks = check([list(s.photos) for s in subjects], thresholds or DEFAULT_THRESHOLDS, names=names)
    return warnings_of(checks)
