"""Training progress between the Ray Train workers and the driver: a `ProgressBoard` actor that rank 0 of each run
writes its step and loss to, the driver's bars drawn from it (`show_progress`), and the function a worker calls to
report (`progress_reporter`)."""

from __future__ import annotations

from typing import Callable

from pipelines.progress_metrics import train_metrics
from pipelines.train_config import TrainConfig


class ProgressBoard:
    """A tiny actor (0 CPUs) that rank 0 of each run writes its step and loss to; the driver draws the bars."""

    def __init__(self):
        self.state: dict[str, dict] = {}

    def update(self, model: str, **fields) -> None:
        self.state.setdefault(model, {}).update(fields)

    def read(self) -> dict[str, dict]:
        return self.state


def show_progress(board, configs: list[TrainConfig], futures: list) -> None:
    """The driver's side of the board: one bar per model, fed by rank 0 of each run, until every run has finished."""
    import concurrent.futures

    import ray
    from tqdm.auto import tqdm

    bars = {
        c.model: tqdm(total=c.max_steps, desc=f"train {c.model}", position=i, mininterval=1.0, dynamic_ncols=True)
        for i, c in enumerate(configs)
    }
    said, exported = set(), train_metrics()  # Prometheus from the driver: workers may exit before Ray exports
    try:
        while True:
            finished = all(f.done() for f in futures)
            for model, state in ray.get(board.read.remote()).items():
                bar = bars[model]
                new_steps = state.get("step", 0) - max(bar.n, state.get("resumed_from") or 0)
                if new_steps > 0:  # Ray's counters take positive increments only
                    exported["steps"].inc(new_steps, tags={"model": model})
                if state.get("resumed_from") and model not in said:
                    said.add(model)
                    bar.write(f"{model}: resuming from the checkpoint at step {state['resumed_from']}")
                bar.n = state.get("step", 0)
                if "loss" in state:
                    bar.set_postfix(loss=f"{state['loss']:.4f}", refresh=False)
                    exported["loss"].set(state["loss"], tags={"model": model})
                bar.refresh()
            if finished:
                break
            concurrent.futures.wait(futures, timeout=1.0)
    finally:  # also when stopped (SIGTERM/SIGINT): the bars end before the command's last line
        for bar in bars.values():
            bar.close()


def progress_reporter(board, model: str, rank: int) -> Callable[..., None]:
    """What a worker calls with its progress fields: a write to the board on rank 0 (when there is a board), else
    nothing."""
    if board and rank == 0:
        return lambda **fields: board.update.remote(model, **fields)
    return lambda **fields: None
