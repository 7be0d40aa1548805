"""The preprocessing stages as plain functions on one work item (a dict; one image). No Ray here.

`pipelines/preprocess.py` runs them through `apply_stages` in Ray Data pools: on CPUs one pool of tasks whose
worker processes keep the loaded stages, on GPUs actor pools for the stages that use one; `process_locally` runs
the same function in a plain loop (the benchmark's baseline). An item that fails a stage
gets `stage` and `reason` set and passes through the later stages untouched, so every input ends as a shard row
or a reject row. That includes a stage (or its model) raising on one image: `StageGuard` turns the exception into
a reject of that stage; only a stage that raises on `SYSTEMIC_AFTER` images in a row, or runs out of memory, stops
the job (a broken model or device, not bad rows). The work item and its tables: facediffuser/data/work_items.py;
the settings: facediffuser/data/preprocess_config.py.
"""

from __future__ import annotations

import io
import posixpath

import numpy as np
from PIL import Image

from facediffuser import faults
from facediffuser.data import dedup, filters
from facediffuser.data import io as dataio
from facediffuser.data.captions import template_caption
from facediffuser.data.faces import Face
from facediffuser.data.linking import LinkError, link_subjects
from facediffuser.data.masks import face_ellipse, mask_box
from facediffuser.data.preprocess_config import PreprocessConfig
from facediffuser.data.schema import encode_mask
from facediffuser.data.work_items import new_item, one_line, reject
from facediffuser.images import ImageDecodeError, decode_image

JPEG_QUALITY = 95
SYSTEMIC_AFTER = 8  # a stage that raises on this many items in a row (none getting through in between) is broken


def list_image_items(input_uri: str) -> list[dict]:
    """Every image file under the input (sorted, so ids and output are deterministic). The id is the path
    relative to the input; a `<name>.txt` beside an image is its existing caption."""
    captions = {posixpath.splitext(rel)[0]: uri for rel, uri in dataio.list_files(input_uri, (".txt",))}
    return [
        new_item(rel, uri, captions.get(posixpath.splitext(rel)[0]))
        for rel, uri in dataio.list_files(input_uri, dataio.IMAGE_EXTENSIONS)
    ]


# ---------------------------------------------------------------------------------------------- images


def resize_short_side(image: Image.Image, resolution: int) -> Image.Image:
    """Downscale so the short side is `resolution` (never upscale); aspect kept, so no person is cropped."""
    short = min(image.size)
    if short <= resolution:
        return image
    scale = resolution / short
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def encode_jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def stored_array(item: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(item["image"])).convert("RGB"))


