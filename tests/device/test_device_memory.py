"""The device engines' memory modes (EngineConfig.memory, --engine-memory): refused when unknown,
passed on every graph run, and computing what the default computes."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from obclip.device.cli import add_generation_flags
from obclip.device.engines import DEFAULT_DEVICE_MEMORY, DeviceEngines, EngineConfig
from obclip.device.pipeline import DevicePipeline, GenerationConfig, Method
from obclip.runtime.errors import InputError
from obclip.runtime.memory import MEMORY_MODES

SHRINK = "memory.enable_memory_arena_shrinkage"


def test_an_unknown_mode_is_refused_naming_the_modes():
    with pytest.raises(InputError, match=r"engine memory 'pooled': choose one of \['none', 'arena'"):
        EngineConfig(memory="pooled")


def test_the_default_is_one_shared_arena_without_memory_patterns():
    assert EngineConfig().memory == DEFAULT_DEVICE_MEMORY == "shared+no-pattern"
    config = EngineConfig().session_config()
    assert (config.memory_arena, config.shared_arena, config.arena_shrinkage, config.memory_pattern,
            config.prepacking) == (True, True, False, False, True)


@pytest.mark.parametrize("memory", ["arena+shrink", "shared+shrink"])
def test_a_shrinking_mode_passes_its_run_options_to_every_graph(engines_dir, memory):
    engines = DeviceEngines(EngineConfig(engines_dir=str(engines_dir), memory=memory))
    for graph in (*engines.text.encoders, engines.unet, engines.vae_decoder):
        assert graph.run_options is not None and graph.run_options.get_run_config_entry(SHRINK) == "cpu:0"
    options = engines.unet.session.get_session_options()
    assert options.enable_cpu_mem_arena
    if memory.startswith("shared"):
        assert options.get_session_config_entry("session.use_env_allocators") == "1"


def test_the_default_passes_no_run_options(engines_dir):
    engines = DeviceEngines(EngineConfig(engines_dir=str(engines_dir)))
    assert [g.run_options for g in (*engines.text.encoders, engines.unet, engines.vae_decoder)] == [None] * 3


def _generate(engines_dir, memory: str) -> list:
    pipe = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir), memory=memory)))
    config = GenerationConfig(method=Method.DEVICE_ONLY, num_inference_steps=3, seed=7, height=48, width=64)
    results = [pipe.generate("a red circle", None, config) for _ in range(2)]   # the second run reuses the arena
    return results


@pytest.mark.parametrize("memory", [m for m in MEMORY_MODES if m != DEFAULT_DEVICE_MEMORY])
def test_every_mode_generates_what_the_default_generates(engines_dir, memory):
    want = _generate(engines_dir, DEFAULT_DEVICE_MEMORY)
    got = _generate(engines_dir, memory)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.latent, b.latent, rtol=0, atol=1e-5)
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1


def test_the_flag_parses_and_refuses_an_unknown_mode(capsys):
    p = argparse.ArgumentParser()
    add_generation_flags(p)
    assert p.parse_args(["a red circle"]).engine_memory == DEFAULT_DEVICE_MEMORY
    assert p.parse_args(["a red circle", "--engine-memory", "shared+shrink"]).engine_memory == "shared+shrink"
    with pytest.raises(SystemExit):
        p.parse_args(["a red circle", "--engine-memory", "pooled"])
    assert "invalid choice: 'pooled'" in capsys.readouterr().err


def test_obclip_generate_opens_the_engines_in_the_flags_mode(engines_dir, tmp_path, monkeypatch):
    import obclip.device.generate as generate

    opened = []

    def recording(config: EngineConfig) -> DeviceEngines:
        opened.append(config)
        return DeviceEngines(config)

    monkeypatch.setattr(generate, "DeviceEngines", recording)
    out = tmp_path / "x.png"
    code = generate.main(["a red circle", "--method", "device-only", "--engines", str(engines_dir), "--steps", "2",
                          "--seed", "0", "--engine-memory", "shared+shrink", "--out", str(out)])
    assert code == 0 and out.is_file()
    assert [c.memory for c in opened] == ["shared+shrink"]
