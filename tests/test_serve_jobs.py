"""Asynchronous jobs over real HTTP: submit, poll, stream events, cancel; the job book shared by every ingress;
jobs scoped to their token; cancellation that really stops the sampler's work, for jobs and for a client that
hangs up on /v1/generate. Runs against the session's app (tests/serve_fixtures.py) plus two ingress-only apps in
front of its models: `/jobs-a` and `/jobs-b` with one token (two ingress replicas), `/jobs-other` with another."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import pytest
from serve_fixtures import MAIN_APP, decode_png

pytestmark = pytest.mark.slow
TOKEN, OTHER_TOKEN = "jobs-token", "other-token"
LONG = {"steps": 100, "width": 256, "height": 256}  # a few seconds of tiny-model work at least
SHORTER = {"steps": 40, "width": 192, "height": 192}  # long enough to cancel at step 10 with room to spare


@pytest.fixture(scope="module")
def routes(service):
    """Three ingress-only apps on the session's models: two with TOKEN, one with OTHER_TOKEN."""
    from ray import serve

    from serving.app import start
    from serving.settings import ServeConfig

    limits = {**service["config"].limits, "max_steps": 100, "max_side": 256}
    clients, names = {}, []
    for name, token in (("jobs-a", TOKEN), ("jobs-b", TOKEN), ("jobs-other", OTHER_TOKEN)):
        config = ServeConfig(
            **{
                **service["config"].__dict__,
                "app_name": name,
                "route_prefix": f"/{name}",
                "api_token": token,
                "limits": limits,
            }
        )
        url = start(config, upstream_app=MAIN_APP)
        clients[name] = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"})
        names.append(name)
    yield clients
    for name in names:
        clients[name].close()
        serve.delete(name)


def body(reference: str, **fields) -> dict:
    return {"prompt": "a man <|image|> on a beach", "references": [reference], "steps": 8, "seed": 5, **fields}


def events(client: httpx.Client, job_id: str, after: int = 0, stop=None) -> list[tuple[str, dict]]:
    """The job's Server-Sent Events until a terminal one (or `stop(name, data)` says so)."""
    seen = []
    headers = {"Last-Event-ID": str(after)} if after else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=120) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        name = data = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
            elif line == "" and name is not None:
                seen.append((name, data))
                if name in ("succeeded", "failed", "cancelled") or (stop and stop(name, data)):
                    break
                name = data = None
    return seen


def sampler_stats(service) -> dict:
    return service["client"].get("/v1/stats").json()["sampler"]


def test_a_job_runs_streams_its_steps_and_previews_and_gives_the_generate_result(service, routes):
    client, reference = routes["jobs-a"], service["reference"]
    submitted = client.post("/v1/jobs", json=body(reference, num_images=2))
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert submitted.headers["location"] == f"/jobs-a/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["state"] == "queued" and job["position"] >= 1

    stream = events(client, job["id"])
    names = [name for name, _ in stream]
    assert names[0] == "queued" and "started" in names and names[-1] == "succeeded", names
    steps = [data for name, data in stream if name == "step"]
    assert [s["step"] for s in steps] == list(range(1, 9)) and {s["steps"] for s in steps} == {8}
    # alpha 0.3, beta 0.6 of 8 iterations: s = 2, f = 5 (inclusive): 3 scene, 3 fusion, 2 subject steps
    assert [s["stage"] for s in steps] == ["scene"] * 3 + ["fusion"] * 3 + ["subjects"] * 2
    previews = [data for name, data in stream if name == "preview"]
    assert [p["step"] for p in previews] == [5]  # preview_every 5, none at the last step (the result is next)
    pictures = [decode_png(image) for image in previews[0]["images"]]
    assert len(pictures) == 2 and pictures[0].shape[-1] == 3 and pictures[0].shape[0] >= 32
    assert decode_png(previews[0]["fusion_mask"]).ndim == 2  # the fusion mask so far (fusion ran at steps 3-5)

    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["state"] == "succeeded" and done["result"] == stream[-1][1]
    direct = client.post("/v1/generate", json=body(reference, num_images=2)).json()
    assert done["result"]["images"] == direct["images"] and done["result"]["seeds"] == [5, 6]
    # resuming after an event id replays only what came later
    assert [name for name, _ in events(client, job["id"], after=len(stream) - 1)] == ["succeeded"]


