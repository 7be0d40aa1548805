"""`facediffuser train` / `python -m pipelines.train`: fine-tune the TDM and/or the SDM on Ray Train.

Here: the settings (`TrainConfig`: its fields give the flags, defaults and help; `validate` checks them before any
work) and the driver (size the runs to the cluster, one TorchTrainer per model, progress, export). The rest:

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
from dataclasses import asdict, dataclass, replace

import pyarrow.fs as pafs

from facediffuser.config import add_arguments as add_config_arguments, arg, from_args
from facediffuser.data import io as dataio
from facediffuser.devices import CPU_UNDER_GPU_ENV, cpu_under_gpu, ddp_backend
from facediffuser.model_dir import MODELS, final_dir
from cluster.runtime import AWS_VARIABLES  # the one list of AWS variables shipped to Ray workers
from pipelines.train_export import export_final, pair_with_base, write_export_note
from pipelines.train_inputs import check_base, check_data, data_uris, fetch_base, is_hub_id, resolve_data

PRECISIONS = ("bf16", "fp16", "no")
AUTO = " (default: derived from the cluster's CPUs and GPUs; the command prints what it chose)"


@dataclass
class TrainConfig:
    model: str = arg(help="which model(s) to train; 'both' runs the two side by side",
                     choices=(*MODELS, "both"))  # one config per model: the command line's "both" becomes two
    data: str | list[str] = arg(help="preprocess output directories (or s3:// prefixes), or their shards/ "
                                     "directories", nargs="+")
    storage: str = arg(help="where runs live: a directory or s3:// prefix")
    name: str = arg(help="run name; rerunning with the same name resumes")
    base: str | None = arg(None, "base model: SD layout directory (+subject_encoder/ for the SDM) or hub id",
                           group="source")
    tiny: bool = arg(False, "start from the small random test models", group="source")
    variant: str | None = arg(None, "weight variant of --base, e.g. fp16 for a hub directory's *.fp16.safetensors "
                                    "files (read into fp32 master weights)")
    image_encoder: str | None = arg(None, "CLIP vision directory for a new subject encoder when --base has no "
                                          "subject_encoder/")
    workers: int | None = arg(None, "Ray Train workers per model" + AUTO)
    use_gpu: bool = arg(False, "one GPU per worker")
    cpus_per_worker: float | None = arg(None, "CPUs reserved per worker" + AUTO)
    data_cpus: float | None = arg(None, "CPUs per Ray Data read task" + AUTO)
    max_steps: int = arg(1000, "optimizer steps in all; a rerun with more continues the run")
    batch_size: int = arg(4, "per worker")
    lr: float = arg(1e-5, "learning rate, constant; a resumed run takes the new value")
    checkpoint_every: int = arg(500, "steps between checkpoints")
    keep_checkpoints: int = arg(2, "checkpoints kept in the run directory")
    max_failures: int = arg(3, "worker failures survived, each resuming from the last checkpoint")
    mixed_precision: str = arg("bf16", "GPU only", choices=PRECISIONS)
    gradient_checkpointing: bool = arg(False, "recompute the UNet's blocks in the backward pass: slower steps, far "
                                              "less activation memory (docs/sizing.md)")
    resolution: int | None = arg(None, "training image side (default: the model's, 512 for SD1.5 and 128 for --tiny)")
    seed: int = arg(0, "seed of the model's noise, the data order and the augmentation")

    @property
    def run_root(self) -> str:
        return dataio.join(self.storage, self.name)

    def validate(self) -> None:
        """Every setting against its rule, then what they name: --storage can hold the run, --base holds the model's
        parts (a hub id is checked once it is fetched: `fetch_base`), and the shards of --data are readable and
        hold at least one batch per worker (`check_data` reads them). One-line errors naming the flag."""
        self._check_values()
        check_storage(self.storage)
        if not self.tiny and not is_hub_id(self.base):
            check_base(self.base, self.model, self.variant)
        rows = check_data(self.data)
        if rows < self.batch_size * (self.workers or 1):
            raise ValueError(f"--data has {rows} rows, fewer than one batch for every worker "
                             f"({self.workers or 1} × {self.batch_size}); lower --batch-size")

    def _check_values(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"--model must be sdm or tdm in one config (the command line's 'both' makes one per "
                             f"model), got {self.model!r}")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name):
            raise ValueError(f"--name {self.name!r}: use letters, digits, '.', '_' or '-'")
        if self.variant and self.tiny:
            raise ValueError("--variant names the weight files of --base; --tiny has none")
        if self.variant is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", self.variant):
            raise ValueError(f"--variant {self.variant!r}: a weight-file variant is a word like fp16")
        if self.tiny == bool(self.base):
            raise ValueError("--base and --tiny exclude each other" if self.tiny else
                             "give --base MODEL_DIR (or --tiny for the small random test models)")
        for name in ("workers", "max_steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("cpus_per_worker", "data_cpus"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_failures < 0:
            raise ValueError("--max-failures must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"--mixed-precision must be bf16, fp16 or no, got {self.mixed_precision!r}")
        if self.resolution is not None and (self.resolution < 64 or self.resolution % 64):
            raise ValueError(f"--resolution must be a multiple of 64, got {self.resolution}")


def check_storage(storage: str) -> None:
    """--storage is a directory (or will be), or an s3:// prefix in a bucket that exists."""
    fs, path = dataio.resolve(storage)
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise ValueError(f"--storage {storage}: is a file, expected a directory or s3:// prefix")
        if dataio.is_s3(storage) and fs.get_file_info(path.split("/", 1)[0]).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--storage {storage}: S3 bucket does not exist")
    except OSError as exc:
        raise FileNotFoundError(f"--storage {storage}: cannot be reached ({str(exc).splitlines()[0]})") from None


