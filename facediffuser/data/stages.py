"""The preprocessing stages as plain functions on one work item (a dict; one image). No Ray here.

`pipelines/preprocess.py` runs them through `apply_stages` in Ray Data pools: on CPUs one pool of tasks whose
worker processes keep the loaded stages, on GPUs actor pools for the stages that use one; `process_locally` runs
the same function in a plain loop (the benchmark's baseline). An item that fails a stage
gets `stage` and `reason` set and passes through the later stages untouched, so every input ends as a shard row
or a reject row. That includes a stage (or its model) raising on one image: `StageGuard` turns the exception into
a reject of that stage; only a stage that raises on `SYSTEMIC_AFTER` images in a row, or runs out of memory, stops
the job (a broken model or device, not bad rows).
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from facediffuser import faults
from facediffuser.config import arg
from facediffuser.data import io as dataio
from facediffuser.data.captions import TEMPLATE, check_captioner, template_caption
from facediffuser.data.faces import DETECTORS, DEFAULT_MIN_SCORE, Face
from facediffuser.data.linking import LinkError, link_subjects
from facediffuser.data.masks import face_ellipse, mask_box
from facediffuser.data.schema import REJECT_SCHEMA, SHARD_SCHEMA, Record, Subject, encode_mask
from facediffuser.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

SOURCES = ("images", "fastcomposer")
JPEG_QUALITY = 95
SYSTEMIC_AFTER = 8  # a stage that raises on this many items in a row (none getting through in between) is broken

# The row type between stages: the shard columns, all nullable, plus where and why an item was rejected.
WORK_SUBJECT_TYPE = pa.struct([
    pa.field("face_box", pa.list_(pa.float32())),
    pa.field("score", pa.float32()),
    pa.field("person_box", pa.list_(pa.float32())),
    pa.field("mask_png", pa.binary()),
    pa.field("face_mask_png", pa.binary()),
    pa.field("noun", pa.string()),
    pa.field("noun_end", pa.int32()),
])
WORK_SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("source", pa.string()),
    pa.field("caption_source", pa.string()),  # sidecar caption file (.txt), when the input has one
    pa.field("image", pa.binary()),  # the stored image (resized, JPEG), once read
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("caption", pa.string()),
    pa.field("subjects", pa.list_(WORK_SUBJECT_TYPE)),
    pa.field("stage", pa.string()),  # set when rejected: the stage that rejected it
    pa.field("reason", pa.string()),
])


@dataclass
class PreprocessConfig:
    input: str = arg(help="directory or s3:// prefix of photos (or a FastComposer tree)")
    output: str = arg(help="directory or s3:// prefix for shards/, rejects/, manifest.json")
    source: str = arg("images", "images: run the models; fastcomposer: convert jpg+json+npy without models",
                      choices=SOURCES)
    detector: str = arg("mediapipe", "face detector", choices=DETECTORS)
    captioner: str = arg(TEMPLATE, "'template' or a transformers image-to-text model directory / hub id")
    max_subjects: int = arg(4, "images with more faces are rejected")
    resolution: int = arg(512, "short side of stored images (downscale only)")
    num_gpus_per_stage: float = arg(0.0, "GPUs per actor of the stages that use one (MTCNN, a captioner model)")
    batch_size: int = arg(8, "images per map_batches call of a pool before the last (the last pool takes one "
                                "block, written as one shard file, per call)")
    workers_per_stage: int | None = arg(None, "concurrent workers of each stage pool: tasks on CPUs, actors on GPUs "
                                              "(default: what the cluster's CPUs and GPUs hold)")
    rows_per_shard: int = arg(1000, "rows per Parquet shard file")
    max_pixels: int = arg(DEFAULT_MAX_PIXELS, "larger images are rejected before decoding")
    min_face_score: float = arg(DEFAULT_MIN_SCORE, cli=False)  # detector confidence; library callers set it

    def validate(self) -> None:
        """Everything that can be wrong with the settings (input and output reachable, captioner loadable),
        checked before any work starts."""
        if self.source not in SOURCES:
            raise ValueError(f"--source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"--detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")
        for name in ("max_subjects", "resolution", "batch_size", "rows_per_shard", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.num_gpus_per_stage < 0:
            raise ValueError(f"--num-gpus-per-stage must be >= 0, got {self.num_gpus_per_stage}")
        if self.workers_per_stage is not None and self.workers_per_stage < 1:
            raise ValueError(f"--workers-per-stage must be at least 1, got {self.workers_per_stage}")
        dataio.check_input_dir(self.input)
        dataio.check_output_dir(self.output)
        if self.source == "images":
            check_captioner(self.captioner)

    def to_dict(self) -> dict:
        return asdict(self)


def new_item(item_id: str, source: str, caption_source: str | None = None) -> dict:
    return {"id": item_id, "source": source, "caption_source": caption_source, "image": None, "width": None,
            "height": None, "caption": None, "subjects": [], "stage": None, "reason": None}


def reject(item: dict, stage: str, reason: str) -> dict:
    return {**item, "stage": stage, "reason": reason}


def list_image_items(input_uri: str) -> list[dict]:
    """Every image file under the input (sorted, so ids and output are deterministic). The id is the path
    relative to the input; a `<name>.txt` beside an image is its existing caption."""
    captions = {posixpath.splitext(rel)[0]: uri for rel, uri in dataio.list_files(input_uri, (".txt",))}
    return [new_item(rel, uri, captions.get(posixpath.splitext(rel)[0]))
            for rel, uri in dataio.list_files(input_uri, dataio.IMAGE_EXTENSIONS)]


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
        return reject(item, "read", f"cannot read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    try:
        image = decode_image(data, max_pixels=config.max_pixels, name=posixpath.basename(item["source"]))
    except ImageDecodeError as exc:
        return reject(item, "decode", str(exc))
    image = resize_short_side(image, config.resolution)
    return {**item, "image": encode_jpeg(image), "width": image.width, "height": image.height,
            "caption": caption or None}


def detect_stage(item: dict, detector, config: PreprocessConfig) -> dict:
    faces = detector(stored_array(item))
    if not faces:
        return reject(item, "detect", "no face found")
    if len(faces) > config.max_subjects:
        return reject(item, "detect", f"{len(faces)} faces, more than --max-subjects {config.max_subjects}")
    return {**item, "subjects": [{"face_box": f.box, "score": f.score} for f in faces]}


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
        subjects.append({**subject, "person_box": mask_box(mask), "mask_png": encode_mask(mask),
                         "face_mask_png": encode_mask(face_ellipse(face, width, height))})
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


# ------------------------------------------------------------------------------------------ to tables


def to_record(item: dict) -> Record:
    subjects = [Subject(person_box=list(s["person_box"]), face_box=list(s["face_box"]), score=float(s["score"]),
                        mask_png=s["mask_png"], noun=s["noun"], noun_end=int(s["noun_end"]),
                        face_mask_png=s["face_mask_png"]) for s in item["subjects"]]
    return Record(id=item["id"], source=item["source"], image=item["image"], width=int(item["width"]),
                  height=int(item["height"]), caption=item["caption"], subjects=subjects)


def work_table(items: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(items, schema=WORK_SCHEMA)


def shard_table(items: list[dict]) -> pa.Table:
    """The accepted items as a SHARD_SCHEMA table (rejected ones left out)."""
    return pa.Table.from_pylist([to_record(i).to_row() for i in items if not i["stage"]], schema=SHARD_SCHEMA)


def status_table(items: list[dict]) -> pa.Table:
    """Every item's id, source, stage and reason (REJECT_SCHEMA; stage None: accepted)."""
    rows = [{k: i[k] for k in ("id", "source", "stage", "reason")} for i in items]
    return pa.Table.from_pylist(rows, schema=REJECT_SCHEMA)


