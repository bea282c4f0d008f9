"""runtime/sessions.SessionConfig's memory options: arena shrinkage at the end of every run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from obclip.runtime.errors import InputError
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
