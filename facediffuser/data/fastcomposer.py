"""Convert a FastComposer-format tree (METHOD.md §4: `<id>.jpg` + `<id>.json` + `<id>.npy` per image) into
shard rows without running any model.

The json's caption and each "person" segment's `end` are kept as they are (`noun_end` = `end`); the mask is
the id map's pixels equal to the segment id (resized nearest-neighbour with the image); `person_box` is the
json's bbox scaled to the stored image. The archive has no face boxes: `face_box` repeats the person box and
`score` is 0.0 (meaning "no face detector ran"); `face_mask_png` is empty.

Every field is checked before it is used (`parse_meta`, `load_id_map`): a malformed sample (invalid json, a
segment missing keys or with wrong types, a bbox outside the image, an unreadable npy) is a reject with the reason.
"""

from __future__ import annotations

import io
import json
import posixpath
import re

import numpy as np
from PIL import Image

from facediffuser.data import io as dataio
from facediffuser.data.preprocess_config import PreprocessConfig
from facediffuser.data.schema import encode_mask
from facediffuser.data.stages import encode_jpeg, resize_short_side
from facediffuser.data.work_items import new_item, reject
from facediffuser.images import ImageDecodeError, decode_image

PERSON_LABEL = "person"
_LAST_WORD = re.compile(r"([A-Za-z]+(?:-[A-Za-z]+)*)\W*$")


def list_fastcomposer_items(input_uri: str) -> list[dict]:
    """One item per sample stem that has a .jpg or a .json (a missing partner file is rejected later)."""
    stems = {}
    for rel, uri in dataio.list_files(input_uri, (".jpg", ".json")):
        stem_rel, stem_uri = posixpath.splitext(rel)[0], uri.rsplit(".", 1)[0]
        stems[stem_rel] = stem_uri
    return [new_item(posixpath.basename(rel), stem_uri + ".jpg") for rel, stem_uri in sorted(stems.items())]


def _sidecars(source: str) -> tuple[str, str]:
    stem = source.rsplit(".", 1)[0]
    return stem + ".json", stem + ".npy"


