"""The folders are the architecture (docs/ARCHITECTURE.md): the import-linter contract in
pyproject.toml holds for the installed package, its import graph has no cycle (function-local
imports count: grimp reads them too), and no module passes 500 lines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def _installed() -> Path:
    import segsynth

    return Path(segsynth.__file__).parent


def test_the_layers_contract_holds():
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    r = subprocess.run([lint, str(REPO / "pyproject.toml")], capture_output=True, text=True, timeout=300,
                       cwd=_installed().parent)  # the installed package, as users get it
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout and "Analyzed" in r.stdout, r.stdout


def test_the_import_graph_has_no_cycle():
    import grimp

    graph = grimp.build_graph("segsynth", cache_dir=None)
    modules = sorted(graph.modules)
    assert len(modules) > 50, modules  # the whole package was read, not a stub of it
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in modules}
    # Tarjan's strongly connected components: any with more than one module is a cycle
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(modules)))
    for module in modules:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("folder", ["segsynth", "stream", "export", "engine", "benchmarks"])
def test_no_module_passes_500_lines(folder):
    long = {str(p.relative_to(REPO)): n for p in (REPO / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, long


def test_the_stream_fields_doc_is_made_from_the_schema():
    from segsynth.core.config import stream_fields, stream_fields_table

    text = (REPO / "docs" / "stream-fields.md").read_text()
    assert stream_fields_table() in text, "docs/stream-fields.md is stale: regenerate its table (see its header)"
    assert len([f for f in stream_fields(api=True)]) >= 15  # what the API took before the schema, at least
