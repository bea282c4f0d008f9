"""The wheel is one package, `obclip`, that works without a checkout.

Builds the wheel from this tree (no build isolation, so no network), checks
what it installs, then runs the candidates CLI from the unpacked wheel in a
folder far from the checkout, so nothing can be found relative to the repo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

ROOT = REPO
SCRIPTS = {"obclip-demo", "obclip-candidates", "obclip-serve", "obclip-generate", "obclip-ray-serve"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("obclip-*.whl")
    return path


def test_the_wheel_installs_one_package_with_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert top == {"obclip"}
    for needed in ("obclip/py.typed", "obclip/runtime/data/clip_bpe/vocab.json", "obclip/device/schemas/person.json",
                   "obclip/device/schemas/shapes.json", "obclip/models/obclip-mini/cloud/unet/config.json",
                   "obclip/models/obclip-mini/device/unet/diffusion_pytorch_model.safetensors",
                   "obclip/models/obclip-mini/MODEL_CARD.md"):
        assert needed in names, needed
    assert not any(n.startswith(("mini/", "tests/", "benchmarks/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert SCRIPTS <= {line.split("=")[0].strip() for line in text.splitlines() if "=" in line}


def test_candidates_run_from_the_unpacked_wheel_away_from_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import json, obclip, obclip.device.oblivious as o; print(obclip.__file__); "
            "o.main(['a photo of an old man', '--schema', 'person'])")
    env = {**os.environ, "PYTHONPATH": str(site), "OBCLIP_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    first, rest = out.stdout.split("\n", 1)
    assert Path(first).resolve().is_relative_to(site.resolve())  # not the checkout's src/
    result = json.loads(rest)
    assert len(result["candidates"]) == 6


def test_the_onnx_runtime_is_a_per_target_extra(wheel):
    """Exactly one of onnxruntime / onnxruntime-gpu: neither is a base dependency, each is its own extra."""
    names = zipfile.ZipFile(wheel).namelist()
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [r for r in requires if r.lower().startswith("onnxruntime")]
    assert runtime and all("extra ==" in r for r in runtime), runtime
    assert any(r.startswith("onnxruntime>=") and 'extra == "cpu"' in r for r in runtime)
    assert any(r.startswith("onnxruntime-gpu") and 'extra == "gpu"' in r for r in runtime)
    assert not any(r.startswith("onnxruntime-gpu") and 'extra == "gpu"' not in r for r in runtime)


def test_a_doubled_onnx_runtime_is_named_with_its_fix():
    from obclip.runtime.sessions import doubled_runtime_message, installed_runtimes

    assert installed_runtimes(["numpy", "onnxruntime"]) == ["onnxruntime"]
    both = installed_runtimes(["onnxruntime_gpu", "Onnxruntime", "torch"])
    assert both == ["onnxruntime", "onnxruntime-gpu"]
    message = doubled_runtime_message(both)
    assert message is not None and "pip uninstall -y onnxruntime onnxruntime-gpu" in message
    assert "obclip[gpu]" in message
    assert doubled_runtime_message(["onnxruntime"]) is None
    # this environment (the CI's) has exactly one
    assert len(installed_runtimes()) == 1


def test_every_error_class_is_exported_from_obclip():
    """An app catches by kind (runtime/errors.py) and can name every obclip error from ``obclip``."""
    import importlib
    import inspect
    import pkgutil

    import obclip
    from obclip.runtime.errors import ObclipError

    skip = {"obclip.cloud.ray_serve"} if importlib.util.find_spec("ray") is None else set()
    defined = {}
    for info in pkgutil.walk_packages(obclip.__path__, "obclip."):
        if info.name in skip:
            continue
        module = importlib.import_module(info.name)
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ObclipError) and cls.__module__ == info.name and not name.startswith("_"):
                defined[name] = cls
    assert {"VerificationError", "HandoffError", "BadResponse", "ServiceRejected"} <= set(defined)
    for name, cls in defined.items():
        assert getattr(obclip, name) is cls, name
