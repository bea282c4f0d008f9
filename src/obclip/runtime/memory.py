"""How obclip's onnxruntime sessions allocate CPU memory: the memory modes, for the cloud and the device.

``runtime.sessions.SessionConfig.for_memory`` opens sessions in a mode; this module imports no
onnxruntime, so a command whose backend needs none (the torch cloud) can still list the modes as
flag choices. What each mode measures: docs/engines.md (``benchmarks/engine_memory.py --compare``
for the cloud, ``benchmarks/device.py --memory`` for the device).

    none               no CPU arena: every activation allocated and freed
    arena              one arena per session (onnxruntime's default), which keeps the largest
                       activations it ever held: a process holds every session's largest run at once
    arena+shrink       that arena, returning its free memory to the system at the end of every run
    shared             one arena for all sessions of the process (onnxruntime's environment
                       allocator): memory follows the largest single run
    shared+shrink      the shared arena, shrunk at the end of every run: it holds only the run in flight
    shared+prepack     the shared arena, with each session's prepacked copy of the weights it packs
    shared+no-pattern  the shared arena without onnxruntime's memory patterns (each session's one
                       planned block per run, sized differently per graph, fragments a shared arena):
                       every tensor allocated on its own from the one arena
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

__all__ = ["MEMORY_MODES", "MemoryMode", "memory_mode"]

MEMORY_MODES = ("none", "arena", "arena+shrink", "shared", "shared+shrink", "shared+prepack", "shared+no-pattern")


@dataclass(frozen=True)
class MemoryMode:
    """A memory mode as ``SessionConfig`` fields (runtime/sessions.py says what each field does)."""

    memory_arena: bool
    shared_arena: bool
    arena_shrinkage: bool
    memory_pattern: bool | None   # None: onnxruntime's default (on)
    prepacking: bool


def memory_mode(memory: str, shared_weights: bool = False) -> MemoryMode:
    """The fields of a memory mode; an InputError naming the modes for any other name.

    ``shared_weights``: the sessions are handed one mapped copy of their weights (the cloud's step
    modes, runtime/weights.py), so prepacking, which gives each session its own packed copy, is off
    except in "shared+prepack". Sessions that read their own weights (the device's graphs) keep
    onnxruntime's default prepacking in every mode: there is no shared copy for it to duplicate.
    """
    if memory not in MEMORY_MODES:
        raise InputError(f"memory={memory!r} must be one of {list(MEMORY_MODES)}")
    return MemoryMode(memory_arena=memory != "none", shared_arena=memory.startswith("shared"),
                      arena_shrinkage=memory.endswith("+shrink"),
                      memory_pattern=False if memory == "shared+no-pattern" else None,
                      prepacking=memory == "shared+prepack" or not shared_weights)
