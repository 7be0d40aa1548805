"""The import rules of docs/ARCHITECTURE.md, checked on the source: every import of every project .py file (also
those inside functions and under TYPE_CHECKING; relative imports resolved) forms one module graph, which must have
no circle, and whose arrows between the folders run only downwards:

    facediffuser  ←  cluster  ←  pipelines, serving  ←  benchmarks, tests

Each check is also run on a small synthetic graph holding the fault it looks for, so that none can pass by finding
nothing at all."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("facediffuser", "cluster", "pipelines", "serving", "benchmarks", "tests", "infra")
SCRIPT_FOLDERS = ("tests", "benchmarks", "infra")  # run with their own folder on sys.path (no package)
# folder → top-level names its modules must not import (anything else they may)
FORBIDDEN = {
    "facediffuser": {"ray", "cluster", "pipelines", "serving", "benchmarks", "tests"},  # the library runs without Ray
    "cluster": {"pipelines", "serving", "benchmarks", "tests"},  # Ray plumbing under both Ray layers
    "pipelines": {"benchmarks", "tests"},
    "serving": {"pipelines", "benchmarks", "tests"},  # the service does not depend on the batch jobs
}


# ------------------------------------------------------------------------------------------------ the graph
def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_files() -> dict[str, Path]:
    """module name → file, for every .py file of the project's folders."""
    files = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                files[module_name(path)] = path
    return files


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name `path` imports, absolute (relative imports resolved against `module`'s package); for
    `from X import Y`, both X and X.Y (Y may be a module or a name in X: `resolve` keeps the one that exists)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*"}
            if base:
                found.add(base)
    return found


def resolve(name: str, importer: str, modules: set[str]) -> str | None:
    """An imported name → the project module it loads (the longest prefix that is one), or None for a third-party
    one. A bare name in tests/ or benchmarks/ may be a sibling file (they run with their own folder on sys.path)."""
    pieces = name.split(".")
    script_folder = importer.split(".")[0] in SCRIPT_FOLDERS
    for candidate in (name, f"{importer.rpartition('.')[0]}.{name}" if script_folder else None):
        if candidate is None:
            continue
        parts = candidate.split(".")
        for end in range(len(parts), 0, -1):
            prefix = ".".join(parts[:end])
            if prefix in modules and (end > 1 or prefix == pieces[0]):
                return prefix
    return None


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """→ (module → the project modules it imports, module → every absolute name it imports)."""
    files = project_files()
    modules = set(files)
    graph, names = {}, {}
    for module, path in files.items():
        names[module] = imported_names(path, module)
        graph[module] = {
            target for name in names[module] if (target := resolve(name, module, modules)) and target != module
        }
    return graph, names


# ------------------------------------------------------------------------------------------------ the checks
def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph` as [a, b, ..., a], or None (iterative depth-first search, nodes in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def broken_rules(names: dict[str, set[str]]) -> list[str]:
    """'MODULE imports NAME' for each import a folder's FORBIDDEN list names."""
    broken = []
    for module, imported in sorted(names.items()):
        forbidden = FORBIDDEN.get(module.split(".")[0], set())
        named = {n for n in imported if not any(n.startswith(f"{other}.") for other in imported)}  # X, not X.Y too
        broken += [f"{module} imports {name}" for name in sorted(named) if name.split(".")[0] in forbidden]
    return broken


# ------------------------------------------------------------------------------------------------ the tree
def test_the_module_graph_has_no_circle():
    graph, _ = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_each_folder_imports_only_what_it_may():
    _, names = import_graph()
    broken = broken_rules(names)
    assert not broken, "\n".join(broken)


def test_the_graph_sees_the_imports_it_must():
    """The parser finds imports inside functions, under TYPE_CHECKING and relative ones (a parser that finds
    nothing would pass the two tests above)."""
    graph, names = import_graph()
    assert "facediffuser.model_dir" in graph["pipelines.train"]  # top level
    assert "cluster.runtime" in graph["pipelines.train"]  # inside a function
    assert "cluster.stopping" in graph["serving.app"]  # inside a function
    assert "pipelines.train_config" in graph["pipelines.train_worker"]
    folders = {module.split(".")[0] for module in graph}
    assert {"facediffuser", "cluster", "pipelines", "serving", "benchmarks", "tests"} <= folders
    assert any(name.startswith("ray") for name in names["cluster.runtime"])


# ------------------------------------------------------------------------------------------------ self-checks
def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_rules_catch_each_arrow_running_up():
    names = {
        "facediffuser.x": {"ray.util", "pipelines.train", "serving.app", "cluster.runtime", "benchmarks.serve", "os"},
        "serving.y": {"pipelines.stopping", "cluster.runtime", "facediffuser.model_dir"},
        "cluster.z": {"pipelines.train", "serving.app", "benchmarks.train", "ray", "facediffuser.devices"},
        "pipelines.w": {"benchmarks.train", "serving.app", "cluster.runtime"},
        "benchmarks.v": {"pipelines.train", "serving.app"},
    }
    assert broken_rules(names) == [
        "cluster.z imports benchmarks.train",
        "cluster.z imports pipelines.train",
        "cluster.z imports serving.app",
        "facediffuser.x imports benchmarks.serve",
        "facediffuser.x imports cluster.runtime",
        "facediffuser.x imports pipelines.train",
        "facediffuser.x imports ray.util",
        "facediffuser.x imports serving.app",
        "pipelines.w imports benchmarks.train",
        "serving.y imports pipelines.stopping",
    ]


def test_relative_imports_and_function_level_imports_are_read(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("from . import sibling\nfrom ..up import thing\n\ndef f():\n    import ray\n")
    assert imported_names(source, "facediffuser.data.mod") == {
        "facediffuser.data.sibling",
        "facediffuser.data",
        "facediffuser.up.thing",
        "facediffuser.up",
        "ray",
    }
