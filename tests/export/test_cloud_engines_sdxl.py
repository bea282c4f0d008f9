"""Cloud engines for the SDXL family: the tiny SDXL and LCM-SDXL models (random weights, the full
topologies at 32-64 channels) exported to ONNX (export/cloud_engines.py) and served by onnxruntime
(cloud/engine_backend.py) against the torch backend; SD exports keep their graphs."""

from __future__ import annotations

import numpy as np
import pytest

from obclip.cloud.modes import ModeSpec, plan_specs
from obclip.runtime.errors import InputError
from obclip.runtime.manifest import Manifest
from obclip.runtime.plan import AccelerationConfig, StepMode, preset
from obclip.runtime.protocol import StepsRequest

# Tracing the tiny SDXL's batch-reuse graphs takes about a minute each on 2 shared cores.
pytestmark = pytest.mark.slow

EXTRAS = preset("paper-k5").replace(cross_kv_once=True, merge_step0_uncond=True)
CONFIGS = {"none-k5": None, "paper-k5": preset("paper-k5"), "paper-k5+extras": EXTRAS,
           "deepcache": preset("paper-k5").replace(skip_variant="deepcache")}
LCM_CONFIGS = {"none-k4": None, "paper-lcm-k4": preset("paper-lcm-k4")}
CANDIDATES = ("a photo of an old man", "a photo of a middle-aged man", "a photo of a young man")


def _specs(configs, k: int) -> list[ModeSpec]:
    out: list[ModeSpec] = []
    for c in configs.values():
        for s in plan_specs(c, k):
            if s not in out:
                out.append(s)
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(1.0, float(np.abs(b).max())))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from obclip.cloud.models import write_random_model

    root = tmp_path_factory.mktemp("sdxl-cloud")
    return {"sdxl": write_random_model("sdxl-tiny", root / "sdxl", seed=0),
            "lcm": write_random_model("lcm-sdxl-tiny", root / "lcm", seed=2)}


@pytest.fixture(scope="module")
def sdxl_engines(models, tmp_path_factory):
    from obclip.export.cloud_engines import build_cloud_engines

    out = tmp_path_factory.mktemp("sdxl-engines")
    build_cloud_engines(str(models["sdxl"]), out, modes=_specs(CONFIGS, 5))
    return out / "cloud"


@pytest.fixture(scope="module")
def lcm_engines(models, tmp_path_factory):
    from obclip.export.cloud_engines import build_cloud_engines

    out = tmp_path_factory.mktemp("lcm-engines")
    build_cloud_engines(str(models["lcm"]), out, modes=_specs(LCM_CONFIGS, 4))
    return out / "cloud"


def _runners(model_dir, engines):
    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.steps import CloudStepRunner

    return CloudStepRunner(load_text_to_latent(str(model_dir))), CloudStepRunner(engine=OrtEngine(engines))


@pytest.fixture(scope="module")
def sdxl_runners(models, sdxl_engines):
    return _runners(models["sdxl"], sdxl_engines)


@pytest.fixture(scope="module")
def lcm_runners(models, lcm_engines):
    return _runners(models["lcm"], lcm_engines)


def test_the_manifest_records_the_family_and_both_text_encoders(sdxl_engines):
    m = Manifest.load(sdxl_engines)
    cond = m.unet_conditioning()
    assert (cond.family, cond.pooled_dim, cond.guided, cond.zero_uncond) == ("sdxl", 32, True, True)
    assert m.tokenizer_2 is not None and (sdxl_engines / m.tokenizer_2).is_file() and m.pad_token_id_2 == 0
    assert "text_embeds" in m.components["text_encoder_2"].outputs
    assert set(m.modes) == {s.name for s in _specs(CONFIGS, 5)}
    for info in m.modes.values():   # every mode graph takes the added inputs after the text
        inputs = m.components[info["component"]].inputs
        assert inputs[:5] == ("sample", "timestep", "text", "text_embeds", "time_ids"), inputs
    for name, c in m.components.items():   # each graph against torch at another N and size
        assert c.check_max_abs_diff <= 1e-4, f"{name}: {c.check_max_abs_diff:.2e}"
    assert int(m.source["text_dim"]) == 64   # both encoders' 32-d hidden states side by side


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnxruntime_handoff_equals_torch_on_sdxl(sdxl_runners, name):
    """Text encoders, every step mode with text_embeds and time_ids, the numpy solver: against torch."""
    torch_runner, ort_runner = sdxl_runners
    request = StepsRequest(CANDIDATES, 7, 10, 5, 7.5, 64, 96, acceleration=CONFIGS[name])
    want, got = torch_runner.run(request), ort_runner.run(request)
    assert (got.lower_order_nums, got.step_index, got.timesteps) == (want.lower_order_nums, want.step_index,
                                                                     want.timesteps)
    d_lat, d_x0 = _rel(got.latents, want.latents), _rel(got.prev_x0, want.prev_x0)
    print(f"sdxl-tiny {name}: onnxruntime vs torch handoff latents {d_lat:.2e}, prev_x0 {d_x0:.2e}")
    assert d_lat <= 1e-4 and d_x0 <= 1e-4


