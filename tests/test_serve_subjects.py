"""Saved subjects over real HTTP: save a person's photos once, generate (and run jobs) with the subject's id, delete
it with nothing left in the store or the encoder's memory; subjects scoped to their token and capped per token; bad
input as 4xx; the `facediffuser subjects` command against the running service. Runs against the session's app
(tests/serve_fixtures.py) plus two ingress-only apps in front of its models that keep subjects in one S3 store
(moto's real S3 protocol): `/subjects-a` with one token, `/subjects-b` with another."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_fixtures import MAIN_APP, png_b64

pytestmark = pytest.mark.slow
TOKEN, OTHER_TOKEN = "subjects-token", "subjects-other-token"
BUCKET = "saved-subjects"
STORE = f"s3://{BUCKET}/store"
CAP = 3  # saved subjects per token in these apps


@pytest.fixture(scope="module")
def apps(service, s3_endpoint):
    """Two ingress-only apps on the session's models, one S3 subject store, a token each."""
    import boto3
    from ray import serve

    from serving.app import start
    from serving.settings import ServeConfig

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    clients = {}
    for name, token in (("subjects-a", TOKEN), ("subjects-b", OTHER_TOKEN)):
        config = ServeConfig(
            **{
                **service["config"].__dict__,
                "app_name": name,
                "route_prefix": f"/{name}",
                "api_token": token,
                "subject_store": STORE,
                "max_subjects_per_token": CAP,
            }
        )
        url = start(config, upstream_app=MAIN_APP)
        clients[name] = httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {token}"})
    yield clients
    for name, client in clients.items():
        client.close()
        serve.delete(name)


def store_objects() -> list[str]:
    import boto3

    return sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET).get("Contents", []))


def body(**fields) -> dict:
    return {"prompt": "a man <|image|> on a beach", "steps": 4, "seed": 7, **fields}