# ------------------------------------------------------------------------------------ driver


def plan_resources(configs: list[TrainConfig], cluster_cpus: float, cluster_gpus: float) -> tuple[list[TrainConfig], str]:
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
        raise ValueError(f"the cluster has {cluster_cpus:g} CPUs; training needs {needed:g} plus 1 free for Ray Data's "
                         "file listing: lower --workers, --cpus-per-worker or --data-cpus, or leave them out")
    p = planned[0]
    gpus = ", 1 GPU" if p.use_gpu else ""
    line = (f"resources per model: {p.workers} worker(s) × {p.cpus_per_worker:g} CPU{gpus}, Ray Data reads "
            f"{p.data_cpus:g} CPU (cluster: {cluster_cpus:g} CPUs, {cluster_gpus:g} GPUs; 1 CPU left free)")
    return planned, line


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def train(configs: list[TrainConfig], verbose: bool = False) -> list[dict]:
    """Run the trainings (side by side when there are several). Each TorchTrainer is driven from a thread of this
    process (a launcher task per run would be one more process importing Ray Train). → one summary per model."""
    import ray
    import ray.util.scheduling_strategies

    from cluster.runtime import init_ray
    from pipelines.train_worker import ProgressBoard, show_progress

    init_ray(verbose=verbose)
    resources = ray.cluster_resources()
    configs, line = plan_resources(configs, resources.get("CPU", 0), resources.get("GPU", 0))
    if sum(node["Alive"] for node in ray.nodes()) == 1:
        # One node: a preemption takes the driver down with the run, so Ray Train's preemption watcher (one more
        # process per run, polling throughout) has nothing to report. Ray Train passes this on to its controllers.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    print(line, flush=True)
    if any(c.use_gpu for c in configs) and cpu_under_gpu():
        print(f"{CPU_UNDER_GPU_ENV}=1: GPU workers run CPU kernels where torch sees no GPU, DDP backend gloo "
              "(a rehearsal setting, never for production)", flush=True)
    names = {n["NodeID"]: n.get("NodeName") or n["NodeManagerAddress"] for n in ray.nodes()}
    # on the driver's node: a worker node that dies (and the run restarts without it) must not take the board along
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                          soft=False)
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
        raise RuntimeError("training failed (" + "; ".join(errors) + "); rerun the same command to resume "
                           "from the last checkpoint")
    return summaries


def worker_env() -> dict[str, str]:
    """The driver's variables the workers need: S3 access, and the test-only fault injection (train_worker.Fault)."""
    from pipelines.train_worker import FAULT_ENV

    names = (*AWS_VARIABLES, *FAULT_ENV, CPU_UNDER_GPU_ENV)  # and the GPU rehearsal setting (facediffuser/devices.py)
    return {name: os.environ[name] for name in names if name in os.environ}


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
        scaling_config=ray.train.ScalingConfig(num_workers=config.workers, use_gpu=config.use_gpu,
                                               resources_per_worker={"CPU": config.cpus_per_worker}),
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
    summary.update(worker_nodes=(result.metrics or {}).get("worker_nodes", ""),
                   ddp_backend=(result.metrics or {}).get("ddp_backend", ""))
    return summary


def root_cause(exc: BaseException) -> str:
    text = str(exc)
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    for line in reversed(lines):  # Ray wraps errors in tracebacks: keep the last "SomethingError: ..." line
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            return line[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


# ------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)
    parser.add_argument("--verbose", action="store_true", help="show Ray's own log lines on the terminal")


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
    print(f"training {' and '.join(c.model for c in configs)} on {check_data(first.data)} rows from "
          f"{', '.join(data_uris(first.data))} → {first.run_root}")
    from cluster.stopping import stoppable

    with stoppable():  # SIGTERM/SIGINT: the checkpoints written so far stay, a rerun resumes from the last one
        summaries = train(configs, verbose=args.verbose)
    paired = pair_with_base(first) if len(configs) == 1 else None
    write_export_note(configs, paired)
    for s in summaries:
        print(f"{s['model']}: {s['steps']} steps, loss_den {s['loss_den']:.4f}, loss_loc {s['loss_loc']:.4f}, "
              f"restarts {s['restarts']}; model {s['model_dir']}; metrics {s['metrics']}")
        print(f"{s['model']}: {len(s['worker_node_names'])} worker(s) on node(s) {', '.join(s['worker_node_names'])}; "
              f"DDP backend {s['ddp_backend']}")
    if paired:
        print(f"{paired}: untrained base, paired so that final/ is a complete Face-diffuser model")
    print(f"final model: {final_dir(first.run_root)}")
    return 0


if __name__ == "__main__":
    from facediffuser.cli import module_main

    module_main("train")
