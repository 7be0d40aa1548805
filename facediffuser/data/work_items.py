"""The work item the preprocessing stages pass along (a dict; one image) and the tables it becomes. No Ray here.

An item is a row of WORK_SCHEMA: the shard columns, all nullable, plus `stage` and `reason` once it is rejected.
`shard_rows` and `checked_work_table` turn a row that does not fit its schema (a model returned something odd) into
a reject instead of failing the whole batch; `stage_counts` counts the rejects per stage for the manifest.
"""

from __future__ import annotations

import pyarrow as pa

from facediffuser.data.schema import REJECT_SCHEMA, SHARD_SCHEMA, Record, Subject

# The row type between stages: the shard columns, all nullable, plus where and why an item was rejected.
WORK_SUBJECT_TYPE = pa.struct(
    [
        pa.field("face_box", pa.list_(pa.float32())),
        pa.field("score", pa.float32()),
        pa.field("person_box", pa.list_(pa.float32())),
        pa.field("mask_png", pa.binary()),
        pa.field("face_mask_png", pa.binary()),
        pa.field("noun", pa.string()),
        pa.field("noun_end", pa.int32()),
    ]
)
WORK_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("source", pa.string()),
        pa.field("caption_source", pa.string()),  # sidecar caption file (.txt), when the input has one
        pa.field("image", pa.binary()),  # the stored image (resized, JPEG), once read
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("subjects", pa.list_(WORK_SUBJECT_TYPE)),
        pa.field("phash", pa.uint64()),  # the stored image's perceptual hash (at read, with dedup on)
        pa.field("stage", pa.string()),  # set when rejected: the stage that rejected it
        pa.field("reason", pa.string()),
    ]
)


def new_item(item_id: str, source: str, caption_source: str | None = None) -> dict:
    return {
        "id": item_id,
        "source": source,
        "caption_source": caption_source,
        "image": None,
        "width": None,
        "height": None,
        "caption": None,
        "subjects": [],
        "phash": None,
        "stage": None,
        "reason": None,
    }


def reject(item: dict, stage: str, reason: str) -> dict:
    return {**item, "stage": stage, "reason": reason}


def to_record(item: dict) -> Record:
    subjects = [
        Subject(
            person_box=list(s["person_box"]),
            face_box=list(s["face_box"]),
            score=float(s["score"]),
            mask_png=s["mask_png"],
            noun=s["noun"],
            noun_end=int(s["noun_end"]),
            face_mask_png=s["face_mask_png"],
        )
        for s in item["subjects"]
    ]
    return Record(
        id=item["id"],
        source=item["source"],
        image=item["image"],
        width=int(item["width"]),
        height=int(item["height"]),
        caption=item["caption"],
        subjects=subjects,
    )


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


STAGE_ORDER = {
    "images": ("read", "decode", "detect", "blur", "segment", "caption", "link", "dedup", "write"),
    "fastcomposer": ("read", "decode", "convert", "write"),
}


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


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _misfit(exc: Exception) -> str:
    return f"the row does not fit the schema: {one_line(exc)}"


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
            item = (
                reject(bare, item["stage"], item["reason"]) if item.get("stage") else reject(bare, stage, _misfit(exc))
            )
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
