"""The README, executed: its ```bash and ```python blocks run in order, as written, in a copy of the repository on
this 2-CPU machine with the tiny models (sample photos → preprocess → train → resume → generate → serve + curl →
evaluate → the library snippet). A block preceded by `<!-- not run by tests: REASON -->` is skipped: it needs real
weights, a cluster, Kubernetes or a GPU (or it is the install and CI themselves). A README edit that breaks a
command breaks this test."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP = re.compile(r"<!--\s*not run by tests:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
RUNNABLE = {"bash": "bash", "python": "python"}


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip_reason: str | None


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block with its language and, when the line before it is a skip marker, the reason."""
    lines = text.splitlines()
    blocks, reason, i = [], None, 0
    while i < len(lines):
        marker, fence = SKIP.search(lines[i]), FENCE.match(lines[i])
        if marker:
            reason = marker.group(1)
        elif fence:
            indent, language = fence.groups()
            start, body = i, []
            i += 1
            while not lines[i].strip().startswith("```"):
                body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
                i += 1
            blocks.append(Block(start + 1, language, "\n".join(body) + "\n", reason))
            reason = None
        elif lines[i].strip():
            reason = None  # a marker applies only to the block right after it
        i += 1
    return blocks


def readme_script(blocks: list[Block]) -> str:
    """One bash script: each block that runs here, announced by its README line (python blocks via a heredoc)."""
    parts = ["set -euo pipefail"]
    for block in blocks:
        if block.skip_reason is not None or block.language not in RUNNABLE:
            continue
        parts.append(f"echo '### README.md line {block.line}' >&2")
        if block.language == "bash":
            parts.append(block.code)
        else:
            parts.append(f"python - <<'README_PYTHON'\n{block.code}README_PYTHON")
    return "\n".join(parts) + "\n"


def test_every_readme_block_either_runs_here_or_says_why_not():
    blocks = readme_blocks((ROOT / "README.md").read_text())
    for block in blocks:
        assert block.skip_reason != "", f"README.md line {block.line}: a skip marker without a reason"
        assert block.language in {*RUNNABLE, "text", "yaml", "json", ""}, (
            f"README.md line {block.line}: ```{block.language} is neither run nor a display language"
        )
    script = readme_script(blocks)
    # the walkthrough covers every stage; marking them all as skipped would not pass unnoticed
    for stage in (
        "facediffuser sample-photos",
        "facediffuser preprocess",
        "facediffuser train",
        "facediffuser generate",
        "facediffuser serve",
        "curl",
        "facediffuser evaluate",
        "FaceDiffuserPipeline",
    ):
        assert stage in script, f"no README block that runs here contains {stage!r}"
    assert sum(b.skip_reason is None and b.language in RUNNABLE for b in blocks) >= 6


def _repository_copy(target: Path) -> None:
    """The working tree's files as a fresh clone would have them (tracked and new, not ignored ones)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    with socket.socket() as sock:  # the README serves on 8000; say so rather than fail in the middle
        if sock.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.fail("port 8000 is taken: the README's serve command needs it")
    work = tmp_path / "repo"
    _repository_copy(work)
    script = readme_script(readme_blocks((work / "README.md").read_text()))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the project's environment, active
    log = tmp_path / "readme.log"
    with log.open("w") as out:
        done = subprocess.run(
            ["bash", "-c", script], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=1800
        )
    output = log.read_text()
    assert done.returncode == 0, f"a README block failed (exit {done.returncode}):\n{output[-6000:]}"

    assert len(list((work / "photos").glob("*.jpg"))) == 12
    assert (work / "data" / "manifest.json").is_file() and list((work / "data" / "shards").glob("*.parquet"))
    assert "resuming from the checkpoint at step 20" in output
    for model in ("sdm", "tdm"):
        assert (work / "runs" / "try" / "final" / model / "unet").is_dir()
    assert "event: succeeded" in output and '"state":"cancelled"' in output  # the job walk-through
    for image in ("out/image_0.png", "out-try/image_0.png", "image.png", "job.png", "beach.png"):
        assert (work / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", image
    assert "a training run; using its final models" in output
    assert (work / "eval" / "report.md").is_file()
