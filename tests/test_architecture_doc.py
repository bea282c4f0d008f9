"""docs/architecture.md names only what exists: every path and every code name on the page.

Paths (with a ``/``, under a top-level folder of the package or the checkout) must exist; code
names (identifiers and dotted names in backticks, and ``path.py  Name`` pairs in the request
diagram) must be defined in src/obclip: a module, a class, a function, a module- or class-level
name (dataclass fields and enum members included), and for ``Class.attr`` an attribute of that class.
Quoted strings, commands, shapes and expressions are left alone; the few outside names the page
uses are listed below.
"""

from __future__ import annotations

import ast
import functools
import re

import pytest

from helpers import REPO

PACKAGE = REPO / "src" / "obclip"
DOC = REPO / "docs" / "architecture.md"

# names the page uses that are not obclip's own
OUTSIDE = {"ORTUnet", "InferenceSession", "ValueError", "float32", "float16", "onnx", "torch.compile",
           "importlib.resources"}
TOP = {"runtime", "device", "cloud", "export", "app", "models", "tests", "benchmarks", "docs", "mini", "src"}
NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(\(\))?$")
PAIR = re.compile(r"\b((?:[\w-]+/)+[\w-]+\.py)[ \t]+([A-Za-z_][\w.]*)")
FILE = re.compile(r"^[\w-]+\.(py|json|md|toml|bin|onnx|txt)$")


@functools.cache
def definitions() -> tuple[set[str], dict[str, set[str]], dict[str, set[str]]]:
    """(module names, name -> files defining it, class name -> its attributes, those of its bases included)."""
    modules: set[str] = set()
    bases: dict[str, set[str]] = {}
    names: dict[str, set[str]] = {}
    classes: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        modules.add(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
        where = str(path.relative_to(PACKAGE))
        tree = ast.parse(path.read_text(), str(path))

        def targets(node: ast.stmt) -> list[str]:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                return [node.name]
            if isinstance(node, ast.Assign):
                return [t.id for t in node.targets if isinstance(t, ast.Name)]
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                return [node.target.id]
            return []

        for node in tree.body:
            for name in targets(node):
                names.setdefault(name, set()).add(where)
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, set()).update(b.id for b in node.bases if isinstance(b, ast.Name))
                attrs = classes.setdefault(node.name, set())
                for item in node.body:
                    attrs.update(targets(item))
                    for name in targets(item):
                        names.setdefault(name, set()).add(where)

    def inherited(cls: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set(classes.get(cls, set()))
        for b in bases.get(cls, set()) - seen:
            out |= inherited(b, seen | {cls})
        return out

    return modules, names, {cls: inherited(cls) for cls in classes}


@functools.cache
def _code() -> str:
    return "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))


def _is_path(span: str) -> bool:
    return "/" in span and span.split("/")[0] in TOP and not any(c in span for c in "<>$ *|")


def _path_exists(span: str) -> bool:
    """A path under the package or the checkout; a bare file name anywhere in them, or (a file the
    code writes, e.g. source.json) named in the package's code."""
    rel = span.rstrip("/")
    if "/" in rel:
        return any((base / rel).exists() for base in (PACKAGE, REPO))
    if (REPO / rel).exists() or any(True for top in TOP for _ in (REPO / top).rglob(rel)):
        return True
    return f'"{rel}"' in _code() or f"'{rel}'" in _code()


def _name_defined(span: str, defs: tuple[set[str], dict[str, set[str]], dict[str, set[str]]]) -> bool:
    modules, names, classes = defs
    span = span.removesuffix("()")
    if span in OUTSIDE or span in modules or span in {m.split(".")[1] for m in modules if "." in m}:
        return True
    head, _, attr = span.partition(".")
    if not attr:
        return head in names
    return attr in classes.get(head, set())


def doc_references(text: str) -> tuple[set[str], set[str], set[tuple[str, str]]]:
    """(paths, code names, (file, name) pairs of the diagram) the page names."""
    fenced = re.findall(r"```.*?```", text, flags=re.S)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    paths, names, pairs = set(), set(), set()
    for span in re.findall(r"`([^`\n]+)`", prose):
        span = span.strip()
        if _is_path(span) or FILE.match(span):
            paths.add(span)
        elif NAME.match(span):
            names.add(span)
    for block in fenced:
        for path, name in PAIR.findall(block):
            pairs.add((path, name.rstrip(".")))
    return paths, names, pairs


def missing(text: str) -> list[str]:
    defs = definitions()
    paths, names, pairs = doc_references(text)
    out = [f"path {p}" for p in sorted(paths) if not _path_exists(p)]
    out += [f"name {n}" for n in sorted(names) if not _name_defined(n, defs)]
    for path, name in sorted(pairs):
        if not _path_exists(path):
            out.append(f"path {path}")
        elif not _name_defined(name, defs):
            out.append(f"name {name} ({path})")
        elif "." not in name and path.split("/")[-1] not in {w.split("/")[-1] for w in defs[1].get(name, ())}:
            out.append(f"name {name} is not defined in {path}")
    return out


def test_every_path_and_name_in_architecture_md_exists():
    assert missing(DOC.read_text()) == []


@pytest.mark.parametrize("planted, reported", [
    ("`runtime/nonexistent.py`", "path runtime/nonexistent.py"),
    ("`DevicePipeline.vanished`", "name DevicePipeline.vanished"),
    ("`no_such_function`", "name no_such_function"),
    ("```\n  runtime/denoise.py  not_here\n```", "name not_here (runtime/denoise.py)"),
    ("```\n  runtime/denoise.py  DevicePipeline\n```", "name DevicePipeline is not defined in runtime/denoise.py"),
])
def test_the_doc_check_catches_a_stale_reference(planted, reported):
    assert reported in missing(DOC.read_text() + "\n" + planted + "\n")
