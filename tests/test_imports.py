"""The layers point one way: runtime <- device; runtime <- cloud <- export <- app.

runtime/ and device/ ship inside apps: they must never load torch, diffusers or
transformers. The cloud must never contain client code: it imports neither
device/, export/ nor the app layer. Checked two ways: statically, over every
import statement in the package (relative ones resolved), and by importing
every module in a fresh interpreter and looking at what got loaded.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import obclip

PACKAGE = Path(obclip.__file__).resolve().parent

# subpackage -> the obclip subpackages it may import (itself included)
ALLOWED = {
    "runtime": {"runtime"},
    "device": {"runtime", "device"},
    "cloud": {"runtime", "cloud"},
    "export": {"runtime", "cloud", "export"},
    "app": {"runtime", "device", "cloud", "export", "app"},
}
HEAVY = {"torch", "diffusers", "transformers"}
TORCH_FREE = ("runtime", "device")


def _imported_modules(path: Path, package: str) -> list[str]:
    """Absolute names of the modules a file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module or "")
    return names


def layer_violations(root: Path) -> list[str]:
    """Every import in ``root`` (an obclip package tree) that breaks ALLOWED or HEAVY."""
    found = []
    for sub, allowed in ALLOWED.items():
        for path in sorted((root / sub).rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            package = ".".join(["obclip", *rel.parts[:-1]]) if rel.name != "__init__" else \
                ".".join(["obclip", *rel.parts[:-1]])
            for name in _imported_modules(path, package):
                parts = name.split(".")
                if parts[0] == "obclip" and len(parts) > 1 and parts[1] in ALLOWED and parts[1] not in allowed:
                    found.append(f"{path.relative_to(root)} imports {name} ({sub} may not import {parts[1]})")
                if sub in TORCH_FREE and parts[0] in HEAVY:
                    found.append(f"{path.relative_to(root)} imports {name} ({sub} must stay torch-free)")
    return found


def test_layers_point_one_way():
    assert layer_violations(PACKAGE) == []


def test_the_layer_check_catches_a_planted_cloud_to_device_import(tmp_path):
    tree = tmp_path / "obclip"
    shutil.copytree(PACKAGE, tree, ignore=shutil.ignore_patterns("models", "__pycache__"))
    steps = tree / "cloud" / "steps.py"
    steps.write_text(steps.read_text() + "\nfrom ..device.client import ServiceClient  # planted\n")
    service = tree / "cloud" / "service.py"
    service.write_text(service.read_text() + "\nimport obclip.app.demo  # planted\n")
    plan = tree / "runtime" / "plan.py"
    plan.write_text(plan.read_text() + "\nimport torch  # planted\n")
    found = layer_violations(tree)
    assert any("cloud/steps.py imports obclip.device.client" in v for v in found), found
    assert any("cloud/service.py imports obclip.app.demo" in v for v in found), found
    assert any("runtime/plan.py imports torch" in v for v in found), found


LOADED = r"""
import importlib, pkgutil, sys
tops = sys.argv[1].split(",")
for top in tops:
    pkg = importlib.import_module("obclip." + top)
    for info in pkgutil.walk_packages(pkg.__path__, "obclip." + top + "."):
        if info.name.endswith("ray_serve"):
            continue  # optional extra; statically checked above
        importlib.import_module(info.name)
heavy = {m.split(".")[0] for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers"}}
print(",".join(sorted({".".join(m.split(".")[:2]) for m in sys.modules if m.startswith("obclip.")} | heavy)))
"""


def _loaded_by(tops: str, prelude: str = "") -> set[str]:
    out = subprocess.run([sys.executable, "-c", prelude + LOADED, tops], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.strip().split(","))


def test_runtime_and_device_import_without_torch():
    loaded = _loaded_by("runtime,device")
    assert not loaded & HEAVY, f"runtime/device pulled in heavy modules: {loaded & HEAVY}"


def test_the_torch_check_can_fail():
    # The same check, with torch imported on purpose, must report it.
    assert "torch" in _loaded_by("runtime", "import torch\n")


def test_cloud_loads_no_device_or_app_code():
    loaded = _loaded_by("cloud")
    assert not loaded & {"obclip.device", "obclip.app", "obclip.export"}, loaded


# --- no import cycle anywhere in the package ---------------------------------------------


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the obclip modules it imports, from every import statement in ``root`` (an obclip
    package tree): module level and inside functions alike, relative imports resolved, ``from pkg
    import sub`` counted as importing the submodule ``pkg.sub``."""
    files = {_module_name(root, p): p for p in sorted(root.rglob("*.py")) if "models" not in p.relative_to(root).parts}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of modules that import each other, as one cycle through it each."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:   # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_a_cycle(graph, set(c)) for c in components]


def _a_cycle(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through a strongly connected component: start, ..., start."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:   # breadth first, inside the component, back to start
        v = todo.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_no_import_cycle_anywhere():
    cycles = import_cycles(import_graph(PACKAGE))
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_catches_a_planted_function_local_cycle(tmp_path):
    tree = tmp_path / "obclip"
    shutil.copytree(PACKAGE, tree, ignore=shutil.ignore_patterns("models", "__pycache__"))
    assert import_cycles(import_graph(tree)) == []
    # runtime/solver.py imports nothing of runtime/denoise.py; denoise.py imports the solver.
    solver = tree / "runtime" / "solver.py"
    solver.write_text(solver.read_text() + "\n\ndef _planted():\n    from . import denoise  # planted\n")
    assert import_cycles(import_graph(tree)) == [["obclip.runtime.denoise", "obclip.runtime.solver",
                                                   "obclip.runtime.denoise"]]
