"""The one fault-injection mechanism, for tests only: nothing fires unless a test names its point. No Ray here.

A fault point is armed in one of two ways:

- the environment variable `FACEDIFFUSER_FAULTS`, comma-separated `point=value` pairs (values hold no commas),
  e.g. `FACEDIFFUSER_FAULTS=train.step=3,train.marker=/tmp/x/failed-once`. Drivers forward it to their Ray
  workers with the other variables they need (`forwarded_env()`), so a worker sees what the driver was given.
- `arm(point, value)` / `disarm(point)` in a long-running process (a Serve replica): the deployments' test-only
  `arm_fault` method, reached only through a Ray deployment handle, calls it. Arms made this way stay in that
  process (they are not forwarded) and win over the environment.

The points (value, who reads it, what happens):

- `preprocess.STAGE=ID`: facediffuser/data/stages.py (`StageGuard`, in every preprocessing worker). Stage STAGE
  (read, detect, segment, caption, link) raises on the input with id ID: one reject, the job goes on.
- `train.step=K`: pipelines/train_worker.py (every Ray Train worker). The last rank raises once, just before step
  K; `train.marker=FILE` names the file whose existence means it already did (default: `facediffuser-fail-RUN`
  in the temp directory), so the group Ray Train restarts does not fail again.
- `evaluate.stop_after=K`: pipelines/evaluate.py (the driver). It raises after recording K new images, as a
  crash would leave the run.
- `serve.sampler=KIND`, `serve.encoder=KIND` (KIND: RuntimeError or ValueError): serving/sampler.py and
  serving/encoder.py, armed in the replica. The next sampling / identity-scoring call raises that kind, once.

A fault raises `InjectedFault` (a RuntimeError; `InjectedValueError` is also a ValueError) whose message names
the point. A malformed `FACEDIFFUSER_FAULTS` or an unknown point is a ValueError naming the variable, so a typo
never silently turns a test's fault off. None of this is a user setting: no config field or CLI flag reaches it.
"""

from __future__ import annotations

import os

ENV = "FACEDIFFUSER_FAULTS"
POINTS = ("preprocess.", "train.step", "train.marker", "evaluate.stop_after", "serve.sampler", "serve.encoder")
# (`preprocess.` is a prefix: one point per stage name)

_armed_here: dict[str, str] = {}  # arm()/disarm(): this process only


class InjectedFault(RuntimeError):
    """A test's injected fault (see the module docstring); the message names the point."""


class InjectedValueError(InjectedFault, ValueError):
    """An injected fault that is also a ValueError (value `ValueError` of the serve points)."""


def _check_point(point: str) -> str:
    known = any(point.startswith(p) and len(point) > len(p) if p.endswith(".") else point == p for p in POINTS)
    if not known:
        raise ValueError(
            f"{ENV}: unknown fault point {point!r}; the points are "
            f"{', '.join(p + 'STAGE' if p.endswith('.') else p for p in POINTS)}"
        )
    return point


def parse(text: str) -> dict[str, str]:
    """`"a=1,b=x"` → {"a": "1", "b": "x"}; ValueError (naming ENV) for a pair without `=` or an unknown point."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        point, sep, value = part.partition("=")
        if not sep or not point.strip() or not value.strip():
            raise ValueError(f"{ENV}: {part!r} is not point=value (pairs are comma-separated, e.g. train.step=3)")
        pairs[_check_point(point.strip())] = value.strip()
    return pairs


def armed(point: str) -> str | None:
    """The value `point` is armed with (this process's arm() first, then ENV), or None: off."""
    if point in _armed_here:
        return _armed_here[point]
    text = os.environ.get(ENV)
    return parse(text).get(point) if text else None


def armed_int(point: str) -> int | None:
    value = armed(point)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{ENV}: {point}={value!r} must be an integer") from None


def arm(point: str, value: str = "RuntimeError") -> None:
    """Arm `point` in this process (a long-running one: a Serve replica), until disarm() or a one-off fire()."""
    _armed_here[_check_point(point)] = str(value)


def disarm(point: str | None = None) -> None:
    """Disarm `point` in this process (None: every point armed here). The environment is left as it is."""
    if point is None:
        _armed_here.clear()
    else:
        _armed_here.pop(point, None)


def fire(point: str, when: object = None, *, once: bool = False) -> None:
    """Raise InjectedFault if `point` is armed (and, given `when`, armed with that value); else nothing.

    `once`: disarm an arm() made in this process when it fires (the serve points). A point armed through the
    environment keeps firing; a caller that must fail once across processes keeps its own record (train.marker).
    """
    value = armed(point)
    if value is None or (when is not None and value != str(when)):
        return
    if once:
        _armed_here.pop(point, None)
    kind = InjectedValueError if value == "ValueError" else InjectedFault
    raise kind(f"injected test fault at {point}={value} ({ENV})")


def forwarded_env() -> dict[str, str]:
    """What a driver adds to the environment it gives its Ray workers: ENV when set (else nothing)."""
    return {ENV: os.environ[ENV]} if os.environ.get(ENV) else {}