def read_stage(item: dict, config: PreprocessConfig) -> dict:
    """Read (local or S3) + decode (EXIF, 16-bit, CMYK, alpha → RGB) + pixel limit + resize + re-encode."""
    try:
        data = dataio.read_bytes(item["source"])
        caption = dataio.read_bytes(item["caption_source"]).decode("utf-8").strip() if item["caption_source"] else None
    except (OSError, UnicodeDecodeError) as exc:
        return reject(
            item, "read", f"cannot read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
    try:
        image = decode_image(data, max_pixels=config.max_pixels, name=posixpath.basename(item["source"]))
    except ImageDecodeError as exc:
        return reject(item, "decode", str(exc))
    too_small = filters.low_resolution(image.width, image.height, config.min_side)
    if too_small:
        return reject(item, "decode", too_small)
    image = resize_short_side(image, config.resolution)
    return {
        **item,
        "image": encode_jpeg(image),
        "width": image.width,
        "height": image.height,
        "caption": caption or None,
        # hashed here, where the pixels are at hand (the dedup stage would decode the JPEG again for it); the
        # stored JPEG's own hash differs by 0 bits (docs/preprocessing.md)
        "phash": dedup.perceptual_hash(np.asarray(image)) if config.duplicate_distance >= 0 else None,
    }


def detect_stage(item: dict, detector, config: PreprocessConfig) -> dict:
    """Faces found (no face, too many, too small: a reject at `detect`), then the blur filter on the same pixels
    (a reject at `blur`): one decode for both."""
    pixels = stored_array(item)
    faces = detector(pixels)
    if not faces:
        return reject(item, "detect", "no face found")
    if len(faces) > config.max_subjects:
        return reject(item, "detect", f"{len(faces)} faces, more than --max-subjects {config.max_subjects}")
    too_small = filters.small_face([f.box for f in faces], item["width"], item["height"], config.min_face_percent)
    if too_small:
        return reject(item, "detect", too_small)
    return blur_stage({**item, "subjects": [{"face_box": f.box, "score": f.score} for f in faces]}, config, pixels)


def blur_stage(item: dict, config: PreprocessConfig, pixels: np.ndarray | None = None) -> dict:
    """Rejects a photo with a blurry face (filters.face_focus under --min-face-focus); `pixels`: the stored image,
    when the caller has it decoded already (detect_stage runs this)."""
    if config.min_face_focus <= 0:
        return item
    pixels = stored_array(item) if pixels is None else pixels
    blurry = filters.blurry_face(pixels, [s["face_box"] for s in item["subjects"]], config.min_face_focus)
    return reject(item, "blur", blurry) if blurry else item


def dedup_stage(item: dict, config: PreprocessConfig, seen=None) -> dict:
    """Hashes the stored image (item["phash"]) and rejects it when `seen(id, hash)` names a kept photo within
    --duplicate-distance bits (a `dedup.HashIndex.check_and_add`, or the run's actor on Ray). Last of the stages,
    so the photo kept of a near-duplicate group is one that every other stage accepted. With `seen` None, the hash
    is only computed (nothing to compare it with)."""
    if config.duplicate_distance < 0:
        return item
    if item.get("phash") is None:  # hashed at read; an item that came another way is hashed here
        item = {**item, "phash": dedup.perceptual_hash(stored_array(item))}
    found = seen(item["id"], item["phash"]) if seen is not None else None
    if found is None:
        return item
    return reject(item, "dedup", dedup.duplicate_reason(found[0], found[1], config.duplicate_distance))


def segment_stage(item: dict, segmenter) -> dict:
    image = stored_array(item)
    height, width = image.shape[:2]
    faces = [Face(list(s["face_box"]), s["score"]) for s in item["subjects"]]
    masks = segmenter(image, faces)
    if len(masks) != len(faces):
        return reject(item, "segment", f"the segmenter returned {len(masks)} masks for {len(faces)} faces")
    subjects = []
    for index, (subject, face, mask) in enumerate(zip(item["subjects"], faces, masks)):
        if not mask.any():
            return reject(item, "segment", f"no person mask around face {index} at {[round(v) for v in face.box]}")
        subjects.append(
            {
                **subject,
                "person_box": mask_box(mask),
                "mask_png": encode_mask(mask),
                "face_mask_png": encode_mask(face_ellipse(face, width, height)),
            }
        )
    return {**item, "subjects": subjects}


def caption_stage(item: dict, captioner) -> dict:
    """Existing captions are kept; else the template (captioner None) or the model writes one."""
    if item["caption"]:
        return item
    caption = template_caption(len(item["subjects"])) if captioner is None else captioner(stored_array(item))
    if not isinstance(caption, str):
        return reject(item, "caption", f"the captioner returned a {type(caption).__name__}, not text")
    if not caption.strip():
        return reject(item, "caption", "the captioner returned an empty caption")
    return {**item, "caption": caption}


def link_stage(item: dict) -> dict:
    try:
        phrases = link_subjects(item["caption"], len(item["subjects"]))
    except LinkError as exc:
        return reject(item, "link", str(exc))
    subjects = [{**s, "noun": p.noun, "noun_end": p.end} for s, p in zip(item["subjects"], phrases)]
    return {**item, "subjects": subjects}


def _systemic(exc: BaseException) -> bool:
    """Errors of the machine, not of one image: running out of (GPU) memory."""
    return isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__


class StageError(RuntimeError):
    """A stage raised on SYSTEMIC_AFTER items in a row: the model or device is broken, so the job stops."""


class StageGuard:
    """Runs one stage on one item: an exception becomes a reject of that stage ("raised ValueError: …"), so one
    bad image never stops the job. A stage raising on SYSTEMIC_AFTER items in a row, or out of memory, is
    re-raised (StageError): that is the model or the device, and rejecting every row would hide it (and a
    resumed run keeps rejects). One guard per pool worker (task process or actor) / loop."""

    def __init__(self, limit: int = SYSTEMIC_AFTER):
        self.limit = limit
        self.in_a_row: dict[str, int] = {}

    def run(self, name: str, function, item: dict) -> dict:
        try:
            faults.fire(f"preprocess.{name}", item["id"])  # tests only: off unless FACEDIFFUSER_FAULTS names it
            result = function(item)
        except Exception as exc:
            if _systemic(exc):
                raise
            self.in_a_row[name] = self.in_a_row.get(name, 0) + 1
            if self.in_a_row[name] >= self.limit:
                raise StageError(
                    f"stage {name} raised on {self.limit} items in a row (the last, {item['id']}: "
                    f"{one_line(exc)}): stopping, this is not one bad row"
                ) from exc
            return reject(item, name, f"raised {one_line(exc)}")
        self.in_a_row[name] = 0
        return result


# ------------------------------------------------------------------------------------- the plain loop

# `read` covers read + decode; `detect` ends with the blur filter (its rejects say stage `blur`)
IMAGE_STAGES = ("read", "detect", "segment", "caption", "link", "dedup")


def apply_stages(
    item: dict,
    config: PreprocessConfig,
    names=IMAGE_STAGES,
    *,
    detector=None,
    segmenter=None,
    captioner=None,
    guard: StageGuard | None = None,
    seen=None,
) -> dict:
    """Runs the named stages in order on one item, stopping at the first that rejects it (`caption` with
    captioner None writes the template; `dedup` asks `seen`, see dedup_stage). A stage that raises rejects the
    item (see StageGuard; pass one guard per loop so that a broken model stops it). The plain loop and every Ray
    stage go through here."""
    guard = guard or StageGuard()
    functions = {
        "read": lambda i: read_stage(i, config),
        "detect": lambda i: detect_stage(i, detector, config),
        "segment": lambda i: segment_stage(i, segmenter),
        "caption": lambda i: caption_stage(i, captioner),
        "link": link_stage,
        "dedup": lambda i: dedup_stage(i, config, seen),
    }
    for name in names:
        if name not in functions:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(IMAGE_STAGES)}")
    for name in names:
        if item["stage"]:
            break
        item = guard.run(name, functions[name], item)
    return item


def process_locally(
    items: list[dict], config: PreprocessConfig, detector, segmenter, captioner=None, progress: bool = True
) -> list[dict]:
    """All stages, one image at a time, in this process: the same functions the Ray pipeline runs (near
    duplicates against one index over all `items`)."""
    from tqdm.auto import tqdm

    guard = StageGuard()
    seen = dedup.HashIndex(config.duplicate_distance).check_and_add if config.duplicate_distance >= 0 else None
    return [
        apply_stages(item, config, detector=detector, segmenter=segmenter, captioner=captioner, guard=guard, seen=seen)
        for item in tqdm(items, desc="preprocess (plain loop)", disable=not progress)
    ]
