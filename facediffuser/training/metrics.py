"""A training run's per-step metrics: the CSV table every checkpoint carries, and the loss-curve plot.

One row per optimizer step, columns `METRIC_COLUMNS`; `attempt` counts restarts (0 until the first failure), so
the plot marks where a run resumed from a checkpoint.
"""

from __future__ import annotations

import csv
from pathlib import Path

METRIC_COLUMNS = ("step", "attempt", "loss", "loss_den", "loss_loc", "lr", "grad_norm", "samples_per_s", "seconds")


def write_metrics(rows: list[dict], path: str | Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows({k: row[k] for k in METRIC_COLUMNS} for row in rows)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows `write_metrics` wrote, every value a float; [] when there is no file (a first attempt)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def plot_losses(rows: list[dict], out: str | Path, title: str = "") -> None:
    """L_den and L_loc against the step, side by side; a dashed line where a restart resumed the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    figure, (den_axis, loc_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    den_axis.plot(steps, [r["loss_den"] for r in rows], lw=1)
    den_axis.set(xlabel="step", ylabel="denoising loss", title=f"{title} L_den".strip())
    loc_axis.plot(steps, [r["loss_loc"] for r in rows], lw=1, color="tab:orange")
    loc_axis.set(xlabel="step", ylabel="localization loss", title=f"{title} L_loc".strip())
    for restart in sorted({r["step"] for r, p in zip(rows[1:], rows) if r["attempt"] != p["attempt"]}):
        for axis in (den_axis, loc_axis):
            axis.axvline(restart - 0.5, color="grey", ls="--", lw=0.8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
