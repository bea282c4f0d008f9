"""The tests mirror the package: one folder per layer, project-wide checks at the top, one shared
module (tests/helpers.py), and no test module importing another."""

from __future__ import annotations

import ast

from helpers import REPO

TESTS = REPO / "tests"
# Folders of tests/: a layer of src/obclip, or a top-level folder of the checkout.
LAYERS = {"runtime", "device", "cloud", "export", "app"}
CHECKOUT_FOLDERS = {"mini", "benchmarks"}
PROJECT_WIDE = {"test_imports.py", "test_packaging.py", "test_docs.py", "test_architecture_doc.py", "test_layout.py"}


def test_every_test_folder_names_a_layer_or_a_checkout_folder():
    for folder in (p for p in TESTS.iterdir() if p.is_dir() and p.name not in {"data", "__pycache__"}):
        assert folder.name in LAYERS | CHECKOUT_FOLDERS, f"tests/{folder.name}/ names no layer"
        if folder.name in LAYERS:
            assert (REPO / "src" / "obclip" / folder.name).is_dir(), folder
        else:
            assert (REPO / folder.name).is_dir(), folder


def test_only_project_wide_checks_sit_at_the_top():
    top = {p.name for p in TESTS.glob("test_*.py")}
    assert top <= PROJECT_WIDE, f"move {sorted(top - PROJECT_WIDE)} into the folder of the layer they test"


def _imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def _test_local_imports(path, local_names):
    return [m for m in _imported_modules(path) if m.split(".")[0] in local_names]


def test_no_test_module_imports_another():
    local_names = {p.stem for p in TESTS.rglob("*.py")} - {"helpers"}
    offenders = {}
    for path in TESTS.rglob("test_*.py"):
        bad = _test_local_imports(path, local_names)
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert not offenders, f"share code through tests/helpers.py instead: {offenders}"


def test_the_import_check_can_fail(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text("from __future__ import annotations\nimport conftest\nfrom test_service import Running\n"
                       "from helpers import REPO\nfrom obclip.runtime import plan\n")
    local_names = {p.stem for p in TESTS.rglob("*.py")} - {"helpers"}
    assert _test_local_imports(planted, local_names) == ["conftest", "test_service"]


def test_test_module_names_are_unique_across_folders():
    # pytest imports test files by basename (no packages): two test_x.py in different folders
    # cannot both be collected in one run.
    seen: dict[str, str] = {}
    clashes = []
    for path in sorted(TESTS.rglob("test_*.py")):
        where = str(path.relative_to(REPO))
        if path.name in seen:
            clashes.append((seen[path.name], where))
        seen.setdefault(path.name, where)
    assert not clashes, f"rename one of each pair: {clashes}"