def finished_job(client: httpx.Client, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while (job := client.get(f"/v1/jobs/{job_id}").json())["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def test_a_saved_subject_generates_as_its_photo_inline_and_deleting_it_erases_it(apps, astronaut):
    client = apps["subjects-a"]
    photo = png_b64(np.ascontiguousarray(astronaut[:, ::-1]))  # a photo no other test sends: none of it cached
    cache_before = client.get("/v1/stats").json()["encoder_cache"]
    saved = client.post("/v1/subjects", json={"photos": [photo], "name": "astronaut"})
    assert saved.status_code == 201, saved.text
    subject = saved.json()
    subject_id = subject.pop("id")
    assert saved.headers["location"] == f"/subjects-a/v1/subjects/{subject_id}" == subject.pop("links")["self"]
    info = client.get("/v1/info").json()
    assert info["subjects"] == {"store": "s3", "max_per_token": CAP}
    assert subject["num_photos"] == 1 and subject["reference_mode"] == "whole" and subject["name"] == "astronaut"
    assert subject["model_version"] == info["model_version"] and subject["kept_photos"] is False
    assert client.get(f"/v1/subjects/{subject_id}").json() == {"id": subject_id, **subject}
    assert [s["id"] for s in client.get("/v1/subjects").json()["subjects"]] == [subject_id]
    files = [key.rsplit("/", 1)[-1] for key in store_objects() if subject_id in key and not key.endswith("/")]
    assert sorted(files) == ["features.safetensors", "subject.json"]  # the photo itself was not kept

    by_subject = client.post("/v1/generate", json=body(subjects=[subject_id]))
    assert by_subject.status_code == 200, by_subject.text
    job = client.post("/v1/jobs", json=body(subjects=[subject_id]))
    assert job.status_code == 202, job.text
    done = finished_job(client, job.json()["id"])
    assert done["state"] == "succeeded" and done["result"]["images"] == by_subject.json()["images"]
    cache_after = client.get("/v1/stats").json()["encoder_cache"]
    # nothing of the subject is held in the encoder's memory: its caches did not grow by saving or using it
    assert (cache_after["cached"], cache_after["identity_cached"]) == (
        cache_before["cached"],
        cache_before["identity_cached"],
    )

    inline = client.post("/v1/generate", json=body(references=[photo])).json()
    manifest, inline_manifest = by_subject.json()["manifest"], inline["manifest"]
    assert manifest["embedding_sha256"] == inline_manifest["embedding_sha256"]  # bit for bit
    assert manifest["references"] == [[f"subject:{subject_id}"]]  # the subject's id in place of photo hashes
    assert inline_manifest["references"] == [[hashlib.sha256(base64.b64decode(photo)).hexdigest()]]
    assert by_subject.json()["images"] == inline["images"]
    assert by_subject.json()["identity_scores"] == inline["identity_scores"]

    deleted = client.delete(f"/v1/subjects/{subject_id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": subject_id, "deleted": True}
    for response in (
        client.get(f"/v1/subjects/{subject_id}"),
        client.delete(f"/v1/subjects/{subject_id}"),
        client.post("/v1/generate", json=body(subjects=[subject_id])),
    ):
        assert response.status_code == 404 and response.json()["error"] == "subject_not_found", response.text
    assert client.get("/v1/subjects").json()["subjects"] == []
    left = store_objects()  # at most pyarrow's empty "directory" markers of the store and the owner
    assert not [key for key in left if subject_id in key] and all(key.endswith("/") for key in left), left


def test_subjects_belong_to_their_token_and_each_token_keeps_a_bounded_number(service, apps):
    a, b, photo = apps["subjects-a"], apps["subjects-b"], service["reference"]
    ids = [a.post("/v1/subjects", json={"photos": [photo], "name": f"s{k}"}).json()["id"] for k in range(CAP)]
    over = a.post("/v1/subjects", json={"photos": [photo]})
    assert over.status_code == 409 and over.json()["error"] == "too_many_saved_subjects", over.text
    assert [s["id"] for s in a.get("/v1/subjects").json()["subjects"]] == ids  # oldest first

    assert b.get("/v1/subjects").json()["subjects"] == []
    for method, path, json in (
        ("GET", f"/v1/subjects/{ids[0]}", None),
        ("DELETE", f"/v1/subjects/{ids[0]}", None),
        ("POST", "/v1/generate", body(subjects=[ids[0]])),
        ("POST", "/v1/jobs", body(subjects=[ids[0]])),  # refused before a job exists
    ):
        response = b.request(method, path, json=json)
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "subject_not_found" and ids[0] in response.json()["message"]
    assert httpx.get(f"{a.base_url}/v1/subjects").status_code == 401  # no token at all
    assert service["client"].get("/v1/info").json()["subjects"]["store"] == "local"  # the default store

    mine = b.post("/v1/subjects", json={"photos": [photo]})  # the cap is per token
    assert mine.status_code == 201, mine.text
    assert b.delete(f"/v1/subjects/{mine.json()['id']}").status_code == 200
    for subject_id in ids:
        assert a.delete(f"/v1/subjects/{subject_id}").status_code == 200


def test_bad_subject_requests_are_4xx_naming_the_problem(service, apps):
    from serving.jobs import owner_of
    from serving.subject_store import SubjectStore

    client, photo = apps["subjects-a"], service["reference"]
    saved = client.post("/v1/subjects", json={"photos": [photo, photo]}).json()
    unknown = "0" * 32
    cases = [
        ("/v1/subjects", {"photos": []}, 422, "invalid_request", "photos"),
        ("/v1/subjects", {"photos": [photo] * 5}, 422, "too_many_photos", "at most 4"),
        ("/v1/subjects", {"photos": ["not base64!"]}, 400, "invalid_base64", "photo 1"),
        ("/v1/subjects", {"photos": [base64.b64encode(b"text").decode()]}, 422, "invalid_image", "photo 1"),
        ("/v1/subjects", {"photos": [photo], "reference_mode": "nose"}, 422, "unknown_reference_mode", "reference_"),
        ("/v1/generate", body(subjects=[unknown]), 404, "subject_not_found", unknown),
        ("/v1/generate", body(subjects=["../../etc/passwd"]), 404, "subject_not_found", "../../etc/passwd"),
        ("/v1/jobs", body(subjects=[unknown]), 404, "subject_not_found", unknown),
        ("/v1/generate", body(), 422, "references_or_subjects", "neither"),
        ("/v1/generate", body(subjects=[saved["id"]], references=[photo]), 422, "references_or_subjects", "not both"),
        ("/v1/generate", body(subjects=[saved["id"]] * 2), 422, "reference_count_mismatch", "2 subject(s)"),
        ("/v1/generate", body(subjects=[saved["id"]], reference_mode="face"), 422, "subject_mismatch", "'whole'"),
    ]
    # a subject an older model made (written to the store directly): its embeddings mean nothing to this one
    old = SubjectStore(STORE).save(
        owner_of(TOKEN),
        {"embeddings": np.ones((1, 8), np.float32), "descriptors": np.zeros((1, 128), np.float32), "faces": [0]},
        name=None,
        reference_mode="whole",
        model_version="an-older-model",
    )
    cases.append(("/v1/generate", body(subjects=[old["id"]]), 422, "subject_mismatch", "an-older-model"))
    for path, json, status, code, named in cases:
        response = client.post(path, json=json)
        assert (response.status_code, response.json()["error"]) == (status, code), (path, response.text)
        assert named in response.json()["message"], response.text
    for subject_id in (saved["id"], old["id"]):
        assert client.delete(f"/v1/subjects/{subject_id}").status_code == 200


def test_saved_subjects_pass_the_reference_checks(apps, astronaut, hopper):
    """A photo that cannot serve is refused at save time, naming it; two saved subjects of one person are refused
    in one request (their stored descriptors), two people are not."""
    from PIL import ImageFilter

    client = apps["subjects-b"]
    blurred = png_b64(np.asarray(Image.fromarray(astronaut).filter(ImageFilter.GaussianBlur(3))))
    refused = client.post("/v1/subjects", json={"photos": [png_b64(astronaut), blurred]})
    assert refused.status_code == 422 and refused.json()["error"] == "face_blurred", refused.text
    assert refused.json()["message"].startswith("photo 2: the face is blurred")
    people = (astronaut, hopper, np.ascontiguousarray(astronaut[:, ::-1]))
    ids = [client.post("/v1/subjects", json={"photos": [png_b64(p)]}).json()["id"] for p in people]
    prompt = "a man <|image|> and a woman <|image|>"
    same = client.post("/v1/generate", json=body(prompt=prompt, subjects=[ids[0], ids[2]]))
    assert same.status_code == 422 and same.json()["error"] == "same_person", same.text
    assert f"(subject {ids[2]}) shows the same person as reference 1 (subject {ids[0]})" in same.json()["message"]
    two = client.post("/v1/generate", json=body(prompt=prompt, subjects=[ids[0], ids[1]]))
    assert two.status_code == 200 and two.json()["warnings"] == [], two.text
    for subject_id in ids:
        assert client.delete(f"/v1/subjects/{subject_id}").status_code == 200


def test_the_subjects_command_adds_lists_and_removes(apps, astronaut, tmp_path):
    url = str(apps["subjects-a"].base_url)
    photo = tmp_path / "me.png"
    Image.fromarray(astronaut).save(photo)

    def cli(*args: str, token: str = TOKEN) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "facediffuser.cli", "subjects", *args, "--url", url],
            capture_output=True,
            text=True,
            env={**os.environ, "FACEDIFFUSER_TOKEN": token},
            timeout=120,
        )

    added = cli("add", str(photo), "--name", "cli person", "--keep-photos")
    assert added.returncode == 0, added.stderr
    subject_id = added.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", subject_id), added.stdout
    assert any(key.endswith(f"{subject_id}/photos/1") for key in store_objects())  # --keep-photos kept it
    listed = cli("list")
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["ID", "NAME", "PHOTOS"] and row.startswith(subject_id) and "cli person" in row
    assert subject_id not in cli("list", token=OTHER_TOKEN).stdout
    removed = cli("rm", subject_id)
    assert (removed.returncode, removed.stdout.strip()) == (0, f"deleted {subject_id}"), removed.stderr
    assert not [key for key in store_objects() if subject_id in key]  # the kept photo went with it

    for failed, says in (
        (cli("rm", subject_id), "404 subject_not_found"),
        (cli("add", str(tmp_path / "missing.jpg")), "missing.jpg: no such file"),
        (cli("list", token="wrong"), "401 unauthorized"),
    ):
        assert failed.returncode == 2 and failed.stdout == "", failed
        (line,) = failed.stderr.splitlines()  # one line, no traceback
        assert line.startswith("facediffuser subjects: error: ") and says in line, line
