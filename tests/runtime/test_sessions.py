"""runtime/sessions.SessionConfig's memory options: arena shrinkage at the end of every run, and the
memory modes (runtime/memory.py) the cloud and the device open their sessions in."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from obclip.runtime.errors import InputError
from obclip.runtime.memory import MEMORY_MODES
from obclip.runtime.sessions import SessionConfig, open_session

# One run of the decoder in a fresh process: its resident memory after the run (MB).
_RSS_AFTER_RUN = """
import json, sys
import numpy as np
from obclip.runtime.sessions import SessionConfig, open_session
config = SessionConfig(**json.loads(sys.argv[2]))
session = open_session(sys.argv[1], config)
feed = {"latent_sample": np.zeros((4, 4, 32, 32), np.float32)}
session.run(None, feed, config.run_options())
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["RssAnon"].split()[0]) / 1024)
"""


def test_arena_shrinkage_is_a_run_option_and_computes_the_same(engines_dir):
    feed = {"latent_sample": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    path = engines_dir / "vae_decoder" / "model.onnx"
    plain = open_session(path, SessionConfig(memory_arena=False)).run(None, feed)[0]
    assert SessionConfig().run_options() is None
    for config in (SessionConfig(arena_shrinkage=True), SessionConfig(shared_arena=True, arena_shrinkage=True)):
        options = config.run_options()
        assert options is not None
        assert options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
        session = open_session(path, config)
        for _ in range(2):   # the second run allocates from an arena the first one emptied
            np.testing.assert_array_equal(session.run(None, feed, options)[0], plain)
    with pytest.raises(InputError, match="arena_shrinkage"):
        SessionConfig(arena_shrinkage=True, memory_arena=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_a_shrinking_arena_keeps_less_after_a_run_than_one_that_does_not(engines_dir):
    """Without shrinkage an arena keeps the run's activations after it; with it, they go back."""
    path = str(engines_dir / "vae_decoder" / "model.onnx")

    def after(config: dict) -> float:
        out = subprocess.run([sys.executable, "-c", _RSS_AFTER_RUN, path, json.dumps(config)],
                             capture_output=True, text=True, timeout=120, check=True)
        return float(out.stdout.split()[-1])

    none, kept, shrunk = after({"memory_arena": False}), after({}), after({"arena_shrinkage": True})
    assert kept - shrunk > 10, (none, kept, shrunk)
    assert shrunk <= none + 10, (none, kept, shrunk)


# Each memory mode's SessionConfig fields: (memory_arena, shared_arena, arena_shrinkage, memory_pattern,
# prepacking), with weights the sessions share (the cloud's step modes) and with their own (the device).
MODE_FIELDS = {
    "none": (False, False, False, None),
    "arena": (True, False, False, None),
    "arena+shrink": (True, False, True, None),
    "shared": (True, True, False, None),
    "shared+shrink": (True, True, True, None),
    "shared+prepack": (True, True, False, None),
    "shared+no-pattern": (True, True, False, False),
}


def _fields(config: SessionConfig) -> tuple:
    return (config.memory_arena, config.shared_arena, config.arena_shrinkage, config.memory_pattern,
            config.prepacking)


@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_each_memory_mode_maps_to_its_session_fields(memory):
    assert set(MODE_FIELDS) == set(MEMORY_MODES)
    shared_weights = SessionConfig.for_memory(memory, providers="cpu", threads=2, optimization="extended",
                                              shared_weights=True)
    own_weights = SessionConfig.for_memory(memory)
    # Shared weights: prepacked only on request (each session's packed copy); own weights: always, as by default.
    assert _fields(shared_weights) == (*MODE_FIELDS[memory], memory == "shared+prepack")
    assert _fields(own_weights) == (*MODE_FIELDS[memory], True)
    assert (shared_weights.providers, shared_weights.threads, shared_weights.optimization) == ("cpu", 2, "extended")
    assert (shared_weights.run_options() is not None) == memory.endswith("+shrink")


def test_the_cloud_opens_its_sessions_by_the_runtimes_modes():
    from obclip.cloud.engine_backend import session_config
    from obclip.cloud.service_config import DEFAULT_MEMORY, ServiceConfig

    for memory in MEMORY_MODES:
        assert session_config("cpu", 1, "extended", memory) == SessionConfig.for_memory(
            memory, providers=("CPUExecutionProvider",), threads=1, optimization="extended", shared_weights=True)
    assert DEFAULT_MEMORY in MEMORY_MODES
    assert ServiceConfig().engine_memory == DEFAULT_MEMORY


def test_an_unknown_memory_mode_is_refused_naming_the_modes():
    with pytest.raises(InputError, match=r"memory='pooled' must be one of \['none', 'arena', 'arena\+shrink'"):
        SessionConfig.for_memory("pooled")


def test_the_memory_modes_import_without_onnxruntime():
    """The cloud's flags list the modes on a torch-only install (no onnxruntime)."""
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "from obclip.runtime.memory import MEMORY_MODES\n"
            "import obclip.cloud.service_config\n"
            "print(len(MEMORY_MODES))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split()[-1] == "7"
