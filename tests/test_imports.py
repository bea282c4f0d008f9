"""runtime/ and device/ ship inside apps: they must never load torch, diffusers or transformers."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = r"""
import importlib, pkgutil, sys
for top in ("runtime", "device"):
    pkg = importlib.import_module(top)
    for info in pkgutil.walk_packages(pkg.__path__, top + "."):
        importlib.import_module(info.name)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "diffusers", "transformers"})
print(",".join(heavy))
"""


def test_runtime_and_device_import_without_torch():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"runtime/device pulled in heavy modules: {out.stdout.strip()}"


def test_the_check_can_fail():
    # The same check, with torch imported on purpose, must report it.
    out = subprocess.run([sys.executable, "-c", "import torch\n" + CHECK], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert "torch" in out.stdout
