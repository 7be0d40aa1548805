"""Small shard rows for tests, benchmarks and demos, made without the preprocessing models.

A real photo (e.g. scikit-image's astronaut) with an elliptical person mask, plus synthetic "people"
(an ellipse body and a disc head on a noise background, one or two per image). Real shards come from
`pipelines/preprocess.py`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from facediffuser.data.schema import Record, Subject, encode_mask


def _jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _ellipse(height: int, width: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def _subject(mask: np.ndarray, noun: str, noun_end: int) -> Subject:
    ys, xs = np.nonzero(mask)
    box = [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
    head = [box[0], box[1], box[2], box[1] + (box[3] - box[1]) / 3]
    return Subject(person_box=box, face_box=head, score=0.99, mask_png=encode_mask(mask), noun=noun, noun_end=noun_end)


def photo_record(photo: np.ndarray, record_id: str = "astronaut") -> Record:
    """One real photo of one person, caption "a woman in a space suit" with a rough elliptical person mask."""
    height, width = photo.shape[:2]
    mask = _ellipse(height, width, cy=0.6 * height, cx=0.45 * width, ry=0.45 * height, rx=0.3 * width)
    caption = "a woman in a space suit"
    return Record(
        id=record_id,
        source=f"sample://{record_id}",
        image=_jpeg(photo),
        width=width,
        height=height,
        caption=caption,
        subjects=[_subject(mask, "woman", len("a woman"))],
    )


def synthetic_record(index: int, size: tuple[int, int] = (160, 200)) -> Record:
    """A noise background with one or two coloured figures; alternating landscape/portrait frames."""
    rng = np.random.default_rng(index)
    height, width = size if index % 2 == 0 else size[::-1]
    image = rng.integers(0, 80, (height, width, 3), dtype=np.uint8)
    count = 1 + index % 2
    nouns = ["man", "woman"][:count]
    caption = "a man" if count == 1 else "a man and a woman"
    ends = [len("a man"), len("a man and a woman")][:count]
    subjects = []
    for k in range(count):
        cx = width * (k + 1) / (count + 1)
        body = _ellipse(height, width, cy=0.65 * height, cx=cx, ry=0.3 * height, rx=0.12 * width)
        head = _ellipse(height, width, cy=0.28 * height, cx=cx, ry=0.1 * height, rx=0.08 * width)
        mask = body | head
        image[mask] = rng.integers(120, 255, 3, dtype=np.uint8)
        subjects.append(_subject(mask, nouns[k], ends[k]))
    caption += " standing in a field" if index % 3 else " at the beach"
    return Record(
        id=f"synthetic-{index}",
        source=f"sample://synthetic/{index}",
        image=_jpeg(image),
        width=width,
        height=height,
        caption=caption,
        subjects=subjects,
    )


def sample_records(count: int, photo: np.ndarray | None = None) -> list[Record]:
    """`count` rows: the photo first (when given), then synthetic ones."""
    records = [photo_record(photo)] if photo is not None else []
    records += [synthetic_record(i) for i in range(count - len(records))]
    return records
