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


# The losses each model trains with (facediffuser/training/step.py): the TDM's loss_loc column is zero by design.
TRAINED_LOSSES = {"tdm": ("loss_den",), "sdm": ("loss_den", "loss_loc")}
_LOSS_LABELS = {"loss_den": ("denoising loss", "L_den"), "loss_loc": ("localization loss", "L_loc")}


def loss_line(summary: dict) -> str:
    """ "loss_den 0.1234, loss_loc 0.0012": the last values of the losses `summary["model"]` trains with."""
    return ", ".join(f"{name} {summary[name]:.4f}" for name in TRAINED_LOSSES[summary["model"]])


def plot_losses(
    rows: list[dict], out: str | Path, title: str = "", losses: tuple[str, ...] = TRAINED_LOSSES["sdm"]
) -> None:
    """Each of `losses` (a model's TRAINED_LOSSES) against the step, side by side; a dashed line where a restart
    resumed the run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    figure, axes = plt.subplots(1, len(losses), figsize=(5 * len(losses), 3.5), squeeze=False)
    axes = list(axes[0])
    for axis, name, color in zip(axes, losses, ("tab:blue", "tab:orange")):
        ylabel, symbol = _LOSS_LABELS[name]
        axis.plot(steps, [r[name] for r in rows], lw=1, color=color)
        axis.set(xlabel="step", ylabel=ylabel, title=f"{title} {symbol}".strip())
    for restart in sorted({r["step"] for r, p in zip(rows[1:], rows) if r["attempt"] != p["attempt"]}):
        for axis in axes:
            axis.axvline(restart - 0.5, color="grey", ls="--", lw=0.8)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
