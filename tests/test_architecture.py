"""The import rules of docs/ARCHITECTURE.md, checked on the source (every import, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package → top-level modules it must not import (anything else it may)
FORBIDDEN = {
    "facediffuser": {"ray", "pipelines", "serving", "benchmarks"},  # the library runs without Ray
    "pipelines": {"benchmarks"},
    "serving": {"benchmarks"},
}
# the crossings between the two Ray layers: every command starts Ray the same (quiet) way, and stops the same way
ALLOWED = {("serving", "pipelines.ray_runtime"), ("serving", "pipelines.stopping")}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_it_may(package):
    broken = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imports(path)):
            top = name.split(".")[0]
            if top in FORBIDDEN[package] and not any(package == p and name.startswith(m) for p, m in ALLOWED):
                broken.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not broken, "\n".join(broken)


def test_serving_does_not_reach_into_pipelines_beyond_the_ray_starter():
    for path in (ROOT / "serving").rglob("*.py"):
        for name in imports(path):
            if name.split(".")[0] == "pipelines":
                assert ("serving", name) in ALLOWED, f"{path.relative_to(ROOT)} imports {name}"
