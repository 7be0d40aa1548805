"""cluster/stopping.py without Ray: SIGTERM and SIGINT take one path (also when SIGINT was ignored at start),
a second signal does not interrupt the clean-up, `deferred` blocks are not cut in two, and the CLI turns a stop
into its one line and 128 + the signal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cluster import stopping


@pytest.fixture(autouse=True)
def handlers_restored():
    saved = {sig: signal.getsignal(sig) for sig in stopping.SIGNALS}
    yield
    stopping.restore()
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_either_signal_raises_stopped_with_its_exit_status(sig):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job started by a script
    with pytest.raises(stopping.Stopped) as caught:
        with stopping.stoppable():
            os.kill(os.getpid(), sig)
            time.sleep(5)  # interrupted
    assert caught.value.exit_status == 128 + sig and caught.value.line == stopping.RESUME_LINE
    assert isinstance(caught.value, KeyboardInterrupt)  # code written for Ctrl-C unwinds the same way
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the handlers from before are back


def test_a_second_signal_does_not_interrupt_the_clean_up():
    cleaned = []
    with pytest.raises(stopping.Stopped):
        with stopping.stoppable():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            finally:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
                cleaned.append(True)
    assert cleaned == [True]


def test_deferred_block_finishes_before_the_stop():
    done = []
    with pytest.raises(stopping.Stopped):
        with stopping.stoppable():
            with stopping.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.2)
                done.append("row and its line")
            done.append("never")
    assert done == ["row and its line"]


def test_an_error_raised_while_stopping_is_the_stop():
    """A library that turns the interrupt into its own error does not turn the stop into a traceback."""
    with pytest.raises(stopping.Stopped) as caught:
        with stopping.stoppable():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                raise RuntimeError("a library's own error")
    assert caught.value.exit_status == 143


def test_session_processes_refuses_a_path_that_would_match_everything():
    for bad in ("", "/", "/tmp", "relative/session"):
        with pytest.raises(ValueError):
            stopping.session_processes(bad)


def test_a_background_job_starts_with_sigint_ignored():
    """The premise of the background tests: `cmd &` in a script ignores SIGINT in cmd (so Ctrl-C's clean-up
    never ran for `facediffuser serve ... &`)."""
    shell = subprocess.Popen(
        ["bash", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        child = int(shell.stdout.readline())
        deadline = time.time() + 10
        while open(f"/proc/{child}/comm").read().strip() != "sleep" and time.time() < deadline:
            time.sleep(0.05)  # the shell sets SIGINT to ignored in its child, then runs the command
        ignored = next(line for line in open(f"/proc/{child}/status") if line.startswith("SigIgn:"))
        assert int(ignored.split()[1], 16) & (1 << (signal.SIGINT - 1))
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait(timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_cli_prints_one_line_and_exits_128_plus_the_signal(tmp_path, sig):
    """Through facediffuser.cli.main, started in the background by a shell (SIGINT ignored at start)."""
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent("""
        import sys, time
        from facediffuser import cli
        from cluster import stopping

        def run(args):
            with stopping.stoppable():
                print("working", flush=True)
                time.sleep(60)
            return 0

        cli.build_parser = lambda selected=None: Parser()
        class Parser:
            def parse_args(self, argv):
                import argparse
                return argparse.Namespace(command="job", _run=run)
        sys.exit(cli.main(["job"]))
    """)
    )
    log = tmp_path / "out.txt"
    shell = subprocess.Popen(
        ["bash", "-c", f"{sys.executable} {script} >{log} 2>&1 & echo $!; wait $!"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        pid = int(shell.stdout.readline())
        deadline = time.time() + 60
        while not (log.is_file() and "working" in log.read_text()) and time.time() < deadline:
            time.sleep(0.1)
        os.kill(pid, sig)
        assert shell.wait(timeout=30) == 128 + sig
    finally:
        if shell.poll() is None:
            os.killpg(shell.pid, signal.SIGKILL)
            shell.wait(timeout=10)
    output = log.read_text().strip().splitlines()
    assert output == ["working", f"facediffuser job: {stopping.RESUME_LINE}"], output
