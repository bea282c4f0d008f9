"""benchmarks/device.py's torch eager row: the same device model through diffusers, on the same inputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import BENCHMARKS

pytestmark = pytest.mark.slow   # a device export and two rounds of three processes: minutes here


def test_device_benchmark_times_torch_beside_onnxruntime(model_dirs, engines_dir):
    out = subprocess.run([sys.executable, str(BENCHMARKS / "device.py"), "--out", str(engines_dir.parent), "--reuse",
                          "--device-model", str(model_dirs[1]), "--precisions", "fp32", "--torch", "--rounds", "2",
                          "--repeats", "2", "--steps", "2", "--prompts", "1", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout[out.stdout.index("{"):])
    assert set(rows) == {"fp32", "torch"}
    assert len(rows["fp32"]["step_s"]) == len(rows["torch"]["decode_s"]) == 4   # 2 rounds x 2 repeats, pooled
    assert rows["torch"]["torch_loaded"] and not rows["fp32"]["torch_loaded"]
    # the same weights and inputs: the torch row computes what the engines compute
    assert rows["torch"]["step_vs_fp32"] <= 1e-4 and rows["torch"]["decode_vs_fp32"] <= 1e-4
    assert rows["fp32"]["step_vs_fp32"] == 0.0
