"""Every long-running command stops cleanly on SIGTERM, and on SIGINT when started in the background by a shell
(which starts it with SIGINT ignored): one line, exit 128 + the signal, no stack dump, what was complete is kept,
a rerun resumes, and no process of the command's Ray session is left (cluster/stopping.py).

Each command runs as a user runs it: the `facediffuser` console script in its own process group, with its own
local Ray (RAY_ADDRESS=local). Its Ray processes are found by that process group and by the session directory
(in their command lines or their open files: the agents and workers rename themselves `ray::...`, and the
workers get process groups of their own), and compared before and after the stop.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from cluster.stopping import RESUME_LINE, session_processes

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
DUMPS = (
    "*** SIGTERM received",
    "*** SIGINT received",
    "PC: @",
    "Traceback (most recent call last)",
    "Fatal Python error",
)


@dataclass
class Command:
    """One start of `facediffuser ARGS` in its own process group, directly or as a shell's background job."""

    args: list[str]
    folder: Path
    background: bool = False
    process: subprocess.Popen | None = None
    pid: int = 0
    before: set[int] = field(default_factory=set)

    def start(self) -> "Command":
        self.folder.mkdir(parents=True, exist_ok=True)
        self.before = set(psutil.pids())
        env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, never a cluster another test started
        command = [str(BIN / "facediffuser"), *self.args]
        if self.background:  # `cmd &` in a script: the shell starts it with SIGINT ignored
            script = f"{shlex.join(command)} >{self.out} 2>{self.err} & echo $!; wait $!"
            self.process = subprocess.Popen(
                ["bash", "-c", script], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True
            )
            self.pid = int(self.process.stdout.readline())
        else:
            with open(self.out, "w") as out, open(self.err, "w") as err:
                self.process = subprocess.Popen(
                    command, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True
                )
            self.pid = self.process.pid
        return self

    @property
    def out(self) -> Path:
        return self.folder / "stdout.txt"

    @property
    def err(self) -> Path:
        return self.folder / "stderr.txt"

    def text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.out, self.err) if p.is_file())

    def wait_for(self, ready, what: str, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while not ready():
            if self.process.poll() is not None:
                raise AssertionError(f"ended ({self.process.returncode}) before {what}:\n{self.text()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"no {what} after {timeout} s:\n{self.text()[-3000:]}")
            time.sleep(0.25)

    def session(self) -> str:
        found = re.search(r"\(Ray's own messages: (\S+)/logs/facediffuser-driver\.log", self.text())
        assert found, self.text()[-2000:]
        return found.group(1)

    def processes(self, session: str) -> list[psutil.Process]:
        """Its Ray's processes: in its process group, or of its session (workers are in groups of their own)."""
        group = self.process.pid
        found = {p.pid: p for p in session_processes(session)}
        for proc in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(proc.pid) == group:
                    found.setdefault(proc.pid, proc)
            except (ProcessLookupError, psutil.Error):
                continue
        return [p for p in found.values() if _alive(p)]

    def stop(self, sig: int, timeout: float = 120) -> int:
        """Send `sig` (0: none, just wait) and wait for the end; → the exit status."""
        if sig:
            os.kill(self.pid, sig)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {timeout} s after {sig!r}:\n{self.text()[-3000:]}")

    def kill(self) -> None:
        """Test clean-up: the process group (the command or its shell), by id."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=30)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _names(procs: list[psutil.Process]) -> set[str]:
    names = set()
    for proc in procs:
        try:
            names.add(" ".join(proc.cmdline())[:200])
        except psutil.Error:
            continue
    return names


def stop_and_check(command: Command, sig: int, line: str = RESUME_LINE, during=None) -> str:
    """Send `sig` to a working command; check the stop: one line, 128 + sig, no dump, no process of its Ray
    session left (compared with the process list while it worked). `during()` runs while it stops; `serve` ends
    with status 0 and `stopped` instead. → its output."""
    session = command.session()
    running = command.processes(session)
    names = " | ".join(_names(running))
    assert "raylet" in names and "gcs_server" in names, names  # the check below has something to find
    assert "DashboardAgent" in names or "RuntimeEnvAgent" in names, names
    if during is None:
        status = command.stop(sig)
    else:
        os.kill(command.pid, sig)
        during()
        status = command.stop(0) if command.process.poll() is None else command.process.returncode
    output = command.text()
    name = command.args[0]
    if name == "serve":
        assert status == 0, (status, output[-3000:])
        assert command.out.read_text().rstrip().splitlines()[-1] == "stopped", output[-3000:]
    else:
        assert status == 128 + sig, (status, output[-3000:])
        assert output.count(f"facediffuser {name}: {line}") == 1, output[-3000:]
        assert output.rstrip().splitlines()[-1].split("\r")[-1] == f"facediffuser {name}: {line}", output[-3000:]
    for dump in DUMPS:
        assert dump not in output, output[-3000:]
    time.sleep(1)  # the command has returned: Ray's processes were waited for; give zombies a moment to go
    left = [p for p in command.processes(session) if p.pid != command.pid]
    new = [p for p in left if p.pid not in command.before]
    assert not left and not new, f"left after {signal.Signals(sig).name}: {_names(left)}"
    return output


@pytest.fixture
def cleanup():
    started: list[Command] = []
    yield started.append
    for command in started:
        command.kill()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """36 photos of one to three people (the sample photos three times)."""
    from facediffuser.sample_photos import sample_photos

    folder = tmp_path_factory.mktemp("photos")
    for copy in range(3):
        for photo in sample_photos(folder / f"set{copy}"):
            shutil.move(photo, folder / f"{copy}-{photo.name}")
        shutil.rmtree(folder / f"set{copy}")
    return folder


@pytest.fixture(scope="module")
def preprocessed(photos, tmp_path_factory) -> dict:
    """preprocess stopped by SIGTERM; the same command in the background stopped by SIGINT; then run to the end.
    → what each start left (checked in test_preprocess_...; the finished output feeds the train test)."""
    root = tmp_path_factory.mktemp("preprocess")
    data = root / "data"
    args = [
        "preprocess",
        "--input",
        str(photos),
        "--output",
        str(data),
        "--workers-per-stage",
        "1",
        "--rows-per-shard",
        "2",
    ]
    shards = data / "shards"
    result: dict = {"data": data}
    commands = []
    try:
        first = Command(args, root / "first").start()
        commands.append(first)
        first.wait_for(lambda: shards.is_dir() and any(shards.glob("*.parquet")), "a written shard")
        result["first"] = stop_and_check(first, signal.SIGTERM)
        result["kept"] = sorted(shards.glob("*.parquet"))
        result["manifest_after_stop"] = (data / "manifest.json").exists()

        second = Command(args, root / "second", background=True).start()
        commands.append(second)
        second.wait_for(
            lambda: "already done there" in second.text() and "(Ray's own messages" in second.text(), "the resume line"
        )
        result["second"] = stop_and_check(second, signal.SIGINT)

        third = subprocess.run(
            [str(BIN / "facediffuser"), *args],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "RAY_ADDRESS": "local"},
            cwd=ROOT,
        )
        result["third"] = (third.returncode, third.stdout + third.stderr)
    finally:
        for command in commands:
            command.kill()
    return result


def test_preprocess_stops_keeping_its_shards_and_resumes(preprocessed):
    import pyarrow.parquet as pq

    assert preprocessed["kept"], "the stopped run kept no shard"
    kept_rows = sum(pq.read_table(p).num_rows for p in preprocessed["kept"])
    assert not preprocessed["manifest_after_stop"]  # train refuses an unfinished output
    assert "already done there" in preprocessed["second"]  # the rerun went on from the first one's shards
    status, output = preprocessed["third"]
    assert status == 0, output[-3000:]
    manifest = json.loads((preprocessed["data"] / "manifest.json").read_text())
    assert manifest["counts"]["input"] == 36
    assert manifest["counts"]["written"] + manifest["counts"]["rejected"] == 36
    assert manifest["resumed"] >= kept_rows  # what the stopped runs finished was not done again


def test_train_stops_keeping_its_checkpoint_and_resumes(preprocessed, tmp_path, cleanup):
    assert preprocessed["third"][0] == 0
    runs = tmp_path / "runs"
    args = [
        "train",
        "--model",
        "tdm",
        "--tiny",
        "--data",
        str(preprocessed["data"]),
        "--storage",
        str(runs),
        "--name",
        "stop",
        "--max-steps",
        "10000",
        "--checkpoint-every",
        "1",
        "--batch-size",
        "1",
        "--resolution",
        "64",
        "--max-failures",
        "0",
    ]
    checkpoints = runs / "stop" / "tdm"

    def saved() -> list[Path]:
        """The checkpoints Ray Train has committed (a rerun resumes from the latest of them)."""
        try:
            snapshot = json.loads((checkpoints / "checkpoint_manager_snapshot.json").read_text())
        except (OSError, ValueError):
            return []
        return [checkpoints / r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]

    first = Command(args, tmp_path / "first").start()
    cleanup(first)
    first.wait_for(lambda: bool(saved()), "a checkpoint", timeout=600)
    stop_and_check(first, signal.SIGTERM)
    kept = saved()
    assert kept and (kept[-1] / "training_state.safetensors").is_file()

    second = Command(args, tmp_path / "second", background=True).start()
    cleanup(second)
    second.wait_for(lambda: "resuming from the checkpoint at step" in second.text(), "the resume line", timeout=600)
    output = stop_and_check(second, signal.SIGINT)
    step = int(re.search(r"resuming from the checkpoint at step (\d+)", output).group(1))
    assert step >= int(kept[-1].name.split("_")[-1])


def test_evaluate_stops_keeping_its_finished_rows(tmp_path, astronaut, hopper, cleanup):
    from PIL import Image

    subjects = tmp_path / "subjects"
    for name, image in [("astro", astronaut), ("hopper", hopper)]:
        (subjects / name).mkdir(parents=True)
        Image.fromarray(image).save(subjects / name / "ref.jpg")
        (subjects / name / "noun.txt").write_text("woman")
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--tiny",
        "--subjects",
        str(subjects),
        "--out",
        str(out),
        "--quick",
        "--steps",
        "4",
        "--resolution",
        "64",
        "--images-per-prompt",
        "2",
    ]
    results = out / "results.jsonl"
    command = Command(args, tmp_path / "run", background=True).start()
    cleanup(command)
    command.wait_for(lambda: results.is_file() and results.read_text().count("\n") >= 1, "a finished row")
    stop_and_check(command, signal.SIGINT)
    rows = [json.loads(line) for line in results.read_text().splitlines()]  # every line whole
    assert rows and all((out / row["file"]).is_file() for row in rows)
    assert not (out / "report.json").exists()


def test_demo_stops_and_says_it_starts_over(tmp_path, cleanup):
    from pipelines.demo import STOPPED_LINE

    command = Command(["demo", "--out", str(tmp_path / "demo"), "--steps", "2"], tmp_path / "run").start()
    cleanup(command)
    command.wait_for(
        lambda: "[demo 2/5]" in command.text() and "(Ray's own messages" in command.text(), "preprocessing"
    )
    stop_and_check(command, signal.SIGTERM, STOPPED_LINE)


# ------------------------------------------------------------------------------------------------ serve


GENERATE = {
    "prompt": "a woman <|image|> on the moon",
    "steps": 100,
    "width": 128,
    "height": 128,
    "identity_scores": False,
}


@pytest.mark.parametrize(
    "sig, background", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "SIGINT-background"]
)
def test_serve_drains_then_stops(tmp_path, cleanup, sig, background):
    """On the signal: /healthz and new requests get 503 `draining` with Retry-After at once, the request in flight
    still gets its 200, then Serve and Ray go down, exit 0, nothing of the session left."""
    import base64
    import concurrent.futures
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = Command(
        ["serve", "--tiny", "--port", str(port), "--drain-timeout-s", "300"], tmp_path / "run", background=background
    ).start()
    cleanup(command)
    command.wait_for(lambda: "serving on" in command.text(), "serving", timeout=400)
    url = f"http://127.0.0.1:{port}"
    photo = base64.b64encode((ROOT / "facediffuser/assets/astronaut.jpg").read_bytes()).decode()
    body = {**GENERATE, "references": [photo]}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    in_flight = pool.submit(httpx.post, f"{url}/v1/generate", json=body, timeout=600)
    deadline = time.time() + 120
    while httpx.get(f"{url}/v1/replicas", timeout=30).json().get("ongoing_requests", 0) < 1:
        assert not in_flight.done() and time.time() < deadline, "the request never got in flight"
        time.sleep(0.1)
    seen = {}

    def during():
        deadline = time.time() + 60
        while time.time() < deadline:
            health = httpx.get(f"{url}/healthz", timeout=30)
            if health.status_code == 503 and health.json()["error"] == "draining":
                seen["healthz"] = health
                break
            time.sleep(0.1)
        seen["new"] = httpx.post(f"{url}/v1/generate", json=body, timeout=60)
        assert not in_flight.done(), "the in-flight request ended before the drain was seen"
        seen["in_flight"] = in_flight.result(timeout=600)

    try:
        stop_and_check(command, sig, during=during)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    assert "healthz" in seen, "/healthz never said draining"
    assert seen["healthz"].headers["retry-after"]
    new = seen["new"]
    assert new.status_code == 503 and new.json()["error"] == "draining" and new.headers["retry-after"], new.text
    assert seen["in_flight"].status_code == 200, seen["in_flight"].text[:500]
    assert len(seen["in_flight"].json()["images"]) == 1
    assert "stopping: new requests get 503" in command.out.read_text()


def test_a_stop_while_ray_starts_takes_the_same_path(photos, tmp_path, cleanup):
    """SIGTERM while `ray.init` is still starting Ray: Ray's own start-up handler would exit 15 without a word, and
    its raylet's agents (ray::DashboardAgent, ray::RuntimeEnvAgent) would stay behind."""
    command = Command(["preprocess", "--input", str(photos), "--output", str(tmp_path / "data")], tmp_path / "run")
    command.start()
    cleanup(command)
    session = None

    def starting() -> bool:
        nonlocal session
        for proc in command.processes("/nonexistent/session_0"):
            try:
                found = re.search(r"(/\S*?/session_\d{4}-\d{2}-\d{2}_[\d_-]+)", " ".join(proc.cmdline()))
                names = proc.name()
            except psutil.Error:
                continue
            if found and names == "raylet":
                session = found.group(1)
        return session is not None and "Ray's own messages" not in command.text()

    command.wait_for(starting, "a raylet starting", timeout=120)
    status = command.stop(signal.SIGTERM)
    output = command.text()
    assert status == 143 and output.rstrip().splitlines()[-1] == f"facediffuser preprocess: {RESUME_LINE}", output
    for dump in DUMPS:
        assert dump not in output, output
    time.sleep(1)
    left = command.processes(session)
    assert not left, _names(left)
