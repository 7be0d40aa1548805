"""The processes of a local cluster (cluster/local.py), found and ended by process group: each node's
`ray start --block` is started in a session of its own, so its process group id is its pid and a signal to the
group reaches exactly that node's processes (a `ray stop` would end every Ray on the machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cluster_processes(pgids: set[int], temp_dir: str) -> list:
    """Every live process in one of `pgids`, or with `temp_dir` in its command line (this process excepted)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            mine = os.getpgid(proc.pid) in pgids or temp_dir in " ".join(proc.info["cmdline"] or ())
        except (ProcessLookupError, psutil.Error):
            continue
        if mine and proc.pid != os.getpid():
            found.append(proc)
    return found


def raylets_in_group(pgid: int) -> list:
    """The raylet processes of one node's process group."""
    import psutil

    raylets = []
    for proc in psutil.process_iter(["pid", "name"]):
        try:
            if proc.info["name"] == "raylet" and os.getpgid(proc.pid) == pgid:
                raylets.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return raylets


def stop_groups(nodes: list[subprocess.Popen], find: Callable[[], list], grace: float) -> list:
    """SIGTERM each node's process group (the last node first), give them `grace` seconds, SIGKILL what remains,
    kill what `find` still finds outside the groups and reap → the processes `find` finds afterwards."""
    import psutil

    for process in reversed(nodes):
        signal_group(process.pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and find():
        time.sleep(0.5)
    for process in nodes:
        signal_group(process.pid, signal.SIGKILL)
    for proc in find():  # a process of this cluster outside its groups (none seen so far)
        try:
            proc.kill()
        except psutil.Error:
            pass
    for process in nodes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    psutil.wait_procs(find(), timeout=10)
    return find()
