"""Thin onnxruntime helpers: open a session with clear errors, run it by name.

Every obclip module takes onnxruntime from here (``from obclip.runtime.sessions import ort``), so a
missing or doubled runtime is reported once, with the fix. The runtime is a per-target extra (as
optimum does it): ``obclip[cpu]`` brings ``onnxruntime``, ``obclip[gpu]`` brings ``onnxruntime-gpu``
(CUDA and TensorRT providers). The two install the same ``onnxruntime`` module and must not sit
side by side.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

__all__ = ["RUNTIME_MISSING", "available_providers", "doubled_runtime_message", "installed_runtimes",
           "open_session", "ort", "run"]

# Distributions that each install the ``onnxruntime`` module.
RUNTIME_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino",
                         "onnxruntime-qnn", "onnxruntime-silicon")
RUNTIME_MISSING = ("onnxruntime is not installed: pip install 'obclip[cpu]' (CPU), or 'obclip[gpu]' "
                   "(onnxruntime-gpu: CUDA and TensorRT providers), never both")


def installed_runtimes(names: Iterable[str] | None = None) -> list[str]:
    """The onnxruntime distributions installed (``names``: the installed distribution names, for tests)."""
    if names is None:
        names = (d.metadata["Name"] or "" for d in metadata.distributions())
    found = {n.lower().replace("_", "-") for n in names}
    return [d for d in RUNTIME_DISTRIBUTIONS if d in found]


def doubled_runtime_message(runtimes: Sequence[str]) -> str | None:
    """What to tell a user with more than one onnxruntime distribution installed (None: fine)."""
    if len(runtimes) < 2:
        return None
    keep = "gpu" if "onnxruntime-gpu" in runtimes else "cpu"
    return (f"{' and '.join(runtimes)} are installed together; they overwrite each other's onnxruntime module. "
            f"Keep one: pip uninstall -y {' '.join(runtimes)} && pip install 'obclip[{keep}]'")


try:
    import onnxruntime as ort
except ImportError as e:  # pragma: no cover - exercised in a venv without the extra
    raise ImportError(RUNTIME_MISSING) from e

_doubled = doubled_runtime_message(installed_runtimes())
if _doubled:
    warnings.warn(_doubled, RuntimeWarning, stacklevel=2)


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
                         f"{ort.get_available_providers()} (for CUDA/TensorRT: pip uninstall -y onnxruntime && "
                         "pip install 'obclip[gpu]')")
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
