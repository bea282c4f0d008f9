"""The SDXL family split between a cloud and a device: the tiny SDXL (and LCM-SDXL) cloud + Koala-700m
device pairs (random weights, same topology as the full models): the device export, its conditioning,
split runs against the single-process reference (plain, a named preset, LCM with the device timestep
shift; torch and onnxruntime cloud backends), the pair check, and obclip-demo over HTTP."""

import numpy as np
import pytest
import torch

from obclip.runtime.errors import InputError
from obclip.runtime.plan import make_plan, preset
from obclip.runtime.solver import DPM_SOLVER, LCM

PROMPT = "a photo of an elderly woman wearing glasses"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from obclip.cloud.models import write_random_model

    root = tmp_path_factory.mktemp("sdxl-pair")
    return write_random_model("sdxl-tiny", root / "sdxl", seed=0), write_random_model("koala-700m-tiny",
                                                                                     root / "koala", seed=1)


@pytest.fixture(scope="module")
def lcm_dir(tmp_path_factory):
    from obclip.cloud.models import write_random_model

    return write_random_model("lcm-sdxl-tiny", tmp_path_factory.mktemp("lcm-sdxl") / "lcm-sdxl", seed=2)


def _cloud_runners(model_dir, configs, steps, out):
    """{"torch": the torch backend, "onnxruntime": the graphs of the configs' step modes} for one cloud model."""
    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.modes import plan_specs
    from obclip.cloud.steps import CloudStepRunner
    from obclip.export.cloud_engines import build_cloud_engines

    specs = []
    for c in configs:
        specs += [s for s in plan_specs(c, c.switch_step if c is not None else steps) if s not in specs]
    build_cloud_engines(str(model_dir), out, modes=specs)
    return {"torch": CloudStepRunner(load_text_to_latent(str(model_dir))),
            "onnxruntime": CloudStepRunner(engine=OrtEngine(out / "cloud"))}


@pytest.fixture(scope="module")
def sdxl_runners(pair, tmp_path_factory):
    return _cloud_runners(pair[0], [preset("paper-k10")], 10, tmp_path_factory.mktemp("sdxl-cloud-engines"))


@pytest.fixture(scope="module")
def lcm_runners(lcm_dir, tmp_path_factory):
    return _cloud_runners(lcm_dir, [None], 4, tmp_path_factory.mktemp("lcm-cloud-engines"))


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


