"""The evaluation protocol (METHOD.md §6): prompt lists, seeds, the tasks per subject, and the methods compared.

The subjects come from `facediffuser/metrics/subjects.py` (one folder of photos per person, an optional
noun.txt); `build_tasks` takes anything with an `id`, a `reference` (what the pipeline takes) and a `noun`.

Prompts ship in `facediffuser/data/prompts/`: `single.json` ({kind: {noun: [10 prompts]}}) and `multi.json`
({kind: [10 templates with {a} and {b} for the two nouns]}), four kinds each: accessory, style, action, context.
Every image has a fixed seed that depends only on the prompt's position and the image index, so all methods
(and all subjects given the same prompt) start from the same noise.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources

from facediffuser.sampling import FusionOptions

KINDS = ("accessory", "style", "action", "context")
PROTOCOLS = ("single", "multi")
METHODS = ("snf", "sdm-only", "tdm-only", "average")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def load_prompts(protocol: str) -> dict:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")
    text = resources.files("facediffuser.data").joinpath("prompts", f"{protocol}.json").read_text()
    return {kind: value for kind, value in json.loads(text).items() if kind in KINDS}


def single_nouns() -> tuple[str, ...]:
    return tuple(load_prompts("single")[KINDS[0]])


def _take(prompts: list[str], per_kind: int | None) -> list[str]:
    return prompts if per_kind is None else prompts[:per_kind]


def build_tasks(
    subjects: list,
    protocols: list[str],
    methods: list[str],
    *,
    images_per_prompt: int,
    seed: int,
    prompts_per_kind: int | None = None,
    max_pairs: int | None = None,
) -> list[dict]:
    """One task per (protocol, subjects, prompt, method): a pipeline call making `images_per_prompt` images.

    Image k of the prompt at position p of its protocol's list uses seed `seed + p * images_per_prompt + k`.
    """
    tasks = []
    for protocol in protocols:
        prompts = load_prompts(protocol)
        if protocol == "single":
            groups = [(subject,) for subject in subjects]
        else:
            groups = list(itertools.combinations(subjects, 2))[:max_pairs]
            if not groups:
                raise ValueError("the multi-subject protocol needs at least 2 subjects")
        for group in groups:
            position = 0
            for kind in KINDS:
                if protocol == "single":
                    texts = _take(prompts[kind][group[0].noun], prompts_per_kind)
                else:
                    texts = [t.format(a=group[0].noun, b=group[1].noun) for t in _take(prompts[kind], prompts_per_kind)]
                for text in texts:
                    for method in methods:
                        tasks.append(
                            {
                                "task": len(tasks),
                                "protocol": protocol,
                                "method": method,
                                "kind": kind,
                                "prompt": text,
                                "prompt_position": position,
                                "subjects": "+".join(s.id for s in group),
                                "references": json.dumps([s.reference for s in group]),
                                "seed": seed + position * images_per_prompt,
                            }
                        )
                    position += 1
    return tasks


def check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}")
    return methods


def method_arguments(method: str, num_iterations: int, alpha: float | None = None, beta: float | None = None) -> dict:
    """Pipeline keyword arguments for each compared method; all use the same sampler and seeds.

    snf: Saliency-adaptive Noise Fusion over the window (alpha, beta). sdm-only: s = f = -1, every step SDM.
    tdm-only: s = f = N-1, every step TDM (the references are ignored). average: the same window as snf with the
    two noises averaged instead of chosen by saliency.
    """
    if method in ("snf", "average"):
        arguments = {"alpha": alpha, "beta": beta}
        if method == "average":
            arguments["fusion"] = FusionOptions(mode="average")
        return arguments
    if method == "sdm-only":
        return {"start_merge_step": -1, "final_step": -1}
    if method == "tdm-only":
        return {"start_merge_step": num_iterations - 1, "final_step": num_iterations - 1}
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
