"""What a preprocessing pool runs in its Ray workers: the fused stages (`RunStages`, `ConvertFastComposer`) over a
batch, kept per worker process across a CPU pool's tasks (`run_in_worker`), and the last pool's shard writer
(`ShardWriter`; `sweep_shards` removes what a write cut short left). `pipelines/preprocess.py` builds the pools."""

from __future__ import annotations

import sys

import pyarrow as pa

from facediffuser.data import io as dataio
from facediffuser.data import stages, work_items
from facediffuser.data.captions import make_captioner
from facediffuser.data.dedup import hash_metadata
from facediffuser.data.faces import make_detector
from facediffuser.data.fastcomposer import convert_stage
from facediffuser.data.masks import PersonSegmenter
from facediffuser.data.preprocess_config import PreprocessConfig
from facediffuser.devices import torch_device


class ShardWriter:
    """What the last pool does after its stages: the accepted rows of one call become one SHARD_SCHEMA
    file (a row that does not fit the schema is a `write` reject), and the call returns the status of every row
    (REJECT_SCHEMA columns, plus SHARD: the file it went to), so the shards and the accounting come out of one pass.

    The file name holds the run's prefix and a hash of the block's first id, so a retried call (its node died, or
    its output was lost with the node and Ray re-ran it) rewrites its own file instead of adding one. The file is
    written under a hidden temporary name (readers skip names starting with '.') and moved into place when
    complete, so a node that dies mid-write leaves no partial shard; `sweep_shards` removes what such a node left
    (its temporary file, or a whole file of a block whose statuses never reached the driver)."""

    def __init__(self, shards_uri: str, prefix: str):
        self.uri, self.prefix = shards_uri, prefix

    def __call__(self, items: list[dict]) -> pa.Table:
        import hashlib
        import uuid

        import pyarrow.parquet as pq

        table, items = work_items.shard_rows(items)
        name = None
        if table.num_rows:
            fs, path = dataio.resolve(self.uri)
            fs.create_dir(path, recursive=True)
            block = hashlib.sha1(items[0]["id"].encode()).hexdigest()[:16]
            name = f"{self.prefix}_{block}.parquet"
            partial = f"{path}/.{name}.{uuid.uuid4().hex[:8]}.partial"
            # the rows' perceptual hashes go in the file's metadata: a resumed run's near-duplicate index reads them
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **hash_metadata(items)})
            pq.write_table(table, partial, filesystem=fs)
            fs.move(partial, f"{path}/{name}")
        statuses = work_items.status_table(items)
        return statuses.append_column(SHARD, pa.array([None if i["stage"] else name for i in items], pa.string()))


SHARD = "shard"  # per row status: the shard file (name under shards/) an accepted row was written to


def sweep_shards(shards_uri: str, run: str, kept: set[str]) -> list[str]:
    """Remove the files of run `run` under `shards_uri` that the driver did not count: temporary files of a write
    cut short (a node died mid-write) and shard files of a block whose statuses never came back (the block ran
    again, possibly bundled differently, and its rows went to another file). → the names removed. With them gone
    every counted row is in exactly one shard file."""
    import pyarrow.fs as pafs

    fs, path = dataio.resolve(shards_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    removed = []
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.File and name.lstrip(".").startswith(f"{run}_") and name not in kept:
            fs.delete_file(info.path)
            removed.append(name)
    return sorted(removed)


RAN_ON = "ran_on"  # per row: the Ray node id of each pool that ran it so far (→ the manifest's stages[].nodes)


def _map_items(batch: pa.Table, function, stage: str, writer: ShardWriter | None) -> pa.Table:
    """`function` on each item of the batch; → the rows for the next pool (WORK_SCHEMA: a row that does not fit
    is a reject of `stage`) or, in the last pool (`writer` given), their statuses once written (straight from
    the items: a work table there would cost 3 ms an image for nothing). Either way each row carries RAN_ON,
    the nodes its pools ran on, with this one's added."""
    from cluster.runtime import node_id

    trail = batch.column(RAN_ON).to_pylist() if RAN_ON in batch.column_names else [[]] * batch.num_rows
    items = [function(item) for item in batch.to_pylist()]
    table = writer(items) if writer else work_items.checked_work_table(items, stage)
    here = node_id()
    return table.append_column(RAN_ON, pa.array([list(t) + [here] for t in trail], pa.list_(pa.string())))


class RunStages:
    """A map_batches class that runs a fused run of stages on each item of a batch (through
    `stages.apply_stages`, the function the plain loop calls). It loads the models those stages need once;
    `seen` is the run's near-duplicate index (pipelines/preprocess_dedup.py), for the `dedup` stage."""

    def __init__(
        self,
        config: PreprocessConfig,
        names: tuple[str, ...],
        num_cpus: float,
        num_gpus: float,
        writer: ShardWriter | None = None,
        seen=None,
    ):
        from cluster.runtime import where

        self.config, self.names, self.guard, self.writer = config, names, stages.StageGuard(), writer
        self.seen = seen
        # given a GPU that torch cannot see: one line naming the node, unless FACEDIFFUSER_CPU_UNDER_GPU=1
        device = torch_device(num_gpus, f"preprocess stages {'+'.join(names)} on {where()}")
        self.detector = (
            make_detector(config.detector, config.min_face_score, device=device) if "detect" in names else None
        )
        self.segmenter = PersonSegmenter() if "segment" in names else None
        self.captioner = make_captioner(config.captioner, device=device) if "caption" in names else None
        if "torch" in sys.modules:  # MTCNN, a captioner: as many torch threads as the worker has CPUs
            sys.modules["torch"].set_num_threads(max(1, int(num_cpus)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _map_items(
            batch,
            lambda item: stages.apply_stages(
                item,
                self.config,
                self.names,
                detector=self.detector,
                segmenter=self.segmenter,
                captioner=self.captioner,
                guard=self.guard,
                seen=self.seen,
            ),
            self.names[-1],
            self.writer,
        )


class ConvertFastComposer:
    """--source fastcomposer: jpg + json + npy → a work row, no models."""

    def __init__(
        self,
        config: PreprocessConfig,
        names: tuple[str, ...],
        num_cpus: float,
        num_gpus: float,
        writer: ShardWriter | None = None,
        seen=None,  # unused: the archive is converted, not filtered
    ):
        self.config, self.guard, self.writer = config, stages.StageGuard(), writer

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _map_items(
            batch,
            lambda item: (
                item if item["stage"] else self.guard.run("convert", lambda i: convert_stage(i, self.config), item)
            ),
            "convert",
            self.writer,
        )


_in_this_worker: dict = {"run": None, "pools": {}}  # in a Ray worker process: the stage objects of the latest run


def run_in_worker(batch: pa.Table, run: str, pool: tuple[str, ...], make) -> pa.Table:
    """A CPU pool's task: `make()` (a RunStages or ConvertFastComposer) is built by the first task of this run and
    pool that a worker process runs, and kept for its later ones (Ray reuses its worker processes), so the models
    load once per worker as in an actor, without an actor's start-up cost: its own worker process and Ray Data's
    actor-location tracker, several seconds of every run on a one-CPU machine. A new run frees the old objects."""
    if _in_this_worker["run"] != run:
        _in_this_worker.update(run=run, pools={})
    pools = _in_this_worker["pools"]
    if pool not in pools:
        pools[pool] = make()
    return pools[pool](batch)