def device_half_reference(device, result, real: int, prompt: str, *, seed: int, steps: int, k: int,
                          solver: str = DPM_SOLVER, shift: int = 0, guidance_scale: float = 7.5,
                          height: int, width: int) -> np.ndarray:
    """The single-process run's device half in torch: diffusers' scheduler restored from the cloud's
    state after step k-1 (the real candidate's latent and data prediction, ``CloudResult``), the
    device UNet through diffusers' forward on steps k..T-1 (``reference.hybrid_reference_latent``'s loop)."""
    from obclip.cloud.reference import reference_eps
    from obclip.cloud.torch_backend import make_scheduler
    from obclip.runtime.noise import step_noise
    from obclip.runtime.solver import injects_noise

    scheduler = make_scheduler(device, steps, solver)
    scheduler._step_index = k
    if solver == DPM_SOLVER:
        order = int(scheduler.config.solver_order)
        scheduler.model_outputs = [None] * (order - 1) + [torch.from_numpy(result.prev_x0[real:real + 1])]
        scheduler.lower_order_nums = result.lower_order_nums
    x = torch.from_numpy(result.latents[real:real + 1])
    emb, from_text = device.encode_texts(["", prompt])
    added = device.added_inputs(["", prompt], from_text, height, width, guidance_scale)
    shape = tuple(x.shape)
    with torch.no_grad():
        for step in make_plan(steps, k, solver=solver, device_timestep_shift=shift).steps[k:]:
            t = scheduler.timesteps[step.index]
            eps = reference_eps(device, x, t + step.timestep_shift, emb, added, guidance_scale)
            out = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(0))
            x = out.prev_sample
            if injects_noise(solver, step.index, steps):
                alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps[step.index + 1]]
                noise = torch.from_numpy(step_noise(seed, step.index, shape))
                x = alpha_bar.sqrt() * out.denoised + (1 - alpha_bar).sqrt() * noise
    return x.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_a_preset_through_the_split_equals_single_process(pair, koala_pipeline, sdxl_runners, backend):
    """paper-k10 on SDXL-tiny + Koala-700m-tiny: the split (the cloud's accelerated steps on the backend, the
    handoff bytes, the device's ONNX UNet and numpy solver) == one torch process (the same accelerated
    steps, then diffusers' scheduler and the device UNet), and the onnxruntime handoff == torch's."""
    from obclip.cloud.models import load_text_to_latent
    from obclip.device.pipeline import GenerationConfig

    steps, k = 14, 10
    config = GenerationConfig(num_inference_steps=steps, acceleration=preset("paper-k10"), seed=1234)
    prepared = koala_pipeline.prepare(PROMPT, config)
    runner = sdxl_runners[backend]
    latent = koala_pipeline.finish(prepared, runner.handle(prepared.request_bytes), config)
    torch_result = sdxl_runners["torch"].run(prepared.request)
    got = runner.run(prepared.request)
    handoff_diff = float(np.abs(got.latents - torch_result.latents).max())
    want = device_half_reference(load_text_to_latent(str(pair[1])), torch_result, prepared.real_index,
                                 prepared.prompt, seed=prepared.seed, steps=steps, k=k, height=prepared.height,
                                 width=prepared.width)
    diff = float(np.abs(latent - want).max())
    print(f"SDXL-tiny + Koala-700m-tiny paper-k10 T={steps}, {backend} cloud: handoff vs torch {handoff_diff:.2e}, "
          f"split vs single process {diff:.2e}")
    assert handoff_diff <= 1e-4
    assert diff <= 1e-3, f"split run differs from the single-process run by {diff:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_lcm_sdxl_cloud_koala_device_split_equals_single_process(lcm_dir, pair, koala_pipeline, lcm_runners,
                                                                 backend):
    """The paper's LCM setting on the tiny pair: LCM-SDXL cloud (guidance embedding, conditional rows only)
    for k = 4 of T = 8 LCM steps, the Koala device (classifier-free guided) for the rest at t + 8."""
    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.reference import hybrid_reference_latent
    from obclip.device.pipeline import GenerationConfig

    config = GenerationConfig(num_inference_steps=8, switch_step=4, solver=LCM, device_timestep_shift=8, seed=99)
    prepared = koala_pipeline.prepare(PROMPT, config)
    latent = koala_pipeline.finish(prepared, lcm_runners[backend].handle(prepared.request_bytes), config)
    want = hybrid_reference_latent(
        load_text_to_latent(str(lcm_dir)), load_text_to_latent(str(pair[1])),
        cloud_prompt=prepared.candidate_set.candidates[prepared.real_index], device_prompt=prepared.prompt,
        seed=prepared.seed, num_inference_steps=8, switch_step=4, guidance_scale=7.5, height=prepared.height,
        width=prepared.width, solver=LCM, device_timestep_shift=8).numpy()
    diff = float(np.abs(latent - want).max())
    print(f"LCM-SDXL-tiny + Koala-700m-tiny T=8 k=4 dt=8, {backend} cloud: split vs single process {diff:.2e}")
    assert diff <= 1e-3, f"split run differs from the single-process run by {diff:.2e}"


@pytest.mark.slow
def test_demo_runs_lcm_sdxl_with_koala_over_http(lcm_dir, pair, tmp_path, monkeypatch, capsys):
    from obclip.app.demo import main

    monkeypatch.setenv("OBCLIP_HOME", str(tmp_path / "home"))
    out = tmp_path / "out.png"
    rc = main([PROMPT, "--cloud-model", str(lcm_dir), "--device-model", str(pair[1]), "--solver", "lcm",
               "--steps", "8", "-k", "4", "--device-timestep-shift", "8", "--seed", "1", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    assert out.is_file() and "the server received 6 candidate(s)" in printed.out
    assert "elderly" not in printed.out.split("the server received")[1].split("time:")[0]