def test_any_ingress_answers_for_a_job_and_another_token_gets_404(service, routes):
    reference = service["reference"]
    job = routes["jobs-a"].post("/v1/jobs", json=body(reference, steps=2)).json()
    deadline = time.monotonic() + 120
    while (state := routes["jobs-b"].get(f"/v1/jobs/{job['id']}").json()["state"]) not in ("succeeded", "failed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state == "succeeded"  # made through one ingress, read through the other
    for client in (routes["jobs-other"], service["client"]):  # another token; no token (the main app)
        for method, path in (("GET", ""), ("DELETE", ""), ("GET", "/events")):
            response = client.request(method, f"/v1/jobs/{job['id']}{path}")
            assert response.status_code == 404 and response.json()["error"] == "job_not_found", response.text
    assert routes["jobs-a"].get("/v1/jobs/0123").status_code == 404
    missing = httpx.get(f"{routes['jobs-a'].base_url}/v1/jobs/{job['id']}")  # no token at all
    assert missing.status_code == 401
    finished = routes["jobs-b"].delete(f"/v1/jobs/{job['id']}")
    assert finished.status_code == 409 and finished.json()["error"] == "job_finished"
    bad = routes["jobs-a"].post("/v1/jobs", json=body(reference, steps=1000))
    assert bad.status_code == 422  # checked before a job exists


def wait_for(condition, what: str, timeout_s: float = 120):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_cancelling_a_running_job_stops_its_rows_and_its_batch_mate_is_unchanged(service, routes):
    client, reference = routes["jobs-a"], service["reference"]
    before = sampler_stats(service)
    # A blocker keeps the sampler busy while the job and its batch mate (same steps, size, scheduler ...) queue,
    # so both are taken into one snf_denoise call when it goes.
    blocker = client.post("/v1/jobs", json=body(reference, seed=19, **LONG)).json()
    events(client, blocker["id"], stop=lambda name, data: name == "step")
    mate: dict = {}
    thread = threading.Thread(
        target=lambda: mate.update(
            response=routes["jobs-b"].post("/v1/generate", json=body(reference, seed=21, **SHORTER))
        )
    )
    job = client.post("/v1/jobs", json=body(reference, seed=20, num_images=2, **SHORTER)).json()
    thread.start()
    wait_for(lambda: sampler_stats(service)["queued"] == 2, "the job and its mate queue behind the blocker")
    assert client.delete(f"/v1/jobs/{blocker['id']}").json()["state"] == "cancelled"

    seen = events(client, job["id"], stop=lambda name, data: name == "step" and data["step"] >= 10)
    cancelled_at = seen[-1][1]["step"]
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200 and response.json()["state"] == "cancelled", response.text
    assert [name for name, _ in events(client, job["id"])][-1] == "cancelled"
    thread.join(timeout=600)
    mate_body = mate["response"].json()
    assert mate["response"].status_code == 200, mate_body
    assert mate_body["batch_requests"] == 2, "the job and its batch mate shared one snf_denoise call"

    after = sampler_stats(service)
    assert after["cancelled_requests"] == before["cancelled_requests"] + 2  # the blocker and the job
    shared = [b for b in after["recent_batches"] if b["requests"] == 2 and b["images"] == 3][-1]
    # The mate's image ran 40 steps, the job's two until they left the batch: at most a few steps after the one
    # its stream last showed when the DELETE went out, never all 40.
    job_steps = (shared["image_steps"] - 40) / 2
    assert shared["cancelled"] == 1 and cancelled_at <= job_steps <= cancelled_at + 5, (cancelled_at, shared)

    alone = routes["jobs-b"].post("/v1/generate", json=body(reference, seed=21, **SHORTER)).json()
    assert alone["batch_requests"] == 1
    got, want = decode_png(mate_body["images"][0]).astype(int), decode_png(alone["images"][0]).astype(int)
    assert np.abs(got - want).max() <= 1  # batch size changes float rounding only (docs/serving.md)


def test_a_queued_job_is_removed_from_the_queue(service, routes):
    client, reference = routes["jobs-a"], service["reference"]
    before = sampler_stats(service)
    running = client.post("/v1/jobs", json=body(reference, seed=30, **LONG)).json()
    events(client, running["id"], stop=lambda name, data: name == "step")  # the sampler is busy with it
    # another key (99 steps): it cannot join the running batch and waits for the next one
    queued = client.post("/v1/jobs", json=body(reference, seed=31, **{**LONG, "steps": 99})).json()
    wait_for(lambda: sampler_stats(service)["queued"] == 1, "the second job waits in the sampler's queue")
    assert client.get(f"/v1/jobs/{queued['id']}").json()["state"] == "queued"
    assert client.delete(f"/v1/jobs/{queued['id']}").json()["state"] == "cancelled"
    assert client.delete(f"/v1/jobs/{running['id']}").json()["state"] == "cancelled"
    # the cancelled queued job never reached the sampler: no `started` in its stream
    assert [name for name, _ in events(client, queued["id"])] == ["queued", "cancelled"]
    wait_for(
        lambda: sampler_stats(service)["cancelled_requests"] >= before["cancelled_requests"] + 2,
        "the sampler heard of both cancellations",
    )
    wait_for(lambda: sampler_stats(service)["batches_served"] > before["batches_served"], "the running batch ends")
    stats = sampler_stats(service)
    assert stats["batches_served"] == before["batches_served"] + 1 and stats["queued"] == 0  # the queued one never ran
    assert stats["recent_batches"][-1]["image_steps"] < 100  # the running one stopped early
    quiet = stats["denoised_image_steps"]
    time.sleep(2.0)
    assert sampler_stats(service)["denoised_image_steps"] == quiet  # nothing runs any more


def test_a_client_that_hangs_up_on_generate_stops_its_work(service, routes):
    reference = service["reference"]
    before = sampler_stats(service)
    with pytest.raises(httpx.ReadTimeout):
        routes["jobs-a"].post("/v1/generate", json=body(reference, seed=40, num_images=2, **LONG), timeout=3.0)
    wait_for(
        lambda: sampler_stats(service)["cancelled_requests"] > before["cancelled_requests"],
        "the sampler hears that the client left",
    )
    wait_for(
        lambda: (
            len(sampler_stats(service)["recent_batches"]) > len(before["recent_batches"])
            or sampler_stats(service)["batches_served"] > before["batches_served"]
        ),
        "its batch ends",
    )
    after = sampler_stats(service)
    assert after["recent_batches"][-1]["cancelled"] == 1
    assert after["recent_batches"][-1]["image_steps"] < 2 * 100  # it stopped before its 100 steps
    assert after["requests_served"] == before["requests_served"]  # and it was not counted as served
    time.sleep(1.0)
    assert sampler_stats(service)["denoised_image_steps"] == after["denoised_image_steps"]  # nothing runs


def test_more_jobs_than_the_sampler_holds_wait_their_turn_instead_of_failing(service, routes):
    """The sampler takes 8 requests and queues 4 (tests/serve_fixtures.py); 20 jobs at once all succeed: a job
    that finds the model tiers full stays queued and tries again, where /v1/generate would answer 503."""
    client, reference = routes["jobs-a"], service["reference"]
    jobs = [client.post("/v1/jobs", json=body(reference, seed=100 + k, steps=2)).json()["id"] for k in range(20)]
    wait_for(
        lambda: all(client.get(f"/v1/jobs/{j}").json()["state"] in ("succeeded", "failed") for j in jobs),
        "every job ends",
        timeout_s=300,
    )
    states = [client.get(f"/v1/jobs/{j}").json() for j in jobs]
    assert [s["state"] for s in states] == ["succeeded"] * 20, [s.get("error") for s in states]
    assert sorted(s["result"]["seeds"][0] for s in states) == list(range(100, 120))


def test_operators_scrape_the_app_metrics_from_ray(service, routes):
    """After the requests, jobs and cancellations above: every series the app exports is at Ray's endpoint."""
    from conftest import scrape_metrics
    from test_infra import dashboard_series

    client = routes["jobs-a"]
    job = client.post("/v1/jobs", json=body(service["reference"], steps=2)).json()
    events(client, job["id"])
    assert client.get("/v1/nothing-here").status_code == 404

    def labelled(series) -> bool:
        requests = "\n".join(series["ray_facediffuser_requests_total"])
        finished = "\n".join(series["ray_facediffuser_jobs_finished_total"])
        return (
            all(label in requests for label in ('route="/v1/jobs"', 'status="202"', 'route="/v1/jobs/{id}/events"'))
            and 'route="other"' in requests  # unknown paths share one label
            and 'status="404"' in requests
            # tiny random models draw no faces: the scoring ran and found none (the similarity histogram,
            # facediffuser_identity_score, gets samples only from real models' faces)
            and any('outcome="no_face"' in line for line in series["ray_facediffuser_identity_faces_total"])
            and 'state="succeeded"' in finished
            and 'state="cancelled"' in finished
        )

    # Every series the Grafana dashboard charts for the service is live (preprocessing and training ones are
    # checked by their own tests; the identity-score histogram needs faces, which tiny random models never draw).
    charted = {s for s in dashboard_series() if not any(p in s for p in ("preprocess", "train_", "identity_score"))}
    ours = {"ray_facediffuser_requests_total", "ray_facediffuser_jobs_finished_total"}
    ours |= {"ray_facediffuser_identity_faces_total", "ray_serve_num_http_requests_total"}
    assert labelled(scrape_metrics(sorted(charted | ours), until=labelled))
