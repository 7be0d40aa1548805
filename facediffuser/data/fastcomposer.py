"""Convert a FastComposer-format tree (METHOD.md §4: `<id>.jpg` + `<id>.json` + `<id>.npy` per image) into
shard rows without running any model.

The json's caption and each "person" segment's `end` are kept as they are (`noun_end` = `end`); the mask is
the id map's pixels equal to the segment id (resized nearest-neighbour with the image); `person_box` is the
json's bbox scaled to the stored image. The archive has no face boxes: `face_box` repeats the person box and
`score` is 0.0 (meaning "no face detector ran"); `face_mask_png` is empty.
"""

from __future__ import annotations

import io
import json
import posixpath
import re

import numpy as np
from PIL import Image

from facediffuser.data import io as dataio
from facediffuser.data.stages import (PreprocessConfig, encode_jpeg, new_item, reject, resize_short_side)
from facediffuser.data.schema import encode_mask
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


def convert_stage(item: dict, config: PreprocessConfig) -> dict:
    json_uri, npy_uri = _sidecars(item["source"])
    try:
        jpg, meta_bytes, npy = (dataio.read_bytes(u) for u in (item["source"], json_uri, npy_uri))
    except OSError as exc:
        return reject(item, "read", f"cannot read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    try:
        image = decode_image(jpg, max_pixels=config.max_pixels, name=posixpath.basename(item["source"]))
    except ImageDecodeError as exc:
        return reject(item, "decode", str(exc))
    try:
        meta = json.loads(meta_bytes)
        caption = meta["caption"]
        segments = [s for s in meta["segments"] if s.get("coco_label") == PERSON_LABEL]
        id_map = np.load(io.BytesIO(npy), allow_pickle=False)  # never unpickle input files
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return reject(item, "convert", f"bad json or npy: {type(exc).__name__}: {exc}")
    if not isinstance(caption, str) or not caption.strip():
        return reject(item, "convert", "json has no caption")
    if id_map.shape != (image.height, image.width):
        return reject(item, "convert", f"id map shape {id_map.shape} differs from image {image.height}x{image.width}")
    if not segments:
        return reject(item, "convert", "no person segment")
    if len(segments) > config.max_subjects:
        return reject(item, "convert", f"{len(segments)} person segments, more than --max-subjects {config.max_subjects}")
    segments = sorted(segments, key=lambda s: s["end"])

    stored = resize_short_side(image, config.resolution)
    scale_x, scale_y = stored.width / image.width, stored.height / image.height
    ids = Image.fromarray(id_map.astype(np.int32), mode="I").resize(stored.size, Image.Resampling.NEAREST)
    ids = np.asarray(ids)
    subjects = []
    for segment in segments:
        end = segment["end"]
        word = _LAST_WORD.search(caption[:end]) if isinstance(end, int) and 0 < end <= len(caption) else None
        if word is None:
            return reject(item, "convert", f"segment {segment['id']}: end {end} does not follow a word of the caption")
        mask = ids == int(segment["id"])
        if not mask.any():
            return reject(item, "convert", f"segment {segment['id']} is not in the id map")
        x1, y1, x2, y2 = (float(v) for v in segment["bbox"])
        box = [x1 * scale_x, y1 * scale_y, x2 * scale_x, y2 * scale_y]
        subjects.append({"face_box": box, "score": 0.0, "person_box": box, "mask_png": encode_mask(mask),
                         "face_mask_png": None, "noun": word.group(1), "noun_end": end})
    if len({s["noun_end"] for s in subjects}) != len(subjects):
        return reject(item, "convert", "two person segments share one noun end")
    return {**item, "image": encode_jpeg(stored), "width": stored.width, "height": stored.height,
            "caption": caption, "subjects": subjects}
