"""The one Parquet schema between preprocessing, training and evaluation (DESIGN.md §Contracts 1).

One row per source image. Subjects are in caption order: subject k's noun phrase ends at character
`noun_end` of `caption` (FastComposer's `end`), where the `<|image|>` marker is inserted for training.
Boxes are [x1, y1, x2, y2] in pixels of the stored image. Masks are single-channel 8-bit PNGs of the stored
image's size (255 = inside).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image

SCHEMA_VERSION = 1
VERSION_KEY = b"facediffuser_schema_version"

SUBJECT_TYPE = pa.struct(
    [
        pa.field("person_box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("face_box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("score", pa.float32(), nullable=False),  # face detection score in [0, 1]
        pa.field("mask_png", pa.binary(), nullable=False),  # person mask
        pa.field("face_mask_png", pa.binary()),  # face region mask, when the producer made one
        pa.field("noun", pa.string(), nullable=False),  # the linked noun phrase's head word, e.g. "man"
        pa.field("noun_end", pa.int32(), nullable=False),  # character offset in caption where the phrase ends
    ]
)

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # URI of the original file
        pa.field("image", pa.binary(), nullable=False),  # encoded JPEG or PNG
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("subjects", pa.list_(pa.field("item", SUBJECT_TYPE, nullable=False)), nullable=False),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # read | detect | segment | caption | link | ...
        pa.field("reason", pa.string(), nullable=False),
    ],
    metadata={VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


@dataclass
class Subject:
    person_box: list[float]
    face_box: list[float]
    score: float
    mask_png: bytes
    noun: str
    noun_end: int
    face_mask_png: bytes | None = None


@dataclass
class Record:
    id: str
    source: str
    image: bytes
    width: int
    height: int
    caption: str
    subjects: list[Subject] = field(default_factory=list)

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> "Record":
        subjects = [
            Subject(**{k: (list(v) if k.endswith("box") else v) for k, v in s.items()}) for s in row["subjects"]
        ]
        return cls(
            **{**{k: row[k] for k in ("id", "source", "image", "width", "height", "caption")}, "subjects": subjects}
        )


def to_table(records: list[Record]) -> pa.Table:
    return pa.Table.from_pylist([r.to_row() for r in records], schema=SHARD_SCHEMA)


def check_schema(schema: pa.Schema, what: str = "data") -> None:
    """Raise ValueError naming the difference when `schema` is not our shard schema (or a wrong version)."""
    version = (schema.metadata or {}).get(VERSION_KEY)
    if version is not None and int(version) != SCHEMA_VERSION:
        raise ValueError(f"{what}: schema version {int(version)}, this code reads version {SCHEMA_VERSION}")
    missing = [f.name for f in SHARD_SCHEMA if f.name not in schema.names]
    if missing:
        raise ValueError(f"{what}: not Face-diffuser shards (missing columns: {', '.join(missing)})")
    for expected in SHARD_SCHEMA:
        if not schema.field(expected.name).type.equals(expected.type):
            raise ValueError(
                f"{what}: column {expected.name!r} has type {schema.field(expected.name).type}, "
                f"expected {expected.type}"
            )


def encode_mask(mask: np.ndarray) -> bytes:
    """Bool/0-1/uint8 [H, W] → PNG bytes (0 or 255)."""
    array = (np.asarray(mask) > 0).astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """PNG bytes → bool [H, W]."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127