def reject_table(items: list[dict]) -> pa.Table:
    return status_table([i for i in items if i["stage"]])


STAGE_ORDER = {"images": ("read", "decode", "detect", "segment", "caption", "link", "write"),
               "fastcomposer": ("read", "decode", "convert", "write")}


def stage_counts(source: str, total: int, rejected_stages: list[str]) -> dict:
    """{"input": N, "<stage>": {"rejected": r, "passed": p}, ..., "written": W} in pipeline order (a stage name
    outside STAGE_ORDER is counted after them, so input = written + rejected holds whatever the names)."""
    counts: dict = {"input": total}
    remaining = total
    order = STAGE_ORDER[source]
    for stage in (*order, *sorted(set(rejected_stages) - set(order))):
        rejected = sum(1 for s in rejected_stages if s == stage)
        remaining -= rejected
        counts[stage] = {"rejected": rejected, "passed": remaining}
    counts["written"] = remaining
    counts["rejected"] = len(rejected_stages)
    return counts


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


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
                raise StageError(f"stage {name} raised on {self.limit} items in a row (the last, {item['id']}: "
                                 f"{_one_line(exc)}): stopping, this is not one bad row") from exc
            return reject(item, name, f"raised {_one_line(exc)}")
        self.in_a_row[name] = 0
        return result


