"""Starting (or joining) Ray for a `facediffuser` command, with a quiet console unless asked otherwise.

Quiet (the default): the terminal shows our own phase lines and progress bars. Ray's messages go to
`facediffuser-driver.log` in the Ray session's log folder (beside Ray's own worker logs), and the command
says where once: worker output is not forwarded (`log_to_driver=False`), Ray's Python loggers write to that
file instead of the terminal, Ray Data draws no progress bars, and the raylet's notices (such as "N PYTHON worker
processes have been started") are appended to the file. `--verbose` (`verbose=True`) leaves all of it on the
terminal, as plain Ray would.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune")
DRIVER_LOG = "facediffuser-driver.log"
_state: dict = {}

# Ray workers get these from the driver so that S3 (and an AWS_ENDPOINT_URL such as a local MinIO/moto) works the
# same in every stage and job, whatever environment the cluster was started with.
AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def init_ray(verbose: bool = False, **init_kwargs) -> Path | None:
    """ray.init unless Ray is already initialised (a test session's or the caller's), then route Ray's console
    output per `verbose`. → the log file Ray's messages go to (None when verbose)."""
    import ray

    # Under `uv run`, Ray would start every worker through `uv run` in a copy of the working directory (a fresh
    # virtualenv per worker). The environment running this command is already complete: use it as it is.
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if not ray.is_initialized():
        init_kwargs.setdefault("include_dashboard", False)
        init_kwargs.setdefault("log_to_driver", verbose)
        # quiet: only errors while Ray starts (the log file is set up once the session's folder exists)
        init_kwargs.setdefault("logging_level", logging.INFO if verbose else logging.ERROR)
        from cluster.stopping import after_ray_init, during_ray_init

        with during_ray_init():  # a SIGTERM/SIGINT while Ray starts takes the command's stop path
            ray.init(**init_kwargs)
        after_ray_init()  # ray.init put Ray's native SIGTERM handler (a stack dump) in place of ours: ours back
    return None if verbose else quiet_console()


def quiet_console() -> Path:
    """Send Ray's driver-side messages to the session's log folder instead of the terminal; → that file."""
    if "log" in _state:
        return _state["log"]
    log = _log_dir() / DRIVER_LOG
    try:  # first, because importing Ray Data installs its own console handler
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
    except Exception:  # Ray Data is optional for serve-only installs
        pass
    handler = logging.FileHandler(log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for existing in list(logger.handlers):
            if isinstance(existing, logging.StreamHandler) and not isinstance(existing, logging.FileHandler):
                logger.removeHandler(existing)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    _divert_raylet_notices(log)
    _state["log"] = log
    print(f"(Ray's own messages: {log}; --verbose shows them here)", file=sys.stderr, flush=True)
    return log


def _log_dir() -> Path:
    try:
        from ray._private.worker import _global_node  # the session this driver belongs to

        folder = Path(_global_node.get_logs_dir_path())
    except Exception:
        folder = Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _divert_raylet_notices(log: Path) -> None:
    """The driver prints the raylet's notices straight to stdout (no logger, no flag); append them to `log`.

    Ray looks the printer up by name on each message, so replacing it on the module reroutes them. If a Ray
    version moves it, nothing breaks: the notices simply stay on the terminal."""
    try:
        import ray._private.worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "_facediffuser", False):
        return

    def print_or_divert(data, *args, **kwargs):
        if data.get("pid") == "raylet":
            with open(log, "a", encoding="utf-8") as handle:
                handle.writelines(f"(raylet) {line}\n" for line in data.get("lines", []))
            return None
        return original(data, *args, **kwargs)

    print_or_divert._facediffuser = True
    ray_worker.print_to_stdstream = print_or_divert


def node_id() -> str:
    """The Ray node id (hex) of this process; "" outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:
        return ""


def where() -> str:
    """This process's place for error lines: `node <Ray node id> (host <hostname>)`."""
    import socket

    return f"node {node_id() or '(not in Ray)'} (host {socket.gethostname()})"


def assigned_gpus() -> float:
    """GPUs Ray assigned to this task/actor/replica (0 outside Ray)."""
    try:
        import ray

        if not ray.is_initialized():
            return 0.0
        return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except Exception:
        return 0.0
