"""One config style for every stage: a dataclass per stage, fields declared with `arg(default, help, ...)`, checks
in its `.validate()` method, and three generic helpers: `add_arguments` (the command line, defaults and help read
from the dataclass), `from_args` and `from_dict` (YAML/JSON config files: unknown keys are an error).

    @dataclass
    class ExampleConfig:
        storage: str = arg(help="where runs live")                 # no default: a required flag
        max_steps: int = arg(1000, "optimizer steps")
        base: str | None = arg(None, "base model", group="source")  # --base and --tiny exclude each other
        tiny: bool = arg(False, "small random models", group="source")
        min_score: float = arg(0.9, cli=False)                      # not a flag: library callers set it

        def validate(self) -> None: ...
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from dataclasses import MISSING, fields


def arg(default=MISSING, help: str = "", *, cli: bool = True, group: str | None = None, **argparse_kwargs):
    """A dataclass field with its command-line help. `cli=False` keeps it off the command line; `group` puts flags
    in one mutually exclusive group; other keywords (choices, nargs, metavar, type) go to argparse as they are."""
    metadata = {"help": help, "cli": cli, "group": group, "argparse": argparse_kwargs}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _default(f: dataclasses.Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _scalar(annotation) -> type:
    """`int | None` → int, `list[str]` → str, `str | list[str]` → str: the type argparse converts each value to."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return _scalar(next(a for a in typing.get_args(annotation) if a is not type(None)))
    if origin in (list, tuple):
        return _scalar(typing.get_args(annotation)[0])
    return annotation if isinstance(annotation, type) else str


def add_arguments(parser: argparse.ArgumentParser, cls, required_groups: tuple[str, ...] = ()) -> None:
    """One `--flag-name` per field of `cls` that has `cli=True`, with the field's default, type and help. For a
    group named in `required_groups`, one of its flags must be given (argparse says so, with the usage line)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        default, kind = _default(f), _scalar(hints[f.name])
        target = parser
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=meta["group"] in required_groups)
            target = groups[meta["group"]]
        flag = "--" + f.name.replace("_", "-")
        help_text = meta.get("help", "")
        if kind is bool:
            target.add_argument(
                flag,
                action=argparse.BooleanOptionalAction if default else "store_true",
                default=bool(default),
                help=help_text,
            )
            continue
        options = {"type": kind, **meta.get("argparse", {})}
        if default is MISSING:
            options["required"] = True
        else:
            options["default"] = default
            if default not in (None, "", [], {}):
                help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        target.add_argument(flag, help=help_text, **options)


def from_args(cls, args: argparse.Namespace, **overrides):
    """The dataclass from parsed arguments (fields the command line does not carry keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def from_dict(cls, values: dict, where: str = "config"):
    """The dataclass from a mapping (a YAML/JSON file): a key that is not a field is an error naming it."""
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping of settings, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)
