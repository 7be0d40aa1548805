"""The torch device of a stage, replica or worker that Ray gave `num_gpus` GPUs.

Ray schedules on logical resources: a node that declares `--num-gpus 1` gets GPU work whether or not its torch
can see a GPU (a driver missing, CUDA_VISIBLE_DEVICES wrong, a CPU-only torch). Running that work on the CPU would
be about 100× slower and look like success, so by default it fails at once with one line naming the node.

FACEDIFFUSER_CPU_UNDER_GPU=1 is the one exception, for tests and rehearsals only: multi-node clusters on one
machine whose nodes declare logical GPUs (cluster/local.py) run CPU kernels under them, and the DDP backend
becomes gloo (NCCL cannot start without CUDA). Never set it in production: it hides exactly the failure above.
Drivers forward it to their Ray workers with the AWS variables; nodes started with it in their environment pass
it on as well.
"""

from __future__ import annotations

import os
import sys

CPU_UNDER_GPU_ENV = "FACEDIFFUSER_CPU_UNDER_GPU"
NO_GPU_MARK = "no CUDA device visible to torch"  # every such error line starts with this (the CLI finds it)
_noted: set[str] = set()


class GPUNotVisible(RuntimeError):
    """A stage, replica or worker was given a GPU that its torch cannot see (and the rehearsal setting is off)."""


def cpu_under_gpu() -> bool:
    """The rehearsal setting: CPU kernels under GPU resources (tests and rehearsals only)."""
    return os.environ.get(CPU_UNDER_GPU_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() > 0


def torch_device(num_gpus: float, where: str) -> str:
    """ "cuda" when torch sees a GPU and the caller was given one; "cpu" when it was given none. Given a GPU that
    torch cannot see: GPUNotVisible, one line naming `where` (the node id and host), unless
    FACEDIFFUSER_CPU_UNDER_GPU=1, which returns "cpu" with a one-time note on stderr."""
    if not num_gpus or num_gpus <= 0:
        return "cpu"
    if cuda_visible():
        return "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cpu_under_gpu():
        if where not in _noted:
            _noted.add(where)
            print(
                f"{CPU_UNDER_GPU_ENV}=1: {where} was given {num_gpus:g} GPU but torch sees none; running CPU "
                "kernels (a rehearsal setting, never for production)",
                file=sys.stderr,
                flush=True,
            )
        return "cpu"
    raise GPUNotVisible(
        f"{NO_GPU_MARK} on {where}, which was given {num_gpus:g} GPU (CUDA_VISIBLE_DEVICES={visible!r}, "
        f"torch {_torch_version()}): fix the node's driver/CUDA, or set {CPU_UNDER_GPU_ENV}=1 only for a rehearsal "
        "on logical GPUs"
    )


def ddp_backend(use_gpu: bool) -> str:
    """The torch.distributed backend of a training run: NCCL on GPUs, gloo on CPUs and under the rehearsal
    setting (NCCL cannot initialise without CUDA)."""
    return "nccl" if use_gpu and not cpu_under_gpu() else "gloo"


def device_error_line(exc: BaseException) -> str | None:
    """The GPUNotVisible line inside `exc` (Ray wraps a worker's error in its traceback text), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for line in str(exc).splitlines():
            at = line.find(NO_GPU_MARK)
            if at >= 0:
                return line[at:].strip()
        exc = exc.__cause__ or exc.__context__
    return None


def _torch_version() -> str:
    import torch

    return torch.__version__
