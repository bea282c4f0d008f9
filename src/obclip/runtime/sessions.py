"""onnxruntime for all of obclip: one provider resolver, one options object, one session opener.

Every obclip module takes onnxruntime from here (``from obclip.runtime.sessions import ort``), so a
missing or doubled runtime is reported once, with the fix. The runtime is a per-target extra (as
optimum does it): ``obclip[cpu]`` brings ``onnxruntime``, ``obclip[gpu]`` brings ``onnxruntime-gpu``
(CUDA and TensorRT providers). The two install the same ``onnxruntime`` module and must not sit
side by side.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .errors import ArtifactError, InputError
from .memory import MEMORY_MODES, memory_mode

__all__ = ["MEMORY_MODES", "RUNTIME_MISSING", "SessionConfig", "available_providers", "doubled_runtime_message",
           "installed_runtimes", "open_session", "ort", "resolve_providers", "run"]

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


# "auto" tries these in order, keeping those this onnxruntime build offers; CPU always comes last,
# so nodes an accelerator cannot run fall back to it (onnxruntime assigns each node to the first
# listed provider that runs it).
PROVIDER_FALLBACK_ORDER = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
                           "NnapiExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
                    "directml": "DmlExecutionProvider", "dml": "DmlExecutionProvider",
                    "coreml": "CoreMLExecutionProvider", "nnapi": "NnapiExecutionProvider",
                    "xnnpack": "XnnpackExecutionProvider"}
# Nodes TensorRT cannot take run on CUDA before they fall back to the CPU.
_THEN_CUDA = "TensorrtExecutionProvider"


def resolve_providers(requested: Sequence[str] | str, available: Sequence[str] | None = None) -> tuple[str, ...]:
    """Provider names (full or short: "cuda", "coreml", "cpu"...; a comma-separated string is split),
    or "auto", -> the list handed to onnxruntime: TensorRT followed by CUDA, CPU appended as the
    last fallback. A provider this onnxruntime build lacks is an InputError naming the fix."""
    available = available_providers() if available is None else list(available)
    names = tuple(n.strip() for n in requested.split(",")) if isinstance(requested, str) else tuple(requested)
    if names == ("auto",):
        return tuple(p for p in PROVIDER_FALLBACK_ORDER if p in available)
    full = tuple(PROVIDER_ALIASES.get(n.lower(), n) for n in names)
    missing = [n for n, f in zip(names, full) if f not in available]
    if missing or not full:
        raise InputError(f"onnxruntime providers {missing or list(names)} are not available in this onnxruntime "
                         f"build; it offers {available}. Install the build that has them instead of this one "
                         "(pip uninstall -y onnxruntime && pip install 'obclip[gpu]', i.e. onnxruntime-gpu: CUDA "
                         "and TensorRT; onnxruntime-directml: DirectML; onnxruntime-mobile/the iOS and Android "
                         "packages: CoreML, NNAPI, XNNPACK) or use providers=\"auto\"")
    out = list(dict.fromkeys(full))
    if _THEN_CUDA in out and "CUDAExecutionProvider" not in out and "CUDAExecutionProvider" in available:
        out.insert(out.index(_THEN_CUDA) + 1, "CUDAExecutionProvider")
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")
    return tuple(out)


OPTIMIZATION_LEVELS = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                       "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


@dataclass(frozen=True)
class SessionConfig:
    """How every onnxruntime session of obclip is opened (device graphs, cloud graphs, export checks)."""

    providers: tuple[str, ...] | str = ("CPUExecutionProvider",)   # names, short names, or "auto"
    threads: int | None = None              # intra-op threads; None: onnxruntime's default
    optimization: str | None = None         # "disabled", "basic", "extended", "all"; None: onnxruntime's default
    memory_arena: bool | None = None        # the CPU memory arena; None: onnxruntime's default (on)
    prepacking: bool = True                 # False: no per-session prepacked copies of shared weights
    # One CPU arena for every session of the process that sets this (onnxruntime's environment
    # allocator): sessions run one at a time reuse each other's freed blocks, so memory follows the
    # largest single run instead of growing by one arena per session (per step mode in the cloud).
    shared_arena: bool = False
    # Return the CPU arena's free memory to the system at the end of every run (the run option
    # memory.enable_memory_arena_shrinkage): within a run freed blocks are reused, between runs the
    # arena keeps nothing, so memory follows the run in flight, not the largest run ever made.
    arena_shrinkage: bool = False
    # onnxruntime's memory pattern: after a run of given shapes, the next such run takes all its
    # activations as one planned block. None: onnxruntime's default (on). False: each tensor is
    # allocated on its own, so in a shared arena freed blocks serve any session's tensors, where
    # every session's differently sized planned blocks fragment it.
    memory_pattern: bool | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InputError(f"threads={self.threads!r} must be a positive integer or None (onnxruntime's default)")
        if self.shared_arena and self.memory_arena is False:
            raise InputError("shared_arena=True is an arena: leave memory_arena at None or True")
        if self.arena_shrinkage and self.memory_arena is False:
            raise InputError("arena_shrinkage=True shrinks an arena: leave memory_arena at None or True")
        if self.optimization is not None and self.optimization not in OPTIMIZATION_LEVELS:
            raise InputError(f"optimization={self.optimization!r} must be one of {sorted(OPTIMIZATION_LEVELS)} "
                             "or None (onnxruntime's default)")

    @classmethod
    def for_memory(cls, memory: str, *, providers: tuple[str, ...] | str = ("CPUExecutionProvider",),
                   threads: int | None = None, optimization: str | None = None,
                   shared_weights: bool = False) -> SessionConfig:
        """The config of a memory mode (runtime/memory.py: MEMORY_MODES, what each is;
        ``shared_weights``: the sessions are handed one mapped copy of their weights)."""
        mode = memory_mode(memory, shared_weights)
        return cls(providers=providers, threads=threads, optimization=optimization,
                   memory_arena=mode.memory_arena, shared_arena=mode.shared_arena,
                   arena_shrinkage=mode.arena_shrinkage, memory_pattern=mode.memory_pattern,
                   prepacking=mode.prepacking)

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        if self.optimization is not None:
            options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        if self.memory_arena is not None:
            options.enable_cpu_mem_arena = self.memory_arena
        if self.memory_pattern is not None:
            options.enable_mem_pattern = self.memory_pattern
        if not self.prepacking:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if self.shared_arena:
            register_shared_arena()
            options.add_session_config_entry("session.use_env_allocators", "1")
        return options

    def run_options(self) -> ort.RunOptions | None:
        """What every run of a session opened with this config passes (None: onnxruntime's defaults)."""
        if not self.arena_shrinkage:
            return None
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        return options


_SHARED_ARENA: list[bool] = []
SHARED_ARENA_EXTEND = 1


def register_shared_arena() -> None:
    """Register the process's one shared CPU arena with onnxruntime's environment, once."""
    if _SHARED_ARENA:
        return
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    # max memory 0 (no limit); extend strategy 1, kSameAsRequested: grow by what a run asks for, not
    # to the next power of two (which can nearly double the peak); initial chunk, dead bytes default (-1)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, SHARED_ARENA_EXTEND, -1, -1))
    _SHARED_ARENA.append(True)


def open_session(path: str | Path, config: SessionConfig = SessionConfig(), *,
                 initializers: Mapping[str, ort.OrtValue] | None = None,
                 save_optimized: Path | None = None,
                 entries: Mapping[str, str] | None = None) -> ort.InferenceSession:
    """The one way obclip opens an ONNX graph. ``initializers``: tensors handed to the session by
    name instead of read from the file (shared weights, mapped once); ``save_optimized``: also write
    the graph as optimised at ``config.optimization`` there (offline optimisation); ``entries``:
    further session config entries."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"ONNX model {path} not found; run python export/build_engines.py")
    providers = resolve_providers(config.providers)
    options = config.session_options()
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
    for key, value in (entries or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def run(session: ort.InferenceSession, output: str, **inputs: np.ndarray) -> np.ndarray:
    """Run one output by name; inputs by name, so a reordered graph cannot swap them."""
    names = {i.name for i in session.get_inputs()}
    if set(inputs) != names:
        raise ArtifactError(f"the graph takes inputs {sorted(names)}, obclip feeds {sorted(inputs)}: it was exported "
                            "for another version; rerun python export/build_engines.py")
    out: np.ndarray = session.run([output], inputs)[0]
    return out