class BadSample(ValueError):
    """The sample's json or npy is malformed; the message is the reject reason."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and np.isfinite(value)


BOX_SLACK = 1.0  # pixels a bbox may reach past the image edge (rounding in the archive); it is clipped to the image


def parse_meta(meta_bytes: bytes, width: int, height: int) -> tuple[str, list[dict]]:
    """The json → (caption, person segments as {"id", "end", "bbox"} sorted by end), every field checked against
    the caption and the W×H image; BadSample names the first problem."""
    try:
        meta = json.loads(meta_bytes)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadSample(f"json is not valid JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict):
        raise BadSample(f"json is a {type(meta).__name__}, expected an object")
    caption = meta.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("json has no caption")
    segments = meta.get("segments")
    if not isinstance(segments, list):
        raise BadSample("json has no segments list")
    persons = []
    for index, segment in enumerate(segments):
        if not isinstance(segment, dict):
            raise BadSample(f"segment {index} is a {type(segment).__name__}, expected an object")
        if segment.get("coco_label") != PERSON_LABEL:
            continue
        missing = [key for key in ("id", "end", "bbox") if key not in segment]
        if missing:
            raise BadSample(f"person segment {index} has no {', '.join(missing)}")
        seg_id, end, bbox = segment["id"], segment["end"], segment["bbox"]
        if not _is_int(seg_id):
            raise BadSample(f"person segment {index}: id {seg_id!r} is not an integer")
        if not _is_int(end) or not 0 < end <= len(caption) or _LAST_WORD.search(caption[:end]) is None:
            raise BadSample(f"segment {seg_id}: end {end!r} does not follow a word of the caption")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise BadSample(f"segment {seg_id}: bbox {bbox!r} is not [x1, y1, x2, y2] in pixels")
        x1, y1, x2, y2 = (float(v) for v in bbox)
        if not (-BOX_SLACK <= x1 < x2 <= width + BOX_SLACK and -BOX_SLACK <= y1 < y2 <= height + BOX_SLACK):
            raise BadSample(f"segment {seg_id}: bbox {bbox} is empty or outside the {width}x{height} image")
        box = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
        persons.append({"id": seg_id, "end": end, "bbox": box})
    return caption, sorted(persons, key=lambda s: s["end"])


def load_id_map(npy: bytes, width: int, height: int) -> np.ndarray:
    """The npy → an int32 [H, W] segment id map (never unpickled); BadSample names the problem."""
    try:
        id_map = np.load(io.BytesIO(npy), allow_pickle=False)  # never unpickle input files
    except Exception as exc:  # ValueError (pickled / not npy), EOFError (empty), OSError
        raise BadSample(f"npy is not a readable array ({type(exc).__name__}: {exc})") from None
    if not isinstance(id_map, np.ndarray) or id_map.dtype.kind not in "biu":
        raise BadSample(f"npy holds {getattr(id_map, 'dtype', type(id_map).__name__)}, expected integer segment ids")
    if id_map.shape != (height, width):
        raise BadSample(f"id map shape {id_map.shape} differs from image {height}x{width}")
    return id_map.astype(np.int32)


def convert_stage(item: dict, config: PreprocessConfig) -> dict:
    """jpg + json + npy → a work row; a missing file, an undecodable image or malformed json/npy is a reject
    (stages read / decode / convert) with the reason."""
    json_uri, npy_uri = _sidecars(item["source"])
    try:
        jpg, meta_bytes, npy = (dataio.read_bytes(u) for u in (item["source"], json_uri, npy_uri))
    except OSError as exc:
        return reject(
            item, "read", f"cannot read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
    try:
        image = decode_image(jpg, max_pixels=config.max_pixels, name=posixpath.basename(item["source"]))
    except ImageDecodeError as exc:
        return reject(item, "decode", str(exc))
    try:
        caption, segments = parse_meta(meta_bytes, image.width, image.height)
        id_map = load_id_map(npy, image.width, image.height)
    except BadSample as exc:
        return reject(item, "convert", str(exc))
    problem = _segments_problem(segments, config)
    if problem:
        return reject(item, "convert", problem)
    stored = resize_short_side(image, config.resolution)
    try:
        subjects = _subjects(caption, segments, id_map, image, stored)
    except BadSample as exc:
        return reject(item, "convert", str(exc))
    return {
        **item,
        "image": encode_jpeg(stored),
        "width": stored.width,
        "height": stored.height,
        "caption": caption,
        "subjects": subjects,
    }


def _segments_problem(segments: list[dict], config: PreprocessConfig) -> str | None:
    """Why the person segments make the sample a reject (none, too many, two on one noun), or None."""
    if not segments:
        return "no person segment"
    if len(segments) > config.max_subjects:
        return f"{len(segments)} person segments, more than --max-subjects {config.max_subjects}"
    if len({s["end"] for s in segments}) != len(segments):
        return "two person segments share one noun end"
    return None


def _subjects(caption: str, segments: list[dict], id_map: np.ndarray, image, stored) -> list[dict]:
    """Each segment → a subject row at the stored size: its box, mask and noun; BadSample when a segment's id is
    not in the id map."""
    scale_x, scale_y = stored.width / image.width, stored.height / image.height
    ids = np.asarray(Image.fromarray(id_map, mode="I").resize(stored.size, Image.Resampling.NEAREST))
    subjects = []
    for segment in segments:
        mask = ids == segment["id"]
        if not mask.any():
            raise BadSample(f"segment {segment['id']} is not in the id map")
        x1, y1, x2, y2 = segment["bbox"]
        box = [x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y]
        word = _LAST_WORD.search(caption[: segment["end"]])
        subjects.append(
            {
                "face_box": box,
                "score": 0.0,
                "person_box": box,
                "mask_png": encode_mask(mask),
                "face_mask_png": None,
                "noun": word.group(1),
                "noun_end": segment["end"],
            }
        )
    return subjects
