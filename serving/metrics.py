"""The app's Prometheus metrics, through Ray's metrics (every node's metrics agent serves them on its export port,
named `ray_<name>`; infra/grafana/facediffuser.json charts them beside Ray Serve's own). Each replica makes its
metric objects once, on first use (they only work inside a Ray worker)."""

from __future__ import annotations

from functools import cache

from ray.serve.metrics import Counter, Gauge, Histogram

SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300]
SIMILARITY = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # Ray takes positive bounds: <= 0.1 share one


@cache
def ingress_metrics() -> dict:
    return {
        "requests": Counter(
            "facediffuser_requests_total", "HTTP requests by route and status", tag_keys=("route", "status")
        ),
        "faces": Counter(
            "facediffuser_identity_faces_total",
            "generated subject faces scored against their reference, by outcome (scored, no_face)",
            tag_keys=("outcome",),
        ),
        "identity": Histogram(
            "facediffuser_identity_score",
            "dlib cosine similarity of each generated face to its reference (per image, per subject)",
            boundaries=SIMILARITY,
        ),
    }


@cache
def sampler_metrics() -> dict:
    return {
        "denoise": Histogram(
            "facediffuser_denoise_seconds", "seconds per snf_denoise call (one batch)", boundaries=SECONDS
        ),
        "batch": Histogram(
            "facediffuser_batch_requests",
            "requests per snf_denoise call (formed batch size)",
            boundaries=[1, 2, 3, 4, 6, 8, 12, 16, 32, 64],
        ),
        "queue": Gauge("facediffuser_sampler_queue_length", "requests waiting for the sampler"),
        "cancelled": Counter(
            "facediffuser_cancelled_requests_total",
            "requests and jobs cancelled while queued or running (client gone or DELETE /v1/jobs/ID)",
        ),
        "image_steps": Counter("facediffuser_image_steps_total", "images denoised through one step"),
    }


@cache
def job_metrics() -> dict:
    return {
        "jobs": Gauge("facediffuser_jobs", "jobs in the job book by state", tag_keys=("state",)),
        "finished": Counter("facediffuser_jobs_finished_total", "jobs that ended, by state", tag_keys=("state",)),
    }
