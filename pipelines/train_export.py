"""What a finished run leaves for users (STORAGE/NAME, local or s3://): final/<model> (the last checkpoint's model
directory), the base's other model beside a single-model run (`pair_with_base`), final/export.json, and the
run's metrics.csv + loss_curve.png. Paths under final/ come from facediffuser.model_dir (the layout's owner).

A previous final/<model> stays whole until its replacement is complete (`replace_dir`): the new copy is written
beside it first, and only then swapped in.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from facediffuser import model_dir
from facediffuser.data import io as dataio
from facediffuser.training.metrics import TRAINED_LOSSES, plot_losses, read_metrics
from pipelines.train_config import TrainConfig
from pipelines.train_inputs import ray_filesystem

INCOMING = ".incoming"  # suffix of the new copy, written beside the directory it replaces
OUTGOING = ".outgoing"  # suffix of the old local copy while the new one is renamed in


def export_final(config: TrainConfig, checkpoint) -> dict:
    """Copy the last checkpoint's model dir to RUN/final/<model> and write the metrics table + loss curve next to
    the Ray run directory. → the run's summary."""
    from facediffuser.training.checkpoint import MODEL_SUBDIR

    final_uri = model_dir.final_model_dir(config.run_root, config.model)
    replace_dir(checkpoint.filesystem, f"{checkpoint.path}/{MODEL_SUBDIR}", final_uri)
    run_dir = model_dir.run_folder(config.run_root, config.model)
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(
            f"{checkpoint.path}/metrics.csv",
            f"{tmp}/metrics.csv",
            source_filesystem=checkpoint.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )
        rows = read_metrics(Path(tmp) / "metrics.csv")
        plot_losses(
            rows,
            Path(tmp) / "loss_curve.png",
            title=f"{config.name} {config.model}",
            losses=TRAINED_LOSSES[config.model],
        )
        for name in ("metrics.csv", "loss_curve.png"):
            dataio.write_bytes(dataio.join(run_dir, name), (Path(tmp) / name).read_bytes())
    last = rows[-1]
    return {
        "model": config.model,
        "steps": int(last["step"]),
        "loss_den": last["loss_den"],
        "loss_loc": last["loss_loc"],
        "restarts": int(last["attempt"]),
        "model_dir": final_uri,
        "metrics": dataio.join(run_dir, "metrics.csv"),
    }


def replace_dir(source_fs: pafs.FileSystem, source_path: str, dest_uri: str) -> None:
    """Put a copy of `source_path` at `dest_uri`, never removing the previous one before the copy is complete.

    The copy goes to DEST.incoming first. Locally it is then renamed in (the old one steps aside as DEST.outgoing
    for that moment, then is deleted). S3 has no rename: each object of the complete copy is copied over DEST
    server-side, then the objects the new copy does not have are deleted. A crash leaves DEST whole (before the
    swap) or repairable by rerunning (during it); a leftover DEST.incoming is replaced by the next export."""
    fs, dest = ray_filesystem(dest_uri)
    incoming, outgoing = dest.rstrip("/") + INCOMING, dest.rstrip("/") + OUTGOING
    _delete_dir(fs, incoming)
    pafs.copy_files(source_path, incoming, source_filesystem=source_fs, destination_filesystem=fs)
    if not dataio.is_s3(dest_uri):
        _delete_dir(fs, outgoing)
        if _exists(fs, dest):
            fs.move(dest, outgoing)
        fs.move(incoming, dest)
        _delete_dir(fs, outgoing)
        return
    new = {
        info.path[len(incoming) + 1 :]
        for info in fs.get_file_info(pafs.FileSelector(incoming, recursive=True))
        if info.type == pafs.FileType.File
    }
    for relative in sorted(new):
        fs.copy_file(f"{incoming}/{relative}", f"{dest}/{relative}")
    if _exists(fs, dest):
        for info in fs.get_file_info(pafs.FileSelector(dest, recursive=True)):
            if info.type == pafs.FileType.File and info.path[len(dest) + 1 :] not in new:
                fs.delete_file(info.path)
    _delete_dir(fs, incoming)


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _delete_dir(fs: pafs.FileSystem, path: str) -> None:
    if _exists(fs, path):
        fs.delete_dir(path)


def pair_with_base(config: TrainConfig) -> str | None:
    """A single-model run: put the base's other model beside it (once) so final/ is a complete pipeline."""
    from facediffuser.training import checkpoint as ckpt

    other = next(which for which in model_dir.MODELS if which != config.model)
    other_uri = model_dir.final_model_dir(config.run_root, other)
    if model_dir.has_unet(other_uri):
        return None
    parts = ckpt.load_components(
        config.base, other, tiny=config.tiny, image_encoder=config.image_encoder, variant=config.variant
    )
    with tempfile.TemporaryDirectory() as tmp:
        ckpt.save_model_dir(tmp, other, **{part: parts[part] for part in model_dir.MODEL_PARTS})
        replace_dir(pafs.LocalFileSystem(), tmp, other_uri)
    return other


def write_export_note(configs: list[TrainConfig], paired: str | None) -> None:
    """final/export.json: which models this run trained (kept from earlier runs of the same name), and which one
    is the untrained base paired beside them."""
    first = configs[0]
    note_uri = dataio.join(model_dir.final_dir(first.run_root), model_dir.EXPORT_NOTE)
    previous = json.loads(dataio.read_bytes(note_uri)) if dataio.exists(note_uri) else {}
    for config in configs:
        previous[config.model] = {"trained": True, "run": model_dir.run_folder(first.run_root, config.model)}
    if paired:
        previous.setdefault(paired, {"trained": False, "base": "tiny" if first.tiny else first.base})
    dataio.write_bytes(note_uri, json.dumps(previous, indent=2).encode())
