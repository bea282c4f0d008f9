"""TensorRT engines for the cloud's step-mode graphs (``python export/build_engines.py ... --tensorrt``).

Written against the TensorRT 10 Python API: a strongly typed network (the
ONNX graph's types decide the precision, so an fp32 export gives an fp32
engine and an fp16 export an fp16 one; no builder precision flags), one
optimisation profile per graph spanning what the service admits (N from 1 to
``max_candidates``, image sides from the smallest multiple the graphs take to
``max_image_size``), a timing cache persisted beside the engines, and an
engine cache whose key is (ONNX file hash, TensorRT version, GPU name,
precision, profile): change any of them and the engine is rebuilt, nothing
else is. The precision is the folder's (its manifest's ``precision``): give it
``OUT/cloud-fp16`` (``--cloud-precision fp16``, export/cloud_fp16.py) for fp16
engines, ``OUT/cloud`` for fp32 ones. Layout::

    OUT/cloud[-fp16]/tensorrt/timing.cache
    OUT/cloud[-fp16]/tensorrt/<mode>.<key[:16]>.plan

Where the library or a GPU is missing, ``require_tensorrt`` raises one clear
line naming what is missing; everything else here (profiles, keys, layout)
needs neither and is tested without them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.manifest import Manifest
from obclip.runtime.protocol import RequestLimits

from .specs import ModeGraphSpec, Shape

TIMING_CACHE = "timing.cache"


class TensorRTUnavailable(InputError):
    """The TensorRT library or a CUDA GPU is missing: install it, use a machine with one, or drop --tensorrt."""


def require_tensorrt() -> Any:
    """The ``tensorrt`` module, or one line naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed (pip install 'obclip[tensorrt]', TensorRT >= 10, "
                                  "on a machine with an NVIDIA GPU)") from None
    if int(trt.__version__.split(".")[0]) < 10:
        raise TensorRTUnavailable(f"TensorRT {trt.__version__} is too old; the builder needs TensorRT >= 10")
    if not gpu_name():
        raise TensorRTUnavailable("no NVIDIA GPU visible (nvidia-smi lists none); TensorRT engines need one")
    return trt


def gpu_name() -> str | None:
    """The first GPU's name, or None."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True, timeout=30)
    names = [n.strip() for n in out.stdout.splitlines() if n.strip()]
    return names[0] if out.returncode == 0 and names else None


@dataclass(frozen=True)
class ProfileRange:
    """The shapes one optimisation profile must accept: candidates N and latent sides (min, opt, max)."""

    n: tuple[int, int, int]
    latent: tuple[int, int, int]

    @classmethod
    def from_limits(cls, limits: RequestLimits, manifest: Manifest, opt_n: int = 4) -> ProfileRange:
        """What the service admits for this model: N in [1, max_candidates], sides in [one multiple,
        max_image_size], optimised for ``opt_n`` candidates at the native size."""
        src = manifest.source or {}
        f, m = manifest.vae_scale_factor, int(src.get("latent_multiple", 1))
        max_px = limits.max_image_size or 2 * manifest.default_image_size
        hi = max_px // f // m * m
        if hi < m:
            raise InputError(f"max_image_size {max_px} px is below the graphs' smallest side {m * f} px")
        native = min(max(manifest.default_image_size // f // m * m, m), hi)
        n_max = limits.max_candidates
        return cls(n=(1, min(opt_n, n_max), n_max), latent=(m, native, hi))


def profile_shapes(manifest: Manifest, mode: str, rng: ProfileRange) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input of a mode graph, from its spec (``export/specs.py``)."""
    spec = ModeGraphSpec.from_manifest(manifest, mode)
    points = [spec.shapes(spec.dims(n, side)) for n, side in zip(rng.n, rng.latent)]
    return {name: (points[0][name], points[1][name], points[2][name]) for name in spec.input_names}


def engine_key(onnx_sha256: str, trt_version: str, gpu: str, precision: str,
               shapes: Mapping[str, tuple[Shape, Shape, Shape]]) -> str:
    """The engine cache key: any change in the graph, TensorRT, the GPU, the precision or the profile rebuilds."""
    blob = json.dumps({"onnx": onnx_sha256, "tensorrt": trt_version, "gpu": gpu, "precision": precision,
                       "profile": {k: [list(s) for s in v] for k, v in sorted(shapes.items())}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_path(engines: Path, mode: str, key: str) -> Path:
    return engines / "tensorrt" / f"{mode}.{key[:16]}.plan"


def build_engine(trt: Any, onnx_path: Path, shapes: Mapping[str, tuple[Shape, Shape, Shape]], out: Path,
                 timing_cache: Path, workspace_gib: float = 8.0) -> None:
    """One serialized engine: strongly typed network from the ONNX file, one profile, the shared timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):   # reads the external weights beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ArtifactError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        name = network.get_input(i).name
        lo, opt, hi = shapes[name]
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ArtifactError(f"TensorRT failed to build an engine for {onnx_path}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(out)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def build_cloud_tensorrt(engines: Path, limits: RequestLimits = RequestLimits(), precision: str | None = None) -> dict:
    """TensorRT engines for every mode graph of a cloud engines folder (OUT/cloud or OUT/cloud-fp16),
    reusing cached ones; returns mode -> engine file. ``precision`` defaults to the folder's (its
    manifest's); a different one is refused. Refuses (one line) without TensorRT or a GPU."""
    manifest = Manifest.load(engines)
    if precision is None:
        precision = manifest.precision
    elif precision != manifest.precision:
        raise InputError(f"{engines} holds {manifest.precision} graphs, not {precision}: the strongly typed "
                         "network takes the graphs' types; build from OUT/cloud-fp16 for fp16 engines")
    trt = require_tensorrt()
    gpu = gpu_name() or ""
    rng = ProfileRange.from_limits(limits, manifest)
    built = {}
    for mode, info in manifest.modes.items():
        comp = manifest.components[info["component"]]
        shapes = profile_shapes(manifest, mode, rng)
        key = engine_key(comp.sha256, trt.__version__, gpu, precision, shapes)
        path = engine_path(engines, mode, key)
        if not path.is_file():
            build_engine(trt, manifest.path_of(info["component"]), shapes, path,
                         engines / "tensorrt" / TIMING_CACHE)
            print(f"  {mode:28s} TensorRT engine built: {path.name}")
        built[mode] = path
    (engines / "tensorrt" / "engines.json").write_text(json.dumps(
        {"range": asdict(rng), "engines": {m: p.name for m, p in built.items()}}, indent=1, sort_keys=True))
    return built
