"""Shared fixtures (a small random cloud/device model pair, exported once per session) and the
``gpu`` marker's skip. Shared functions live in tests/helpers.py; tests never import each other."""

from __future__ import annotations

import pytest


def _cuda_missing() -> str | None:
    """Why this machine cannot run the ``gpu`` tests, or None when it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed, so no CUDA device can be found"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    reason = _cuda_missing() if gpu_items else None
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """(cloud_dir, device_dir): SD-structured 'mini' and its BK-SDM-style 'mini-small', random weights."""
    from obclip.cloud.models import write_random_model

    root = tmp_path_factory.mktemp("models")
    return write_random_model("mini", root / "cloud", seed=0), write_random_model("mini-small", root / "device", seed=1)


@pytest.fixture(scope="session")
def engines_dir(model_dirs, tmp_path_factory):
    from obclip.export.device_engines import build_device_engines

    out = tmp_path_factory.mktemp("engines")
    build_device_engines(str(model_dirs[1]), out)
    return out / "device"


@pytest.fixture(scope="session")
def cloud_model(model_dirs):
    from obclip.cloud.models import load_text_to_latent

    return load_text_to_latent(str(model_dirs[0]))


@pytest.fixture(scope="session")
def device_torch_model(model_dirs):
    from obclip.cloud.models import load_text_to_latent

    return load_text_to_latent(str(model_dirs[1]))


@pytest.fixture(scope="session")
def cloud_runner(cloud_model):
    from obclip.cloud.steps import CloudStepRunner

    return CloudStepRunner(cloud_model)


@pytest.fixture(scope="session")
def device_pipeline(engines_dir):
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline

    return DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir))))
