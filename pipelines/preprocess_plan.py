"""The preprocessing job's layout: which stages share a Ray Data pool (CPU task pools, GPU actor pools), each pool's
size and resources, and the rows per block (= per shard file). No Ray here; `pipelines/preprocess.py` runs it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from facediffuser.data import stages
from facediffuser.data.captions import TEMPLATE
from facediffuser.data.preprocess_config import PreprocessConfig

GPU_ACTOR_CPUS = 0.25  # a GPU-stage actor mostly waits on its GPU; the rest of the CPUs go to the CPU stages
TASKS_IN_FLIGHT = 2  # per GPU actor: one running batch and one queued (hides the call's round trip)
BLOCKS_PER_WORKER = 4  # at least, when there are enough rows: a worker that starts late still gets a fair share


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
    return config.num_gpus_per_stage > 0 and (
        (name == "detect" and config.detector == "mtcnn") or (name == "caption" and config.captioner != TEMPLATE)
    )


def plan_stages(config: PreprocessConfig, cluster_cpus: float, cluster_gpus: float = 0.0) -> list[StagePlan]:
    """The stage layout: consecutive stages on the same device share one pool (fused, models loaded once per
    worker). Template captions, noun linking and the near-duplicate check are cheap and ride with the stage before
    them.

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
            rides_along = name in ("link", "dedup") or (name == "caption" and not gpu)  # cheap: no pool of their own
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
    return [
        StagePlan(tuple(names), gpu_actors, GPU_ACTOR_CPUS, config.num_gpus_per_stage)
        if gpu
        else StagePlan(tuple(names), cpu_tasks, cpu_share)
        for names, gpu in groups
    ]


def block_rows(count: int, plans: list[StagePlan], rows_per_shard: int) -> int:
    """Rows per block, and so per shard file: at most `rows_per_shard`, and small enough that every worker of the
    widest pool gets BLOCKS_PER_WORKER blocks when there are enough rows (shards are then written from the first
    minutes on, and the last block is a small part of the run)."""
    workers = max(plan.workers for plan in plans)
    return max(1, min(rows_per_shard, math.ceil(count / (BLOCKS_PER_WORKER * workers))))