def _misfit(exc: Exception) -> str:
    return f"the row does not fit the schema: {_one_line(exc)}"


def checked_work_table(items: list[dict], stage: str) -> pa.Table:
    """work_table(items), where an item whose row does not fit WORK_SCHEMA (a model returned something odd)
    becomes a bare reject of `stage` (or of the stage that had rejected it) instead of failing the batch."""
    try:
        return work_table(items)
    except Exception:  # find the rows that do not fit, one at a time
        pass
    fixed = []
    for item in items:
        try:
            work_table([item])
        except Exception as exc:  # keep a reject's own stage and reason; drop the fields that do not fit
            bare = new_item(item["id"], item["source"], item.get("caption_source"))
            item = reject(bare, item["stage"], item["reason"]) if item.get("stage") else reject(bare, stage, _misfit(exc))
        fixed.append(item)
    return work_table(fixed)


def shard_rows(items: list[dict]) -> tuple[pa.Table, list[dict]]:
    """(the accepted items as a SHARD_SCHEMA table, items) — an accepted item that does not make a valid shard row
    is rejected at `write` (returned among the items) instead of failing the whole write."""
    try:
        return shard_table(items), items
    except Exception:  # find the rows that do not fit, one at a time
        pass
    rows, checked = [], []
    for item in items:
        if not item["stage"]:
            try:
                row = to_record(item).to_row()
                pa.Table.from_pylist([row], schema=SHARD_SCHEMA)
                rows.append(row)
            except Exception as exc:
                item = reject(item, "write", _misfit(exc))
        checked.append(item)
    return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), checked


# ------------------------------------------------------------------------------------- the plain loop

IMAGE_STAGES = ("read", "detect", "segment", "caption", "link")  # `read` covers read + decode


def apply_stages(item: dict, config: PreprocessConfig, names=IMAGE_STAGES, *, detector=None, segmenter=None,
                 captioner=None, guard: StageGuard | None = None) -> dict:
    """Runs the named stages in order on one item, stopping at the first that rejects it (`caption` with
    captioner None writes the template). A stage that raises rejects the item (see StageGuard; pass one guard
    per loop so that a broken model stops it). The plain loop and every Ray stage go through here."""
    guard = guard or StageGuard()
    functions = {"read": lambda i: read_stage(i, config), "detect": lambda i: detect_stage(i, detector, config),
                 "segment": lambda i: segment_stage(i, segmenter), "caption": lambda i: caption_stage(i, captioner),
                 "link": link_stage}
    for name in names:
        if name not in functions:
            raise ValueError(f"unknown stage {name!r}; stages are {', '.join(IMAGE_STAGES)}")
    for name in names:
        if item["stage"]:
            break
        item = guard.run(name, functions[name], item)
    return item


def process_locally(items: list[dict], config: PreprocessConfig, detector, segmenter, captioner=None,
                    progress: bool = True) -> list[dict]:
    """All stages, one image at a time, in this process: the same functions the Ray pipeline runs."""
    from tqdm.auto import tqdm

    guard = StageGuard()
    return [apply_stages(item, config, detector=detector, segmenter=segmenter, captioner=captioner, guard=guard)
            for item in tqdm(items, desc="preprocess (plain loop)", disable=not progress)]
