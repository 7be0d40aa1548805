"""One way every long-running command stops: SIGTERM and SIGINT take the same path.

    with stopping.stoppable("preprocess"):       # in a command's run(); installs the handlers
        ...                                       # the work; Ray started inside is shut down at the end

- Both signals are handled by this module, set explicitly: a background job (`facediffuser ... &` from a script)
  starts with SIGINT *ignored*, and Ctrl-C's clean-up would otherwise never run there.
- The first signal raises `Stopped` (a KeyboardInterrupt, so code written for Ctrl-C unwinds the same way) in the
  main thread; later ones are ignored, so they cannot interrupt the clean-up. Inside `deferred()` (e.g. a row being
  appended to a results file) the stop waits until the block ends.
- `facediffuser` prints the command's one line for it (`Stopped.line`) and exits with 128 + the signal number:
  130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by that signal.
- No native stack dump: `ray.init` (its core worker) installs a C++ failure signal handler for SIGTERM in the
  driver, replacing any Python handler set before it; that handler prints `*** SIGTERM received ... PC: @ ...` and
  dies. `init_ray` calls `after_ray_init()` to put ours back (a Python `signal.signal` after `ray.init` wins).
- No process left: `shutdown_ray()` shuts down a Ray this process started, waits for every process of its session
  (found by the session directory in their command lines or open files: gcs_server, raylet, the dashboard and
  runtime-env agents, workers) and kills those still there after a grace period, by PID. A Ray this process only
  joined (a cluster, a test session's) is disconnected from, never touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

RESUME_LINE = "stopped; rerun the same command to resume"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHUTDOWN_WAIT_S = 15.0  # after ray.shutdown(): how long the session's processes get to end before SIGKILL

_state: dict = {"installed": False, "line": RESUME_LINE, "signum": 0, "deferred": 0, "previous": {}}


class Stopped(KeyboardInterrupt):
    """A SIGTERM or SIGINT asked the command to stop. `line`: what the command prints; `exit_status`: 128 + signal."""

    def __init__(self, signum: int, line: str = RESUME_LINE):
        super().__init__(line)
        self.signum, self.line = signum, line
        self.exit_status = 128 + signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


def _on_signal(signum, frame) -> None:
    if _state["signum"]:  # already stopping: a second signal must not interrupt the clean-up
        return
    _state["signum"] = signum
    if _state["deferred"]:  # raised when the deferred block ends
        return
    _state["raised"] = True
    raise Stopped(signum, _state["line"])


def install(line: str = RESUME_LINE) -> bool:
    """Handle SIGTERM and SIGINT from now on (main thread only: → False elsewhere, nothing changed)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _state.update(line=line, signum=0)
    if hasattr(signal, "pthread_sigmask"):  # blocked, not ignored, is how Ray's job supervisor passes SIGINT on
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    for sig in SIGNALS:
        previous = signal.signal(sig, _on_signal)  # explicitly: SIGINT may have been ignored since the start
        if not _state["installed"]:
            _state["previous"][sig] = previous
    _state["installed"] = True
    return True


def after_ray_init() -> None:
    """Called right after `ray.init` (cluster/runtime.init_ray): Ray's core worker has just replaced the
    SIGTERM handler with its C++ failure handler (a native stack dump, then death); put ours back."""
    if _state["installed"] and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _on_signal)


@contextlib.contextmanager
def during_ray_init():
    """Around `ray.init`: it sets a SIGTERM handler of its own for its start (sys.exit(15): no line, no 143); while
    ours are installed, Ray's helper for that is made a no-op, so a stop during Ray's start takes our path too."""
    try:
        import ray._private.utils as ray_utils
    except ImportError:
        yield
        return
    original = getattr(ray_utils, "set_sigterm_handler", None)
    if original is None or not _state["installed"]:
        yield
        return
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = original
    after_ray_init()


def restore() -> None:
    """The handlers from before `install()` (tests run commands in-process)."""
    if not _state["installed"] or threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in _state["previous"].items():
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    _state.update(installed=False, previous={}, signum=0, deferred=0)


def requested() -> int:
    """The signal that asked for a stop (0: none)."""
    return _state["signum"]


