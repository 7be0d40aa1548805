"""facediffuser.config: the one config style (dataclass fields with help → argparse; from_args; from_dict)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from facediffuser.config import add_arguments, arg, from_args, from_dict


@dataclass
class Example:
    storage: str = arg(help="where runs live")
    data: list[str] = arg(help="inputs", nargs="+")
    max_steps: int = arg(1000, "optimizer steps")
    lr: float = arg(1e-5, "learning rate")
    base: str | None = arg(None, "base model", group="source")
    tiny: bool = arg(False, "small random models", group="source")
    precision: str = arg("bf16", "GPU only", choices=("bf16", "fp16", "no"))
    extras: dict = arg({}, cli=False)
    fail_at_step: int | None = arg(None, cli=False)


def parse(argv):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Example)
    return parser, parser.parse_args(argv)


def test_flags_defaults_types_and_help_come_from_the_dataclass():
    parser, args = parse(["--storage", "runs/", "--data", "a", "b", "--max-steps", "20", "--tiny"])
    config = from_args(Example, args)
    assert config == Example(storage="runs/", data=["a", "b"], max_steps=20, tiny=True)
    assert config.lr == 1e-5 and config.extras == {} and config.fail_at_step is None
    text = parser.format_help()
    assert "optimizer steps (default: 1000)" in text and "--fail-at-step" not in text and "--extras" not in text
    assert Example(storage="s", data=[]).extras is not Example(storage="s", data=[]).extras  # no shared default


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "a"], "--storage"),  # required: no default
        (["--storage", "s", "--data", "a", "--base", "b", "--tiny"], "not allowed with"),  # one group
        (["--storage", "s", "--data", "a", "--precision", "fp8"], "invalid choice"),
        (["--storage", "s", "--data", "a", "--max-steps", "many"], "invalid int value"),
    ],
)
def test_bad_command_lines_name_the_flag(argv, message):
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Example)
    with pytest.raises((argparse.ArgumentError, SystemExit)) as error:
        parser.parse_args(argv)
    if isinstance(error.value, argparse.ArgumentError):
        assert message in str(error.value)


def test_a_required_group_needs_one_of_its_flags():
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, Example, required_groups=("source",))
    with pytest.raises((argparse.ArgumentError, SystemExit)):
        parser.parse_args(["--storage", "s", "--data", "a"])
    assert parser.parse_args(["--storage", "s", "--data", "a", "--tiny"]).tiny


def test_from_dict_refuses_unknown_keys_by_name():
    assert from_dict(Example, {"storage": "s", "data": ["x"], "lr": 0.1}).lr == 0.1
    with pytest.raises(ValueError, match="serve.yaml: unknown key\\(s\\) learning_rate"):
        from_dict(Example, {"storage": "s", "data": [], "learning_rate": 0.1}, "serve.yaml")
    with pytest.raises(ValueError, match="expected a mapping"):
        from_dict(Example, ["storage"])
