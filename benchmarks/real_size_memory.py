"""benchmarks/real_size.py's memory measurements: the process tree's RSS, its peak, and the guard that stops a phase
at the memory limit (exit status MEMORY_EXIT)."""

from __future__ import annotations

import os
import sys
import threading
import time

GIB = 2**30
MEMORY_EXIT = 75  # a phase's exit status when it stopped itself at the memory limit


def tree_rss(process) -> int:
    """RSS of a process and all its descendants, bytes (shared pages count once per process)."""
    import psutil

    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class MemoryGuard:
    """Samples this process tree's RSS every 0.1 s (keeps the peak); over `limit_gb`, or when the machine has under
    0.5 GiB available, it kills the tree's children (processes this phase started) and exits with MEMORY_EXIT."""

    def __init__(self, limit_gb: float):
        import psutil

        self.limit, self.peak, self.process = limit_gb * GIB, 0, psutil.Process()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        import psutil

        while True:
            rss = tree_rss(self.process)
            self.peak = max(self.peak, rss)
            available = psutil.virtual_memory().available
            if rss > self.limit or available < GIB // 2:
                print(
                    f"memory guard: tree RSS {rss / GIB:.1f} GiB (limit {self.limit / GIB:.1f}), machine has "
                    f"{available / GIB:.1f} GiB available: stopping this phase",
                    file=sys.stderr,
                    flush=True,
                )
                for child in self.process.children(recursive=True):
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass
                os._exit(MEMORY_EXIT)
            time.sleep(0.1)


def max_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def nbytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)