@contextlib.contextmanager
def deferred():
    """A block a stop must not cut in two (a row and its line in a results file): a signal inside it takes
    effect when it ends."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
    if not _state["deferred"] and _state["signum"] and _state["installed"] and not _state.get("raised"):
        _state["raised"] = True
        raise Stopped(_state["signum"], _state["line"])


def _ray_initialized() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@contextlib.contextmanager
def stoppable(line: str = RESUME_LINE, shutdown_wait_s: float = SHUTDOWN_WAIT_S):
    """A command's run: SIGTERM/SIGINT → `Stopped` (see the module). At the end, however it ends, a Ray started
    inside is shut down with nothing of its session left (`shutdown_ray`); a Ray that was running before is left
    as it is. Any exception while stopping becomes the `Stopped` itself: the stop is what the user asked for."""
    own_ray = not _ray_initialized()
    installed = install(line)
    _state["raised"] = False
    try:
        yield
    except BaseException as exc:
        if _state["signum"] and not isinstance(exc, Stopped):  # a library turned the interrupt into its own error
            raise Stopped(_state["signum"], line) from exc
        raise
    finally:
        _state["deferred"] += 1  # nothing below is interrupted by a late signal
        try:
            if own_ray and "ray" in sys.modules:  # also a Ray whose start was cut short (ray.init interrupted)
                shutdown_ray(shutdown_wait_s)
        finally:
            _state["deferred"] = 0
            if installed:
                restore()


# ----------------------------------------------------------------------------------- Ray's processes


def session_dir() -> str | None:
    """The Ray session directory of this driver (None outside Ray)."""
    try:
        from ray._private.worker import _global_node

        return _global_node.get_session_dir_path() if _global_node is not None else None
    except Exception:
        return None


def session_processes(session: str, exclude: tuple[int, ...] = ()) -> list:
    """The live processes of a Ray session: its directory in their command line (gcs_server, raylet, the
    dashboard, log monitor) or a file open under it (the agents and workers rename themselves `ray::...`, but
    keep their logs open). → psutil.Process objects (not zombies, not this process)."""
    import psutil

    session = (session or "").rstrip("/")
    if not session.startswith("/") or session.count("/") < 2:  # never match everything (or a whole /tmp)
        raise ValueError(f"not a Ray session directory: {session!r}")
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid == os.getpid() or proc.pid in exclude:
            continue
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if session in " ".join(proc.info["cmdline"] or ()) or _has_open_file_under(proc.pid, session):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _has_open_file_under(pid: int, folder: str) -> bool:
    try:
        descriptors = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # gone, not ours to read, or no /proc (not Linux): the command line decides alone
        return False
    prefix = folder + "/"
    for fd in descriptors:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                return True
        except OSError:
            continue
    return False


def _children_cmdlines() -> list[str]:
    """The command lines of this process's direct children (the GCS and raylet of a Ray it started)."""
    import psutil

    try:
        children = psutil.Process().children(recursive=False)
    except psutil.Error:
        return []
    lines = []
    for child in children:
        try:
            lines.append(" ".join(child.cmdline()))
        except psutil.Error:
            continue
    return lines


def _session_of_children() -> str | None:
    """The session directory in the command line of one of this process's children (the GCS or raylet of a Ray it
    started, also one whose `ray.init` was interrupted before the driver knew its session)."""
    import re

    for line in _children_cmdlines():
        found = re.search(r"(/\S*?/session_\d{4}-\d{2}-\d{2}_[\d_-]+)", line)
        if found:
            return found.group(1)
    return None


def started_here(session: str) -> bool:
    """Whether this process started the session's Ray (its GCS or raylet is our child), rather than joined one."""
    return any(session in line for line in _children_cmdlines())


def shutdown_ray(wait_s: float = SHUTDOWN_WAIT_S) -> list[int]:
    """ray.shutdown(); when this process had started that Ray (also one whose start was interrupted), wait up to
    `wait_s` for every process of its session to end and SIGKILL (by PID) those still running. Without this, a
    raylet that goes down leaves its `ray::DashboardAgent` and `ray::RuntimeEnvAgent` behind. → the PIDs that had
    to be killed."""
    import psutil

    ray = sys.modules.get("ray")
    initialized = ray is not None and ray.is_initialized()
    session = (session_dir() if initialized else None) or _session_of_children()
    ours = bool(session) and started_here(session)
    before = session_processes(session) if ours else []
    if initialized:
        ray.shutdown()
    elif ours:  # a start cut short: nobody else ends these before the interpreter exits (and the autoscaler's
        for proc in before:  # monitor, still connecting to a GCS that is gone, may not end on SIGTERM at all)
            try:
                proc.terminate()
            except psutil.Error:
                pass
        wait_s = min(wait_s, 5.0)
    if not ours:
        return []
    deadline = time.monotonic() + wait_s
    left = before
    while time.monotonic() < deadline:
        left = [p for p in left if _alive(p)] + [p for p in session_processes(session) if p not in left]
        if not left:
            return []
        time.sleep(0.5)
    killed = []
    for proc in left:
        try:
            proc.kill()  # psutil checks the PID still belongs to the process found above
            killed.append(proc.pid)
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return killed


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
