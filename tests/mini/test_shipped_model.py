"""The shipped ObCLIP-Mini pair (src/obclip/models/obclip-mini) draws what it is asked for.

End to end as the main job runs it, minus HTTP: the device pipeline (ONNX
engines exported from the shipped device model) and the cloud step runner on
the shipped cloud model, the shapes schema (18 candidates per request), then
mini/analyser.py reads the colour of the PNG-ready image. Fixed seeds, so
each case is deterministic; the quality benchmark (benchmarks/quality.py)
measures the rates over held-out prompts.
"""

from __future__ import annotations

import json

import pytest

from obclip.cloud.models import DEFAULT_MODELS_DIR

SCHEMA = "shapes"
# One prompt per colour, the shapes in turn: 6 requests, every colour and shape asked for.
PROMPTS = [(colour, shape) for colour, shape in zip(("red", "green", "blue", "yellow", "purple", "orange"),
                                                   ("circle", "square", "triangle") * 2)]
# Measured when ObCLIP-Mini v2 was packaged: 6 of 6 drawn in the prompted colour and shape at seed 0
# (held-out rate 96.7% "both", MODEL_CARD.md). A weaker retrain fails here.
MIN_RIGHT = 6


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    from obclip.cloud.models import default_models, load_text_to_latent
    from obclip.cloud.steps import CloudStepRunner
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline
    from obclip.export.device_engines import ensure_engines

    cloud_dir, device_dir = default_models()
    engines = ensure_engines(str(device_dir), tmp_path_factory.mktemp("shipped-engines"))
    return DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines)))), \
        CloudStepRunner(load_text_to_latent(str(cloud_dir)))


def test_the_pair_ships_trained_weights_within_the_size_budget():
    total = 0
    for role in ("cloud", "device"):
        info = json.loads((DEFAULT_MODELS_DIR / role / "obclip_model.json").read_text())
        assert info["weights"] == "trained", info
        total += sum(p.stat().st_size for p in (DEFAULT_MODELS_DIR / role).rglob("*") if p.is_file())
    assert total <= 40e6, f"the shipped pair is {total / 1e6:.1f} MB, over the 40 MB budget"
    assert (DEFAULT_MODELS_DIR / "MODEL_CARD.md").is_file()


@pytest.mark.slow
def test_obclip_images_have_the_prompted_colour_and_shape(shipped):
    from mini.analyser import analyse
    from obclip.device.oblivious import TransformConfig
    from obclip.device.pipeline import GenerationConfig

    pipeline, runner = shipped
    config = GenerationConfig(seed=0, switch_step=10, transform=TransformConfig(schema_path=SCHEMA))
    got = {}
    for colour, shape in PROMPTS:
        result = pipeline.generate(f"a large {colour} {shape} on a white background", runner.handle, config)
        assert result.prepared.request.n == 18  # 6 colours x 3 shapes: the server cannot tell
        seen = analyse(result.image)
        got[(colour, shape)] = (seen.colour, seen.shape)
    right = [want for want, seen in got.items() if seen == want]
    assert len(right) >= MIN_RIGHT, f"prompted -> drawn (colour, shape): {got}"


@pytest.mark.parametrize("prompt, seed, guidance, k, acceleration", [
    # Honest answers the device once refused (prev_x0 above a fixed 4.5 bound): the last held-out
    # prompt with the paper preset at k = 5 (7.0), and high guidance at k = 5 (8.0).
    ("a small green triangle on a black background", 1234 + 119, 7.5, 5, "paper-k5"),
    ("a picture of a large green triangle", 1234, 15.0, 5, None),
])
def test_honest_answers_pass_verification(shipped, prompt, seed, guidance, k, acceleration):
    from obclip.device.oblivious import TransformConfig
    from obclip.device.pipeline import GenerationConfig
    from obclip.runtime.plan import preset

    pipeline, runner = shipped
    config = GenerationConfig(seed=seed, switch_step=k, guidance_scale=guidance,
                              acceleration=preset(acceleration) if acceleration else None,
                              transform=TransformConfig(schema_path=SCHEMA))
    result = pipeline.generate(prompt, runner.handle, config)
    assert result.prepared.request.n == 18
