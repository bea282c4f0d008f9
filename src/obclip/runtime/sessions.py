"""Thin onnxruntime helpers: open a session with clear errors, run it by name."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def open_session(path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None) -> ort.InferenceSession:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} not found; run python export/build_engines.py")
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        raise ValueError(f"onnxruntime providers {missing} are not available here; available: "
                         f"{ort.get_available_providers()} (install onnxruntime-gpu for CUDAExecutionProvider)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def run(session: ort.InferenceSession, output: str, **inputs: np.ndarray) -> np.ndarray:
    """Run one output by name; inputs by name, so a reordered graph cannot swap them."""
    names = {i.name for i in session.get_inputs()}
    if set(inputs) != names:
        raise ValueError(f"session expects inputs {sorted(names)}, got {sorted(inputs)}")
    out: np.ndarray = session.run([output], inputs)[0]
    return out
