"""`facediffuser preprocess` / `python -m pipelines.preprocess`: photos of people → Parquet shards, on Ray Data.

read + decode → detect faces → person masks → caption → link nouns → OUTPUT/shards/*.parquet,
OUTPUT/rejects/rejects.parquet and OUTPUT/manifest.json. Each stage is a library function on one image
(facediffuser/data/stages.py). The stages that share a device are fused into ONE map_batches class that loads its
models once: on CPUs the whole chain is one pool of tasks, one per CPU, whose worker processes keep that object
for their later tasks (`run_in_worker`); with `--num-gpus-per-stage` the stages that can use a GPU (MTCNN, a
captioner model) become actor pools of their own (ActorPoolStrategy), which hold the model on their GPU. The last
pool also writes the shards: each call is one block of rows, written as one shard file, and returns the status of
every row, which the driver counts (and shows as a progress bar) as the blocks finish.

A row that fails (a stage or its model raising on one image included) is a reject with its stage and reason; the
job fails only on systemic errors (a model that cannot load, a stage raising on image after image, an output that
cannot be written). manifest.json is removed when a run starts and written last (facediffuser/data/output_dir.py), so
`train` never reads the shards of a run that did not finish.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import pyarrow as pa

from facediffuser import faults
from facediffuser.config import add_arguments as add_config_arguments, from_args
from facediffuser.data import io as dataio
from facediffuser.data import output_dir
from facediffuser.data import stages, work_items
from facediffuser.data.captions import TEMPLATE, make_captioner
from facediffuser.data.fastcomposer import convert_stage, list_fastcomposer_items
from facediffuser.data.faces import make_detector
from facediffuser.data.masks import PersonSegmenter
from facediffuser.data.schema import SCHEMA_VERSION
from facediffuser.data.resume import previous_work
from facediffuser.data.preprocess_config import PreprocessConfig
from facediffuser.data.work_items import work_table
from facediffuser.devices import CPU_UNDER_GPU_ENV, torch_device
from facediffuser.manifest import package_versions
from cluster.runtime import AWS_VARIABLES

GPU_ACTOR_CPUS = 0.25  # a GPU-stage actor mostly waits on its GPU; the rest of the CPUs go to the CPU stages
TASKS_IN_FLIGHT = 2  # per GPU actor: one running batch and one queued (hides the call's round trip)
BLOCKS_PER_WORKER = 4  # at least, when there are enough rows: a worker that starts late still gets a fair share


# ------------------------------------------------------------------------------------------- the layout


@dataclass(frozen=True)
class StagePlan:
    """One map_batches pool: the stages it runs (in order), its size (concurrent tasks on CPUs, actors on GPUs)
    and resources per worker."""

    names: tuple[str, ...]
    workers: int
    num_cpus: float
    num_gpus: float = 0.0

    @property
    def kind(self) -> str:
        return "actors" if self.num_gpus > 0 else "tasks"


def _on_gpu(name: str, config: PreprocessConfig) -> bool:
    """Only MTCNN and a captioner model can use a GPU (mediapipe's Python solutions run on the CPU)."""
    return config.num_gpus_per_stage > 0 and ((name == "detect" and config.detector == "mtcnn")
                                              or (name == "caption" and config.captioner != TEMPLATE))


def plan_stages(config: PreprocessConfig, cluster_cpus: float, cluster_gpus: float = 0.0) -> list[StagePlan]:
    """The stage layout: consecutive stages on the same device share one pool (fused, models loaded once per
    worker). Template captions and noun linking are cheap and ride with the stage before them.

    CPU pools get one CPU per task and, by default, as many concurrent tasks as the cluster has CPUs (less what
    the GPU pools reserve), split among the CPU pools; GPU pools get `--num-gpus-per-stage` per actor and at most
    as many actors as the cluster's GPUs hold. `--workers-per-stage N` sets every pool's size (a CPU task's share
    then drops below one CPU if the pools would not fit otherwise). The shards are written by the last pool, so
    no CPU is kept back for separate write tasks."""
    if config.source == "fastcomposer":
        groups: list[tuple[list[str], bool]] = [(["convert"], False)]
    else:
        groups = []
        for name in stages.IMAGE_STAGES:
            gpu = _on_gpu(name, config)
            rides_along = name == "link" or (name == "caption" and not gpu)
            if groups and (rides_along or groups[-1][1] == gpu):
                groups[-1][0].append(name)
            else:
                groups.append(([name], gpu))
    gpu_actors = max(1, int(cluster_gpus // config.num_gpus_per_stage)) if config.num_gpus_per_stage else 0
    if config.workers_per_stage:
        gpu_actors = min(gpu_actors, config.workers_per_stage)
    gpu_pools = sum(gpu for _, gpu in groups)
    cpu_pools = len(groups) - gpu_pools
    cpu_budget = max(cluster_cpus - gpu_pools * gpu_actors * GPU_ACTOR_CPUS, min(cluster_cpus, 1.0))
    cpu_tasks = config.workers_per_stage or max(1, int(cpu_budget // cpu_pools))
    cpu_share = min(1.0, cpu_budget / (cpu_pools * cpu_tasks))
    return [StagePlan(tuple(names), gpu_actors, GPU_ACTOR_CPUS, config.num_gpus_per_stage) if gpu
            else StagePlan(tuple(names), cpu_tasks, cpu_share) for names, gpu in groups]


# ------------------------------------------------------------------------------------------- the stages


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
    `stages.apply_stages`, the function the plain loop calls). It loads the models those stages need once."""

    def __init__(self, config: PreprocessConfig, names: tuple[str, ...], num_cpus: float, num_gpus: float,
                 writer: ShardWriter | None = None):
        from cluster.runtime import where

        self.config, self.names, self.guard, self.writer = config, names, stages.StageGuard(), writer
        # given a GPU that torch cannot see: one line naming the node, unless FACEDIFFUSER_CPU_UNDER_GPU=1
        device = torch_device(num_gpus, f"preprocess stages {'+'.join(names)} on {where()}")
        self.detector = make_detector(config.detector, config.min_face_score, device=device) \
            if "detect" in names else None
        self.segmenter = PersonSegmenter() if "segment" in names else None
        self.captioner = make_captioner(config.captioner, device=device) if "caption" in names else None
        if "torch" in sys.modules:  # MTCNN, a captioner: as many torch threads as the worker has CPUs
            sys.modules["torch"].set_num_threads(max(1, int(num_cpus)))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _map_items(batch, lambda item: stages.apply_stages(
            item, self.config, self.names, detector=self.detector, segmenter=self.segmenter,
            captioner=self.captioner, guard=self.guard), self.names[-1], self.writer)


class ConvertFastComposer:
    """--source fastcomposer: jpg + json + npy → a work row, no models."""

    def __init__(self, config: PreprocessConfig, names: tuple[str, ...], num_cpus: float, num_gpus: float,
                 writer: ShardWriter | None = None):
        self.config, self.guard, self.writer = config, stages.StageGuard(), writer

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _map_items(batch, lambda item: item if item["stage"] else self.guard.run(
            "convert", lambda i: convert_stage(i, self.config), item), "convert", self.writer)


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


# ---------------------------------------------------------------------------------------- the pipeline


def _runtime_env() -> dict:
    env = {name: os.environ[name] for name in (*AWS_VARIABLES, CPU_UNDER_GPU_ENV) if name in os.environ}
    env.update(faults.forwarded_env())  # tests only: the stages' fault points (facediffuser/faults.py)
    return {"runtime_env": {"env_vars": env}} if env else {}


def block_rows(count: int, plans: list[StagePlan], rows_per_shard: int) -> int:
    """Rows per block, and so per shard file: at most `rows_per_shard`, and small enough that every worker of the
    widest pool gets BLOCKS_PER_WORKER blocks when there are enough rows (shards are then written from the first
    minutes on, and the last block is a small part of the run)."""
    workers = max(plan.workers for plan in plans)
    return max(1, min(rows_per_shard, math.ceil(count / (BLOCKS_PER_WORKER * workers))))


def build_dataset(items: list[dict], config: PreprocessConfig, shards_uri: str, cluster_cpus: float,
                  cluster_gpus: float = 0.0, run: str | None = None):
    """The lazy Ray Dataset over `items`: all stages applied, the last pool writing the accepted rows to
    `shards_uri` (file names prefixed `run`, a new random one by default); it holds every row's status
    (REJECT_SCHEMA columns, SHARD and RAN_ON)."""
    import functools
    import uuid

    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    plans = plan_stages(config, cluster_cpus, cluster_gpus)
    rows = block_rows(len(items), plans, config.rows_per_shard)
    table = work_table(items)
    ds = ray.data.from_arrow([table.slice(start, rows) for start in range(0, len(items), rows)])
    stage_class = ConvertFastComposer if config.source == "fastcomposer" else RunStages
    run = run or uuid.uuid4().hex[:12]
    for plan in plans:
        last = plan is plans[-1]
        arguments = (config, plan.names, plan.num_cpus, plan.num_gpus,
                     ShardWriter(shards_uri, run) if last else None)
        if plan.kind == "actors":
            function, compute = stage_class, ActorPoolStrategy(size=plan.workers,
                                                               max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT)
            options = {"fn_constructor_args": arguments}
        else:
            function, compute = run_in_worker, TaskPoolStrategy(size=plan.workers)
            options = {"fn_args": (run, plan.names, functools.partial(stage_class, *arguments))}
        # a pool before the last takes `--batch-size` rows per call; the last a whole block (one shard file)
        ds = ds.map_batches(function, compute=compute, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                            batch_format="pyarrow", batch_size=rows if last else min(rows, config.batch_size),
                            zero_copy_batch=True, **options, **_runtime_env())
    return ds


def list_items(config: PreprocessConfig) -> list[dict]:
    items = (stages.list_image_items if config.source == "images" else list_fastcomposer_items)(config.input)
    if not items:
        kind = "image files" if config.source == "images" else "FastComposer samples (.jpg/.json)"
        raise ValueError(f"--input {config.input}: no {kind} found")
    return items


def preprocess(config: PreprocessConfig, verbose: bool = False) -> dict:
    """Run the pipeline on the current Ray cluster (started locally when none is). Returns the manifest.
    A rerun with the same output and settings processes only the inputs not yet written or rejected."""
    import ray

    from cluster.runtime import init_ray

    config.validate()
    items = list_items(config)
    started = time.time()
    todo, old_rejects = _remaining_work(config, items)
    init_ray(verbose)  # joins a running Ray (a test session's, a cluster under `ray job submit`) or starts one
    resources = ray.cluster_resources()
    cluster = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    statuses: list[dict] = []
    try:
        _run_pipeline(config, todo, *cluster, statuses)
    except KeyboardInterrupt:  # stopped (cluster/stopping.py): the finished blocks' shards stay; keep their rejects
        _write_rejects(config.output, old_rejects + [s for s in statuses if s["stage"]])
        raise
    rejected = old_rejects + [s for s in statuses if s["stage"]]
    _write_rejects(config.output, rejected)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "counts": work_items.stage_counts(config.source, len(items), [r["stage"] for r in rejected]),
        "resumed": len(items) - len(todo),
        "config": config.to_dict(),
        "cluster_cpus": cluster[0],
        "cluster_gpus": cluster[1],
        "stages": stage_info(plan_stages(config, *cluster), statuses),
        "package_versions": package_versions(("facediffuser", "ray", "pyarrow", "numpy", "mediapipe",
                                              "facenet-pytorch", "torch", "transformers", "pillow")),
        "wall_time_s": round(time.time() - started, 3),
        "images_per_s": round(len(todo) / max(time.time() - started, 1e-9), 3),
    }
    return output_dir.write_manifest(config.output, manifest)  # last: lists the shard files, checks their rows


def stage_info(plans: list[StagePlan], statuses: list[dict]) -> list[dict]:
    """The layout that ran, for the manifest: per pool its stages, size and resources, and the nodes that ran it
    (node id, Ray's node name, rows), so a cluster run shows where its GPU stages went."""
    import ray

    names = {n["NodeID"]: n.get("NodeName") or n.get("NodeManagerAddress") for n in ray.nodes()}
    info = []
    for index, plan in enumerate(plans):
        rows: dict[str, int] = {}
        for status in statuses:
            ran_on = status.get(RAN_ON) or []
            if index < len(ran_on):
                rows[ran_on[index]] = rows.get(ran_on[index], 0) + 1
        info.append({"stages": list(plan.names), plan.kind: plan.workers, "num_cpus": plan.num_cpus,
                     "num_gpus": plan.num_gpus, "nodes": [{"node_id": node, "node_name": names.get(node), "rows": n}
                                                          for node, n in sorted(rows.items())]})
    return info


def _remaining_work(config: PreprocessConfig, items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the items still to process, the reject rows kept from an earlier run with the same settings)."""
    ids = {item["id"] for item in items}
    done, old_rejects = previous_work(config, ids)
    old_rejects = [r for r in old_rejects if r["id"] in ids and r["id"] not in done]
    todo = [item for item in items if item["id"] not in done | {r["id"] for r in old_rejects}]
    if len(todo) < len(items):
        print(f"--output {config.output}: {len(items) - len(todo)} of {len(items)} inputs already done there "
              f"(written or rejected); processing the other {len(todo)}", flush=True)
    return todo, old_rejects


def _run_pipeline(config: PreprocessConfig, todo: list[dict], cluster_cpus: float, cluster_gpus: float,
                  statuses: list[dict]) -> list[dict]:
    """The stages and the shard writes over `todo`; every row's status (id, source, stage, reason) is appended to
    `statuses` as its block finishes (so a stopped run still knows what it finished); → `statuses`."""
    import uuid

    from tqdm.auto import tqdm

    run, shards_uri = uuid.uuid4().hex[:12], dataio.join(config.output, output_dir.SHARDS_DIR)
    if todo:
        dataset = build_dataset(todo, config, shards_uri, cluster_cpus, cluster_gpus, run=run)
        try:
            with tqdm(total=len(todo), desc="preprocess", unit="img", file=sys.stderr) as bar:
                # no prefetching: a block's statuses are counted as soon as it is written, not when the next one is
                for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                    statuses += block.to_pylist()
                    bar.update(block.num_rows)
        finally:  # also when stopped: only the files of counted blocks stay
            removed = sweep_shards(shards_uri, run, {s[SHARD] for s in statuses if s.get(SHARD)})
            if removed:
                print(f"preprocess: removed {len(removed)} shard file(s) of blocks that ran again elsewhere "
                      f"(a worker or node was lost mid-block): {', '.join(removed[:3])}", file=sys.stderr, flush=True)
    if len(statuses) != len(todo) or {s["id"] for s in statuses} != {i["id"] for i in todo}:
        # the accounting identity: every input is written or rejected, once
        raise RuntimeError(f"pipeline lost rows: {len(todo)} in, {len(statuses)} out")
    return statuses


def _write_rejects(output: str, rejected: list[dict]) -> None:
    import pyarrow.parquet as pq

    fs, path = dataio.resolve(dataio.join(output, output_dir.REJECTS_DIR, "rejects.parquet"))
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    pq.write_table(work_items.status_table(sorted(rejected, key=lambda r: r["id"])), path, filesystem=fs)


# --------------------------------------------------------------------------------------------- the CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, PreprocessConfig)


def run(args: argparse.Namespace) -> int:
    from cluster.stopping import stoppable

    with stoppable():  # SIGTERM/SIGINT: written shards and rejects stay, a rerun does the rest
        manifest = preprocess(from_args(PreprocessConfig, args), verbose=args.verbose)
    counts = manifest["counts"]
    print(f"preprocess: {counts['input']} in, {counts['written']} written, {counts['rejected']} rejected "
          f"in {manifest['wall_time_s']:.1f} s → {args.output}")
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("preprocess")
