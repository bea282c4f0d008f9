"""The SDXL family split between a cloud and a device: the tiny SDXL cloud + Koala-700m device pair
(random weights, same topology as the full models): the device export, its conditioning, a split run
against the single-process reference, the pair check, and obclip-demo over HTTP."""

import numpy as np
import pytest

from obclip.runtime.errors import InputError

PROMPT = "a photo of an elderly woman wearing glasses"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from obclip.cloud.models import write_random_model

    root = tmp_path_factory.mktemp("sdxl-pair")
    return write_random_model("sdxl-tiny", root / "sdxl", seed=0), write_random_model("koala-700m-tiny",
                                                                                     root / "koala", seed=1)


@pytest.fixture(scope="module")
def koala_engines(pair, tmp_path_factory):
    from obclip.export.device_engines import build_device_engines

    out = tmp_path_factory.mktemp("koala-engines")
    build_device_engines(str(pair[1]), out)
    return out / "device"


@pytest.fixture(scope="module")
def koala_pipeline(koala_engines):
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline

    return DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(koala_engines))))


def test_device_export_has_both_text_encoders_and_the_added_inputs(koala_engines):
    from obclip.runtime.manifest import Manifest

    m = Manifest.load(koala_engines)
    assert m.unet_conditioning().family == "sdxl" and m.tokenizer_2 is not None and m.pad_token_id_2 == 0
    assert m.components["unet"].inputs == ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
    assert "text_embeds" in m.components["text_encoder_2"].outputs
    for name, c in m.components.items():   # each graph against torch on another batch and size
        assert c.check_max_abs_diff <= 1e-4, f"{name}: {c.check_max_abs_diff:.2e}"


def test_device_conditioning_equals_the_torch_models(pair, koala_pipeline):
    from obclip.cloud.models import load_text_to_latent

    lm = load_text_to_latent(str(pair[1]))
    texts = ["", "a photo of an old woman"]
    hidden, added = koala_pipeline.engines.condition(texts, 64, 96, 7.5)
    want_hidden, from_text = lm.encode_texts(texts)
    want = lm.added_inputs(texts, from_text, 64, 96, 7.5)
    assert np.abs(hidden - want_hidden.numpy()).max() <= 1e-5
    assert not hidden[0].any() and not added["text_embeds"][0].any()   # force_zeros_for_empty_prompt
    assert set(added) == set(want) == {"text_embeds", "time_ids"}
    for name in added:
        assert np.abs(added[name] - want[name].numpy()).max() <= 1e-5, name


def test_split_equals_single_process(pair, koala_pipeline):
    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.reference import hybrid_reference_latent
    from obclip.cloud.steps import CloudStepRunner
    from obclip.device.pipeline import GenerationConfig, Method

    cloud, device = load_text_to_latent(str(pair[0])), load_text_to_latent(str(pair[1]))
    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=10, switch_step=4, seed=1234)
    prepared = koala_pipeline.prepare(PROMPT, config)
    assert prepared.request.n == 6 and "elderly" not in " ".join(prepared.request.candidates)
    latent = koala_pipeline.finish(prepared, CloudStepRunner(cloud).handle(prepared.request_bytes), config)
    want = hybrid_reference_latent(
        cloud, device, cloud_prompt=prepared.candidate_set.candidates[prepared.real_index],
        device_prompt=prepared.prompt, seed=prepared.seed, num_inference_steps=10, switch_step=4,
        guidance_scale=7.5, height=prepared.height, width=prepared.width).numpy()
    diff = float(np.abs(latent - want).max())
    print(f"SDXL-tiny cloud + Koala-700m-tiny device, T=10 k=4: split vs single process max abs diff {diff:.2e}")
    assert diff <= 1e-3, f"split run differs from the single-process run by {diff:.2e}"


def test_a_cloud_of_another_family_is_refused(koala_engines):
    from obclip.app.pairing import check_pair, pair_mismatches
    from obclip.cloud.models import default_models
    from obclip.runtime.manifest import Manifest
    from obclip.runtime.solver import DPM_SOLVER

    device = Manifest.load(koala_engines)
    sd_cloud = default_models()[0]
    problems = pair_mismatches(sd_cloud, device, DPM_SOLVER)
    assert any(p.startswith("model family") for p in problems)
    assert any(p.startswith("VAE") for p in problems) and any(p.startswith("scheduler") for p in problems)
    with pytest.raises(InputError, match="are not a pair: model family: the cloud model is sd"):
        check_pair(sd_cloud, device, DPM_SOLVER)


def test_the_sdxl_pair_is_a_pair(pair, koala_engines):
    from obclip.app.pairing import pair_mismatches
    from obclip.runtime.manifest import Manifest

    assert pair_mismatches(pair[0], Manifest.load(koala_engines), "dpmsolver++") == []


def test_demo_runs_one_private_request_over_http(pair, tmp_path, monkeypatch, capsys):
    from obclip.app.demo import main

    monkeypatch.setenv("OBCLIP_HOME", str(tmp_path / "home"))
    out = tmp_path / "out.png"
    rc = main([PROMPT, "--cloud-model", str(pair[0]), "--device-model", str(pair[1]), "--steps", "6", "-k", "3",
               "--seed", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert out.is_file() and "the server received 6 candidate(s)" in printed.out
    assert "elderly" not in printed.out.split("the server received")[1].split("time:")[0]
