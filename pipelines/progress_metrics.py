"""Progress of the Ray jobs as Prometheus metrics, through Ray's metrics (every node's export port serves them as
`ray_<name>`; infra/grafana/facediffuser.json charts them): photos through the preprocessing pools, optimizer steps
and the loss of each training run. Made once per worker process, on first use."""

from __future__ import annotations

from functools import cache

from ray.util.metrics import Counter, Gauge


@cache
def preprocess_items() -> Counter:
    return Counter(
        "facediffuser_preprocess_items_total",
        "photos accounted for by the preprocess driver: written, or rejected at a stage",
        tag_keys=("stage", "outcome"),
    )


@cache
def train_metrics() -> dict:
    return {
        "steps": Counter("facediffuser_train_steps_total", "optimizer steps taken, by model", tag_keys=("model",)),
        "loss": Gauge("facediffuser_train_loss", "the latest step's training loss, by model", tag_keys=("model",)),
    }
