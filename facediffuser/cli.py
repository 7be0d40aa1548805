"""`facediffuser` command line. Each subcommand is a thin layer over a function that tests call directly.

Subcommands that need Ray live in `pipelines/` or `serving/` and are imported only when used, so the library
itself never imports Ray. A subcommand module provides `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name → (module, one-line help)
SUBCOMMANDS = {
    "generate": ("facediffuser.generate", "generate images of given people from a prompt and reference photos"),
    "preprocess": ("pipelines.preprocess", "Ray Data: photos → faces, person masks, captions → Parquet shards"),
    "train": ("pipelines.train", "Ray Train: fine-tune TDM and/or SDM from Parquet shards"),
    "serve": ("serving.app", "Ray Serve: run the HTTP API"),
    "evaluate": ("pipelines.evaluate", "benchmark identity and prompt consistency"),
    "import-official": (
        "facediffuser.official",
        "released Face-diffuser checkpoints + an SD1.5 directory → a model directory",
    ),
    "sample-photos": (
        "facediffuser.sample_photos",
        "write photos of 1-3 people (the bundled astronaut) to try the pipeline",
    ),
    "demo": ("pipelines.demo", "the whole system end to end on a sample dataset"),
    "subjects": ("facediffuser.subjects_cli", "a running service's saved subjects: add, list, rm (over HTTP)"),
}
# The subcommands that start or join Ray: each also takes --verbose (args.verbose), added here for all of them.
RAY_COMMANDS = ("preprocess", "train", "serve", "evaluate", "demo")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _available(module_name: str) -> bool:
    try:
        return importlib.util.find_spec(module_name) is not None
    except ModuleNotFoundError:
        return False


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """Only the selected subcommand's module is imported (Ray-backed ones are slow to import)."""
    parser = argparse.ArgumentParser(prog="facediffuser", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if not _available(module_name):
            continue
        command = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            module.add_arguments(command)
            if name in RAY_COMMANDS:
                add_verbose(command)
            command.set_defaults(_run=module.run)
    return parser


def add_verbose(parser: argparse.ArgumentParser) -> None:
    """--verbose: Ray's (and Serve's) own log lines and progress dumps on the terminal (cluster/runtime.py)."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's (and Serve's) own log lines and progress dumps on the terminal",
    )


def main(argv: list[str] | None = None) -> int:
    # Under `uv run`, Ray would start every worker through `uv run` in a copy of the working directory (a fresh
    # virtualenv per worker). The environment running this command is already complete: use it as it is.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"facediffuser {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C; or SIGTERM/SIGINT in a long-running command (cluster/stopping.py)
        print(f"facediffuser {args.command}: {getattr(exc, 'line', 'interrupted')}", file=sys.stderr)
        return getattr(exc, "exit_status", 130)  # 128 + the signal: 130 SIGINT, 143 SIGTERM
    except Exception as exc:  # a GPU its torch cannot see, raised in a Ray worker: its one line, not Ray's traceback
        from facediffuser.devices import device_error_line

        line = device_error_line(exc)
        if line is None:
            raise
        print(f"facediffuser {args.command}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())


def module_main(command: str) -> None:
    """`python -m pipelines.X ...` entrypoints (what `ray job submit` runs) share the CLI's parser and errors."""
    sys.exit(main([command, *sys.argv[1:]]))
