"""The package's layout: no import cycle inside ondevice_lora/, and every module imports alone.

The import graph is read from the source with `ast`: an edge for each import statement that runs
when a module is imported (module level, class bodies, `if`/`try` blocks; not function bodies,
which import lazily on purpose). `from pkg import name` points at pkg.name when that is a module.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import ondevice_lora

PACKAGE_DIR = Path(ondevice_lora.__file__).parent
PACKAGE = "ondevice_lora"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _import_time_nodes(tree: ast.Module):
    """Import statements executed at import time: skip function bodies, walk everything else."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _import_time_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source
                    for a in node.names
                ]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_inside_the_package():
    graph = import_graph()
    assert len(graph) > 80  # every module was found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_gguf_reading_does_not_import_the_loaders_above_it():
    # loading/gguf returns (config, weights, tokenizer); building a model is loading/build.py's
    # job, called by loading/hf.py, so the GGUF code needs nothing from them.
    graph = import_graph()
    above = {f"{PACKAGE}.loading", f"{PACKAGE}.loading.hf", f"{PACKAGE}.loading.build"}
    for name, edges in graph.items():
        if name.startswith(f"{PACKAGE}.loading.gguf"):
            assert not edges & above, f"{name} imports {sorted(edges & above)}"


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    # Each module first in a fresh interpreter: a module that only works when some other module
    # happened to be imported before it fails here.
    modules = sorted(_modules())
    script = (
        "import importlib, subprocess, sys\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True,"
        " text=True)\n"
        "    if r.returncode: failed.append(name + ': ' + r.stderr.strip().splitlines()[-1])\n"
        "print('\\n'.join(failed)); sys.exit(1 if failed else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *modules], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_names_import_from_the_package():
    import ondevice_lora as package

    for name in ("load", "generate", "stream_generate", "SamplingConfig"):
        assert callable(getattr(package, name))
