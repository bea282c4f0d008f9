"""The generation flags every command shares (device/cli.py): what GenerationConfig they make."""

from __future__ import annotations

import argparse

import pytest

from obclip.device.cli import add_generation_flags, generation_config
from obclip.runtime.errors import InputError
from obclip.runtime.plan import SkipVariant, preset


def config_of(*argv: str):
    p = argparse.ArgumentParser()
    add_generation_flags(p)
    return generation_config(p.parse_args(["a red circle", *argv]))


def test_skip_variant_changes_only_the_presets_skip_steps():
    plain = config_of("--acceleration", "paper-lcm-k4", "--solver", "lcm")
    deep = config_of("--acceleration", "paper-lcm-k4", "--solver", "lcm", "--skip-variant", "deepcache")
    assert plain.acceleration == preset("paper-lcm-k4")
    assert plain.acceleration.skip_variant is SkipVariant.FASTER_DIFFUSION
    assert deep.acceleration.skip_variant is SkipVariant.DEEPCACHE
    assert deep.acceleration.to_dict() == {**plain.acceleration.to_dict(), "skip_variant": "deepcache"}


def test_skip_variant_without_a_preset_is_refused_with_the_fix():
    with pytest.raises(InputError, match="--acceleration"):
        config_of("--skip-variant", "deepcache")
