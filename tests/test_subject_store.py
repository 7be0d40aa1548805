"""The saved-subject store without Ray, on a local directory and on S3 (moto's real S3 protocol): what a subject
keeps, that another owner never sees it, and that deleting it leaves nothing of it behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from facediffuser.metrics.identity import mean_reference
from serving.api import RequestError
from serving.subject_store import SubjectStore, default_store, store_kind
from serving.subjects import SavedSubject, reference_key

OWNER, OTHER = "a" * 32, "b" * 32


def features(photos: int = 2, faces=(True, False)) -> dict:
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(photos, 128)).astype(np.float32)
    descriptors[~np.array(faces)] = 0
    return {
        "embeddings": rng.normal(size=(photos, 16)).astype(np.float32),
        "descriptors": descriptors,
        "faces": np.array(faces),
    }


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        root = tmp_path / "subjects"
        yield SubjectStore(root), lambda: sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        return
    import boto3

    request.getfixturevalue("s3_endpoint")
    bucket = f"subjects-{tmp_path.name.lower().replace('_', '-')[-40:]}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)

    def objects():
        return sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []))

    yield SubjectStore(f"s3://{bucket}/store"), objects


def test_a_subject_round_trips_bit_for_bit_and_deleting_it_leaves_nothing(store):
    subjects, objects = store
    made = features()
    saved = subjects.save(
        OWNER, made, name="ada", reference_mode="whole", model_version="v1", photos=[b"photo-1", b"photo-2"]
    )
    assert saved["num_photos"] == 2 and saved["faces_found"] == 1 and saved["kept_photos"] is True
    assert "owner" not in saved and subjects.list_subjects(OWNER) == [saved]
    loaded = subjects.load(OWNER, saved["id"])
    assert loaded.embeddings.tobytes() == made["embeddings"].tobytes()  # exact float32
    assert loaded.faces.tolist() == [True, False] and loaded.reference_id == f"subject:{saved['id']}"
    # the same averages inline photos get: float32 mean of the embeddings, normalised mean of the faces found
    want = torch.stack([torch.from_numpy(row) for row in made["embeddings"]]).mean(dim=0)
    assert torch.equal(loaded.embedding("whole", "v1"), want)
    assert np.array_equal(loaded.identity_reference(), mean_reference([made["descriptors"][0]]))
    assert any(saved["id"] in name for name in objects())

    assert subjects.list_subjects(OTHER) == [] and subjects.load(OTHER, saved["id"]) is None
    assert not subjects.delete(OTHER, saved["id"])  # another owner cannot delete it either
    assert subjects.delete(OWNER, saved["id"]) and not subjects.delete(OWNER, saved["id"])
    assert subjects.load(OWNER, saved["id"]) is None and subjects.list_subjects(OWNER) == []
    left = objects()
    assert not [name for name in left if saved["id"] in name], left
    if subjects.kind == "local":
        assert left == [], left  # not even the owner's empty directory
    else:  # pyarrow's empty "directory" markers of the store and the owner (it keeps a deleted path's parent)
        assert set(left) <= {"store/", f"store/{OWNER}/"}, left


def test_malformed_ids_are_unknown_and_never_paths(store):
    subjects, objects = store
    saved = subjects.save(OWNER, features(1, (True,)), name=None, reference_mode="face", model_version="v1")
    assert not any("photos" in name for name in objects())  # kept only when asked
    for bad in ("../" + saved["id"], saved["id"].upper(), "", "x" * 32, f"{saved['id']}/..", "."):
        assert subjects.load(OWNER, bad) is None and not subjects.delete(OWNER, bad)
    assert subjects.load("../" + OWNER, saved["id"]) is None
    assert [s["id"] for s in subjects.list_subjects(OWNER)] == [saved["id"]]


def test_an_incomplete_subject_is_ignored_and_a_mismatch_is_refused(tmp_path):
    subjects = SubjectStore(tmp_path)
    saved = subjects.save(OWNER, features(), name="x", reference_mode="whole", model_version="v1")
    record = tmp_path / OWNER / saved["id"] / "subject.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "owner": OTHER}))  # a record moved elsewhere
    assert subjects.load(OWNER, saved["id"]) is None
    (tmp_path / OWNER / ("f" * 32)).mkdir()  # a save in progress: no subject.json yet
    assert subjects.list_subjects(OWNER) == []

    subject = SavedSubject(
        "c" * 32, "whole", "v1", np.ones((1, 4), np.float32), np.zeros((1, 128), np.float32), np.array([False])
    )
    assert subject.identity_reference() is None  # no face in any photo: no identity score, as inline
    assert reference_key(subject) != reference_key([b"photo"])
    with pytest.raises(RequestError, match="reference_mode 'whole'.*uses 'face'") as mode:
        subject.embedding("face", "v1")
    with pytest.raises(RequestError, match="model version v1; this server runs v2") as version:
        subject.embedding("whole", "v2")
    assert mode.value.status == version.value.status == 422 and mode.value.code == "subject_mismatch"


def test_store_uris():
    assert store_kind("s3://bucket/prefix") == "s3" and store_kind("/var/lib/subjects") == "local"
    assert default_store().endswith("subjects")
    with pytest.raises(ValueError, match="only local paths and s3://"):
        SubjectStore("gs://bucket/prefix")