def test_onnxruntime_negative_prompt_matches_torch_on_sdxl(sdxl_runners):
    """A negative prompt is encoded (hidden states and pooled) instead of the zeroed empty prompt."""
    torch_runner, ort_runner = sdxl_runners
    request = StepsRequest(CANDIDATES, 7, 10, 5, 7.5, 64, 64, acceleration=EXTRAS, negative_prompt="blurry")
    want, got = torch_runner.run(request), ort_runner.run(request)
    assert _rel(got.latents, want.latents) <= 1e-4 and _rel(got.prev_x0, want.prev_x0) <= 1e-4
    plain = ort_runner.run(StepsRequest(CANDIDATES, 7, 10, 5, 7.5, 64, 64, acceleration=EXTRAS))
    assert _rel(plain.latents, got.latents) > 1e-4   # it changes the result


@pytest.mark.parametrize("name", list(LCM_CONFIGS))
def test_onnxruntime_handoff_equals_torch_on_lcm_sdxl(lcm_runners, name):
    """LCM-SDXL: the guidance embedding (timestep_cond) fed from runtime.conditioning, conditional rows
    only, the LCM solver with the request's shared step noise."""
    torch_runner, ort_runner = lcm_runners
    request = StepsRequest(CANDIDATES[:2], 7, 8, 4, 7.5, 64, 64, acceleration=LCM_CONFIGS[name], solver="lcm")
    want, got = torch_runner.run(request), ort_runner.run(request)
    assert want.timesteps == got.timesteps and got.step_index == want.step_index == 4
    d_lat, d_x0 = _rel(got.latents, want.latents), _rel(got.prev_x0, want.prev_x0)
    print(f"lcm-sdxl-tiny {name}: onnxruntime vs torch handoff latents {d_lat:.2e}, prev_x0 {d_x0:.2e}")
    assert d_lat <= 1e-4 and d_x0 <= 1e-4


def test_lcm_engines_take_the_guidance_embedding_and_have_no_unconditional_modes(lcm_engines):
    from obclip.export.cloud_engines import export_specs, runs_unguided

    m = Manifest.load(lcm_engines)
    assert m.unet_conditioning().guidance_embed_dim == 16 and not m.unet_conditioning().guided
    for info in m.modes.values():
        assert "timestep_cond" in m.components[info["component"]].inputs
    # the default export of a guidance-embedding UNet leaves out what it cannot run
    specs = export_specs("presets", guided=False)
    assert specs and all(runs_unguided(s) for s in specs)
    assert len(specs) < len(export_specs("presets"))
    assert not any(s.merged or s.frozen_guidance or s.mode is StepMode.PIVOT for s in specs)


def test_what_the_lcm_graphs_cannot_run_is_refused(models, lcm_runners, tmp_path):
    from obclip.export.cloud_engines import build_cloud_engines

    merged = _specs({"extras": AccelerationConfig.none(4).replace(merge_step0_uncond=True)}, 4)
    with pytest.raises(InputError, match="guidance-embedding UNet .* cannot be exported"):
        build_cloud_engines(str(models["lcm"]), tmp_path, modes=merged)
    assert not (tmp_path / "cloud").exists()
    _, ort_runner = lcm_runners
    with pytest.raises(InputError, match="negative prompt would change nothing"):
        ort_runner.run(StepsRequest(CANDIDATES[:2], 7, 8, 4, 7.5, 64, 64, solver="lcm", negative_prompt="blurry"))


def test_sd_mode_graphs_are_unchanged(model_dirs, tmp_path):
    """An SD export: one text encoder, no second tokenizer, mode graphs with the SD inputs only."""
    from obclip.export.cloud_engines import build_cloud_engines

    m = build_cloud_engines(str(model_dirs[0]), tmp_path, modes=[ModeSpec(StepMode.FULL), ModeSpec(StepMode.REUSE)])
    assert m.unet_conditioning().family == "sd" and m.tokenizer_2 is None and "text_encoder_2" not in m.components
    assert m.components["unet/full"].inputs == ("sample", "timestep", "text", "guidance_scale")
    assert m.components["unet/reuse"].inputs == ("sample", "timestep", "text", "guidance_scale", "align_starts",
                                                 "align_stops", "align_weights")
    assert m.components["text_encoder"].outputs == ("last_hidden_state", "pooler_output")
