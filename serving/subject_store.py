"""Where saved subjects live: a local directory or an s3:// prefix (facediffuser/data/io.py's pyarrow filesystems),
so every ingress replica sees the same ones. No Ray.

    STORE/<owner>/<id>/subject.json          id, name, owner, reference mode, model version, counts, created
    STORE/<owner>/<id>/features.safetensors  embeddings [photos, D], descriptors [photos, 128], faces [photos]
    STORE/<owner>/<id>/photos/<k>            the photos as uploaded, only with keep_photos

`owner` is the digest of the caller's token (serving/jobs.py owner_of), never the token. JSON and safetensors only:
nothing here is ever unpickled. subject.json is written last, so a subject without it is incomplete and ignored;
deleting a subject removes its whole directory (on S3 every object under its prefix).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid

import numpy as np
import pyarrow.fs as pafs
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from facediffuser.cache import cache_root
from facediffuser.data.io import is_s3, join, read_bytes, remove_dir, resolve, write_bytes
from serving.subjects import SavedSubject

SUBJECT_FILE, FEATURES_FILE, PHOTOS_DIR = "subject.json", "features.safetensors", "photos"
SUBJECT_ID = re.compile(r"^[0-9a-f]{32}$")  # uuid4().hex: never a path of its own
OWNER = re.compile(r"^[0-9a-z]{1,64}$")
FORMAT = 1
VIEW_FIELDS = (
    "id",
    "name",
    "num_photos",
    "faces_found",
    "reference_mode",
    "model_version",
    "created",
    "kept_photos",
)


def default_store() -> str:
    """The local default: under the cache root (FACEDIFFUSER_CACHE) of the machine the ingress runs on."""
    return str(cache_root() / "subjects")


def store_kind(uri: str) -> str:
    return "s3" if is_s3(uri) else "local"


def store_access(uri: str | None) -> dict:
    """Ray actor options that let the ingress replicas reach an s3:// store as this process does: its AWS_*
    variables (e.g. a local endpoint and keys), as the Ray jobs forward them; none for a local store, or when this
    process has none (the nodes' own credentials, e.g. an instance role, then apply)."""
    from cluster.runtime import AWS_VARIABLES

    env = {name: os.environ[name] for name in AWS_VARIABLES if name in os.environ} if uri and is_s3(uri) else {}
    return {"runtime_env": {"env_vars": env}} if env else {}


class SubjectStore:
    """Saved subjects of every owner under one URI (a directory or s3://bucket/prefix)."""

    def __init__(self, uri: str):
        self.uri = str(uri).rstrip("/")
        self.kind = store_kind(self.uri)
        resolve(self.uri)  # ValueError for anything but a local path or s3://

    def _dir(self, owner: str, subject_id: str | None = None) -> str | None:
        """The directory of an owner (or of one subject); None for a malformed id, which is then unknown."""
        if not OWNER.match(owner) or (subject_id is not None and not SUBJECT_ID.match(subject_id)):
            return None
        return join(self.uri, owner, subject_id) if subject_id else join(self.uri, owner)

    def save(self, owner: str, features: dict, *, name, reference_mode, model_version, photos=None) -> dict:
        """Writes a new subject (features: subject_features' arrays; photos: kept only when given) → its view."""
        subject_id = uuid.uuid4().hex
        where = self._dir(owner, subject_id)
        if where is None:
            raise ValueError(f"malformed owner {owner!r}")
        record = {
            "format": FORMAT,
            "id": subject_id,
            "owner": owner,
            "name": name,
            "num_photos": int(len(features["embeddings"])),
            "faces_found": int(np.count_nonzero(features["faces"])),
            "reference_mode": reference_mode,
            "model_version": model_version,
            "created": round(time.time(), 3),
            "kept_photos": photos is not None,
        }
        tensors = {
            "embeddings": np.ascontiguousarray(features["embeddings"], dtype=np.float32),
            "descriptors": np.ascontiguousarray(features["descriptors"], dtype=np.float32),
            "faces": np.asarray(features["faces"], dtype=np.uint8),
        }
        try:
            write_bytes(join(where, FEATURES_FILE), save_tensors(tensors))
            for k, data in enumerate(photos or [], start=1):
                write_bytes(join(where, PHOTOS_DIR, str(k)), data)
            write_bytes(join(where, SUBJECT_FILE), json.dumps(record).encode())  # last: now the subject exists
        except BaseException:
            with contextlib.suppress(Exception):
                remove_dir(where)
            raise
        return view(record)

    def record(self, owner: str, subject_id: str) -> dict | None:
        """The subject's subject.json, or None when this owner has no such (complete) subject."""
        where = self._dir(owner, subject_id)
        if where is None:
            return None
        try:
            record = json.loads(read_bytes(join(where, SUBJECT_FILE)))
        except (FileNotFoundError, json.JSONDecodeError):  # unknown, or still being written
            return None
        return record if record.get("owner") == owner else None

    def load(self, owner: str, subject_id: str) -> SavedSubject | None:
        """The subject as generation uses it, or None (unknown, another owner's, malformed id)."""
        record = self.record(owner, subject_id)
        if record is None:
            return None
        try:
            tensors = load_tensors(read_bytes(join(self._dir(owner, subject_id), FEATURES_FILE)))
        except FileNotFoundError:  # deleted meanwhile
            return None
        return SavedSubject(
            id=subject_id,
            reference_mode=record["reference_mode"],
            model_version=record["model_version"],
            embeddings=tensors["embeddings"],
            descriptors=tensors["descriptors"],
            faces=tensors["faces"].astype(bool),
        )

    def list_subjects(self, owner: str) -> list[dict]:
        """The owner's subjects (views), oldest first."""
        where = self._dir(owner)
        if where is None:
            return []
        fs, path = resolve(where)
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        ids = [e.base_name for e in entries if e.type == pafs.FileType.Directory and SUBJECT_ID.match(e.base_name)]
        records = [r for r in (self.record(owner, subject_id) for subject_id in ids) if r is not None]
        return [view(r) for r in sorted(records, key=lambda r: (r["created"], r["id"]))]

    def delete(self, owner: str, subject_id: str) -> bool:
        """Erases the subject: every file under its directory (embeddings, descriptors, photos, metadata).
        → False when this owner has no such subject."""
        if self.record(owner, subject_id) is None:
            return False
        remove_dir(self._dir(owner, subject_id))
        if self.kind == "local":  # an owner left without subjects leaves no empty directory behind either
            with contextlib.suppress(OSError):
                os.rmdir(resolve(self._dir(owner))[1])  # fails, harmlessly, while it holds another subject
        return True


def view(record: dict) -> dict:
    """What the API shows of a subject (not its owner)."""
    return {name: record.get(name) for name in VIEW_FIELDS}
