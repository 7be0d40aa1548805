"""`facediffuser train` / `python -m pipelines.train`: fine-tune the TDM and/or the SDM on Ray Train.

Here: the driver (size the runs to the cluster, one TorchTrainer per model, progress, export) and the command line.
The rest:

  pipelines/train_config.py   the settings (`TrainConfig`: its fields give the flags, defaults and help; `validate`
                              checks them before any work), below every other module of the command
  pipelines/train_inputs.py   --data (finished preprocess outputs → shards, one Ray Data dataset for every epoch)
                              and --base (a hub id fetched once, before any work)
  pipelines/train_worker.py   one Ray Train worker: resume or start, DDP steps, checkpoints; the progress bars
  pipelines/train_export.py   final/<model>, the paired base model, final/export.json, metrics.csv + loss curve
  facediffuser/training/      the library underneath: batches (ingest, data), the step, checkpoints, metrics

Storage layout (STORAGE/NAME):
  sdm/, tdm/                  Ray Train run directories (checkpoints, Ray's state); rerun the same command
                              (same --storage and --name) to resume from the last checkpoint
  sdm/metrics.csv, loss_curve.png   per-step metrics of the finished run
  final/sdm, final/tdm        model directories: `facediffuser generate --model STORAGE/NAME/final`
                              With --model sdm (or tdm) the other one is the untrained base, written once
                              (final/export.json says which parts were trained).

`--model both` runs the two trainings side by side (one driver thread per TorchTrainer) on one cluster.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
from dataclasses import asdict, replace

from cluster.runtime import AWS_VARIABLES  # the one list of AWS variables shipped to Ray workers
from facediffuser import faults
from facediffuser.config import add_arguments as add_config_arguments
from facediffuser.config import from_args
from facediffuser.data import io as dataio
from facediffuser.devices import CPU_UNDER_GPU_ENV, cpu_under_gpu, ddp_backend
from facediffuser.model_dir import final_dir
from facediffuser.training.metrics import loss_line
from pipelines.train_config import TrainConfig, check_data, data_uris
from pipelines.train_export import export_final, pair_with_base, write_export_note
from pipelines.train_inputs import fetch_base, resolve_data

# ------------------------------------------------------------------------------------ driver


def plan_resources(
    configs: list[TrainConfig], cluster_cpus: float, cluster_gpus: float
) -> tuple[list[TrainConfig], str]:
    """Fill in the resources the user left open from the cluster Ray found; → (configs, one line saying what).

    One CPU stays unreserved: Ray Data lists the shard files in a task that needs a whole free CPU, and the
    ingest never starts without it. The rest is shared evenly by the runs: without GPUs one worker per run
    (several CPU workers on one machine only add DDP traffic), with GPUs one worker per GPU. Decoding happens in
    the workers (their collate function), so the read tasks get a small slice and the workers the rest."""
    share = (cluster_cpus - 1) / len(configs)
    planned = []
    for config in configs:
        workers = config.workers or (max(1, int(cluster_gpus // len(configs))) if config.use_gpu else 1)
        data_cpus = config.data_cpus or round(max(min(share / 8, 1.0), 0.05), 2)
        cpus_per_worker = config.cpus_per_worker or round(max((share - data_cpus) / workers, 0.05), 2)
        planned.append(replace(config, workers=workers, data_cpus=data_cpus, cpus_per_worker=cpus_per_worker))
    needed = sum(c.workers * c.cpus_per_worker + c.data_cpus for c in planned)
    if cluster_cpus - needed < 1 - 1e-9:
        raise ValueError(
            f"the cluster has {cluster_cpus:g} CPUs; training needs {needed:g} plus 1 free for Ray Data's "
            "file listing: lower --workers, --cpus-per-worker or --data-cpus, or leave them out"
        )
    p = planned[0]
    gpus = ", 1 GPU" if p.use_gpu else ""
    line = (
        f"resources per model: {p.workers} worker(s) × {p.cpus_per_worker:g} CPU{gpus}, Ray Data reads "
        f"{p.data_cpus:g} CPU (cluster: {cluster_cpus:g} CPUs, {cluster_gpus:g} GPUs; 1 CPU left free)"
    )
    return planned, line


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def train(configs: list[TrainConfig], verbose: bool = False) -> list[dict]:
    """Run the trainings (side by side when there are several). Each TorchTrainer is driven from a thread of this
    process (a launcher task per run would be one more process importing Ray Train). → one summary per model."""
    import ray
    import ray.util.scheduling_strategies

    from cluster.runtime import init_ray
    from pipelines.train_progress import ProgressBoard, show_progress

    init_ray(verbose=verbose)
    resources = ray.cluster_resources()
    configs, line = plan_resources(configs, resources.get("CPU", 0), resources.get("GPU", 0))
    if sum(node["Alive"] for node in ray.nodes()) == 1:
        # One node: a preemption takes the driver down with the run, so Ray Train's preemption watcher (one more
        # process per run, polling throughout) has nothing to report. Ray Train passes this on to its controllers.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    print(line, flush=True)
    if any(c.use_gpu for c in configs) and cpu_under_gpu():
        print(
            f"{CPU_UNDER_GPU_ENV}=1: GPU workers run CPU kernels where torch sees no GPU, DDP backend gloo "
            "(a rehearsal setting, never for production)",
            flush=True,
        )
    names = {n["NodeID"]: n.get("NodeName") or n["NodeManagerAddress"] for n in ray.nodes()}
    # on the driver's node: a worker node that dies (and the run restarts without it) must not take the board along
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False
    )
    board = ray.remote(num_cpus=0, scheduling_strategy=here)(ProgressBoard).remote()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(configs), thread_name_prefix="fit")
    try:
        futures = [pool.submit(fit_one, c, board) for c in configs]
        show_progress(board, configs, futures)
    finally:  # on Ctrl-C, do not wait here: shutting Ray down ends the fits
        pool.shutdown(wait=False)
    summaries, errors = [], []
    for config, future in zip(configs, futures):
        try:
            summary = future.result()
            summary["worker_node_names"] = [names.get(n, n) for n in summary["worker_nodes"].split(",") if n]
            summaries.append(summary)
        except Exception as exc:
            errors.append(f"{config.model}: {root_cause(exc)}")
    if errors:
        raise RuntimeError(
            "training failed (" + "; ".join(errors) + "); rerun the same command to resume from the last checkpoint"
        )
    return summaries


def worker_env() -> dict[str, str]:
    """The driver's variables the workers need: S3 access, the GPU rehearsal setting (facediffuser/devices.py), and
    the test-only fault points (facediffuser/faults.py: train.step)."""
    names = (*AWS_VARIABLES, CPU_UNDER_GPU_ENV)
    return {**{name: os.environ[name] for name in names if name in os.environ}, **faults.forwarded_env()}


def fit_one(config: TrainConfig, progress=None) -> dict:
    """Run (or resume) one TorchTrainer; export its final model dir and metrics. → summary dict."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train_inputs import build_dataset, ray_filesystem
    from pipelines.train_worker import train_loop_per_worker

    fs, storage_path = ray_filesystem(config.storage)
    env = worker_env()  # credentials travel in the runtime env only, never in the config
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**asdict(config), "progress": progress},
        # NCCL on GPUs; gloo on CPUs and under FACEDIFFUSER_CPU_UNDER_GPU=1 (NCCL cannot start without CUDA)
        torch_config=TorchConfig(backend=ddp_backend(config.use_gpu)),
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers, use_gpu=config.use_gpu, resources_per_worker={"CPU": config.cpus_per_worker}
        ),
        datasets={"train": build_dataset(config, check_data(config.data))},
        # one worker: nothing to split, and without a split the dataset runs inside the worker instead of in a
        # SplitCoordinator actor (one more process, polling for the whole run)
        dataset_config=ray.train.DataConfig(datasets_to_split=[] if config.workers == 1 else "all"),
        run_config=ray.train.RunConfig(
            name=config.model,
            storage_path=f"{storage_path.rstrip('/')}/{config.name}",
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            worker_runtime_env={"env_vars": env} if env else None,
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{config.model}: training finished without a checkpoint")
    summary = export_final(config, result.checkpoint)
    # where the workers ran and the DDP backend they used (rank 0 reports what every rank told it)
    summary.update(
        worker_nodes=(result.metrics or {}).get("worker_nodes", ""),
        ddp_backend=(result.metrics or {}).get("ddp_backend", ""),
    )
    return summary


def root_cause(exc: BaseException) -> str:
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):  # Ray wraps errors in tracebacks: keep the last "SomethingError: ..." line
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            return line[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def configs_from_args(args: argparse.Namespace) -> list[TrainConfig]:
    """The command line → one config per model (`--model both`: the TDM's, then the SDM's), with --data resolved
    to the shards of finished preprocess runs and a local --storage made absolute."""
    storage = args.storage if dataio.is_s3(args.storage) else dataio.resolve(args.storage)[1]
    data = resolve_data(args.data)
    models = ["tdm", "sdm"] if args.model == "both" else [args.model]
    return [from_args(TrainConfig, args, model=model, data=data, storage=storage) for model in models]


def run(args: argparse.Namespace) -> int:
    configs = configs_from_args(args)
    for config in configs:
        config.validate()
    configs = fetch_base(configs)
    first = configs[0]
    print(
        f"training {' and '.join(c.model for c in configs)} on {check_data(first.data)} rows from "
        f"{', '.join(data_uris(first.data))} → {first.run_root}"
    )
    from cluster.stopping import stoppable

    with stoppable():  # SIGTERM/SIGINT: the checkpoints written so far stay, a rerun resumes from the last one
        summaries = train(configs, verbose=args.verbose)
    paired = pair_with_base(first) if len(configs) == 1 else None
    write_export_note(configs, paired)
    for s in summaries:
        print(
            f"{s['model']}: {s['steps']} steps, {loss_line(s)}, "
            f"restarts {s['restarts']}; model {s['model_dir']}; metrics {s['metrics']}"
        )
        print(
            f"{s['model']}: {len(s['worker_node_names'])} worker(s) on node(s) {', '.join(s['worker_node_names'])}; "
            f"DDP backend {s['ddp_backend']}"
        )
    if paired:
        print(f"{paired}: untrained base, paired so that final/ is a complete Face-diffuser model")
    print(f"final model: {final_dir(first.run_root)}")
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("train")
