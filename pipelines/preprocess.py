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

The pools' layout is pipelines/preprocess_plan.py; what runs in their workers, pipelines/preprocess_workers.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cluster.runtime import AWS_VARIABLES
from facediffuser import faults
from facediffuser.config import add_arguments as add_config_arguments
from facediffuser.config import from_args
from facediffuser.data import filters, output_dir, stages, work_items
from facediffuser.data import io as dataio
from facediffuser.data.dedup import written_hashes
from facediffuser.data.fastcomposer import list_fastcomposer_items
from facediffuser.data.preprocess_config import PreprocessConfig
from facediffuser.data.resume import previous_work
from facediffuser.data.schema import SCHEMA_VERSION
from facediffuser.data.work_items import work_table
from facediffuser.devices import CPU_UNDER_GPU_ENV
from facediffuser.manifest import package_versions
from pipelines import preprocess_dedup
from pipelines.preprocess_plan import TASKS_IN_FLIGHT, StagePlan, block_rows, plan_stages
from pipelines.preprocess_workers import (
    RAN_ON,
    SHARD,
    ConvertFastComposer,
    RunStages,
    ShardWriter,
    run_in_worker,
    sweep_shards,
)
from pipelines.progress_metrics import preprocess_items

# ---------------------------------------------------------------------------------------- the pipeline


def count_items(statuses: list[dict]) -> None:
    """Photos accounted for, as Prometheus counters (the driver counts: a pool's worker may exit before Ray
    exports what it recorded)."""
    counter = preprocess_items()
    for stage in {s["stage"] for s in statuses}:
        outcome = "rejected" if stage else "written"
        count = sum(1 for s in statuses if s["stage"] == stage)
        counter.inc(count, tags={"stage": stage or "write", "outcome": outcome})


def _runtime_env() -> dict:
    env = {name: os.environ[name] for name in (*AWS_VARIABLES, CPU_UNDER_GPU_ENV) if name in os.environ}
    env.update(faults.forwarded_env())  # tests only: the stages' fault points (facediffuser/faults.py)
    return {"runtime_env": {"env_vars": env}} if env else {}


def build_dataset(
    items: list[dict],
    config: PreprocessConfig,
    shards_uri: str,
    cluster_cpus: float,
    cluster_gpus: float = 0.0,
    run: str | None = None,
    seen=None,
):
    """The lazy Ray Dataset over `items`: all stages applied, the last pool writing the accepted rows to
    `shards_uri` (file names prefixed `run`, a new random one by default); it holds every row's status
    (REJECT_SCHEMA columns, SHARD and RAN_ON). `seen`: the run's near-duplicate index (preprocess_dedup)."""
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
        writer = ShardWriter(shards_uri, run) if last else None
        arguments = (config, plan.names, plan.num_cpus, plan.num_gpus, writer, seen)
        if plan.kind == "actors":
            function, compute = (
                stage_class,
                ActorPoolStrategy(size=plan.workers, max_tasks_in_flight_per_actor=TASKS_IN_FLIGHT),
            )
            options = {"fn_constructor_args": arguments}
        else:
            function, compute = run_in_worker, TaskPoolStrategy(size=plan.workers)
            options = {"fn_args": (run, plan.names, functools.partial(stage_class, *arguments))}
        # a pool before the last takes `--batch-size` rows per call; the last a whole block (one shard file)
        ds = ds.map_batches(
            function,
            compute=compute,
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            batch_format="pyarrow",
            batch_size=rows if last else min(rows, config.batch_size),
            zero_copy_batch=True,
            **options,
            **_runtime_env(),
        )
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
        "rejects_by_reason": filters.reason_counts(rejected),  # {stage: {reason code: n}}; codes: filters.py
        "filters": filters.filter_counts(rejected, config.to_dict()) if config.source == "images" else {},
        "resumed": len(items) - len(todo),
        "config": config.to_dict(),
        "cluster_cpus": cluster[0],
        "cluster_gpus": cluster[1],
        "stages": stage_info(plan_stages(config, *cluster), statuses),
        "package_versions": package_versions(
            (
                "facediffuser",
                "ray",
                "pyarrow",
                "numpy",
                "mediapipe",
                "facenet-pytorch",
                "torch",
                "transformers",
                "pillow",
            )
        ),
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
        info.append(
            {
                "stages": list(plan.names),
                plan.kind: plan.workers,
                "num_cpus": plan.num_cpus,
                "num_gpus": plan.num_gpus,
                "nodes": [
                    {"node_id": node, "node_name": names.get(node), "rows": n} for node, n in sorted(rows.items())
                ],
            }
        )
    return info


def _remaining_work(config: PreprocessConfig, items: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the items still to process, the reject rows kept from an earlier run with the same settings)."""
    ids = {item["id"] for item in items}
    done, old_rejects = previous_work(config, ids)
    old_rejects = [r for r in old_rejects if r["id"] in ids and r["id"] not in done]
    todo = [item for item in items if item["id"] not in done | {r["id"] for r in old_rejects}]
    if len(todo) < len(items):
        print(
            f"--output {config.output}: {len(items) - len(todo)} of {len(items)} inputs already done there "
            f"(written or rejected); processing the other {len(todo)}",
            flush=True,
        )
    return todo, old_rejects


def _run_pipeline(
    config: PreprocessConfig, todo: list[dict], cluster_cpus: float, cluster_gpus: float, statuses: list[dict]
) -> list[dict]:
    """The stages and the shard writes over `todo`; every row's status (id, source, stage, reason) is appended to
    `statuses` as its block finishes (so a stopped run still knows what it finished); → `statuses`."""
    import uuid

    from tqdm.auto import tqdm

    run, shards_uri = uuid.uuid4().hex[:12], dataio.join(config.output, output_dir.SHARDS_DIR)
    if todo:
        index = None
        if config.source == "images" and config.duplicate_distance >= 0:  # seeded with the rows written before
            index = preprocess_dedup.start_index(run, config.duplicate_distance, written_hashes(shards_uri))
        seen = preprocess_dedup.AskSeenHashes(index) if index else None
        dataset = build_dataset(todo, config, shards_uri, cluster_cpus, cluster_gpus, run=run, seen=seen)
        try:
            with tqdm(total=len(todo), desc="preprocess", unit="img", file=sys.stderr) as bar:
                # no prefetching: a block's statuses are counted as soon as it is written, not when the next one is
                for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                    statuses += block.to_pylist()
                    bar.update(block.num_rows)
                    count_items(statuses[len(statuses) - block.num_rows :])
        finally:  # also when stopped: only the files of counted blocks stay
            if index is not None:
                preprocess_dedup.stop_index(index)
            removed = sweep_shards(shards_uri, run, {s[SHARD] for s in statuses if s.get(SHARD)})
            if removed:
                print(
                    f"preprocess: removed {len(removed)} shard file(s) of blocks that ran again elsewhere "
                    f"(a worker or node was lost mid-block): {', '.join(removed[:3])}",
                    file=sys.stderr,
                    flush=True,
                )
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
    print(
        f"preprocess: {counts['input']} in, {counts['written']} written, {counts['rejected']} rejected "
        f"in {manifest['wall_time_s']:.1f} s → {args.output}"
    )
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("preprocess")
