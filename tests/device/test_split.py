"""Split equivalence: cloud k steps (torch) -> wire bytes -> device T-k steps
(numpy + onnxruntime) == one in-process torch run that swaps the UNet at k."""

import numpy as np
import pytest

import obclip.device.pipeline as pipeline_module
import obclip.runtime.denoise as denoise_module
from obclip.cloud.reference import hybrid_reference_latent
from obclip.device.pipeline import GenerationConfig, Method
from obclip.runtime.errors import InputError
from obclip.runtime.noise import step_noise
from obclip.runtime.plan import LCM_PAPER_STEPS
from obclip.runtime.protocol import decode_handoff
from obclip.runtime.solver import DPM_SOLVER, LCM, SolverState

PROMPT = "a photo of an elderly woman wearing glasses"   # typed wording; the cloud sees "old"
T = 25


def split_latent(device_pipeline, cloud_runner, config, prompt=PROMPT):
    prepared = device_pipeline.prepare(prompt, config)
    handoff = None if prepared.request is None else cloud_runner.handle(prepared.request_bytes)
    return prepared, handoff, device_pipeline.finish(prepared, handoff, config)


def reference(cloud_model, device_torch_model, prepared, k, solver=DPM_SOLVER, steps=T, shift=0):
    cloud_prompt = prepared.candidate_set.candidates[prepared.real_index]
    return hybrid_reference_latent(
        cloud_model, device_torch_model, cloud_prompt=cloud_prompt, device_prompt=prepared.prompt,
        seed=prepared.seed, num_inference_steps=steps, switch_step=k, guidance_scale=7.5,
        height=prepared.height, width=prepared.width, solver=solver, device_timestep_shift=shift).numpy()


@pytest.mark.parametrize("k", [0, pytest.param(5, marks=pytest.mark.slow), 10,
                               pytest.param(25, marks=pytest.mark.slow)])
def test_split_equals_single_process(k, device_pipeline, cloud_runner, cloud_model, device_torch_model):
    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=T, switch_step=k, seed=1234)
    prepared, _, latent = split_latent(device_pipeline, cloud_runner, config)
    if k > 0:
        assert prepared.request.n == 2 * 3  # gender x age
        assert "elderly" not in " ".join(prepared.request.candidates)
        handoff = decode_handoff(cloud_runner.handle(prepared.request_bytes), prepared.request,
                                 device_pipeline.engines.latent_shape(prepared.height, prepared.width))
        assert handoff.step_index == k and handoff.lower_order_nums == min(k, 2)
    want = reference(cloud_model, device_torch_model, prepared, k)
    diff = float(np.abs(latent - want).max())
    assert diff <= 1e-3, f"k={k}: split run differs from the single-process run by {diff:.2e}"


@pytest.mark.parametrize("k", [5, 10])
def test_dropping_the_solver_state_is_visible(k, device_pipeline, cloud_runner, cloud_model, device_torch_model,
                                             monkeypatch):
    """Resuming without the carried data prediction must move the result a lot,
    so the state can never be dropped silently."""
    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=T, switch_step=k, seed=1234)
    prepared, handoff, latent = split_latent(device_pipeline, cloud_runner, config)
    want = reference(cloud_model, device_torch_model, prepared, k)

    # Same handoff, but the device forgets the solver's memory (a first-order restart).
    monkeypatch.setattr(pipeline_module, "SolverState",
                        lambda step_index, lower_order_nums, prev_x0: SolverState(step_index, 0, None))
    stateless = device_pipeline.finish(prepared, handoff, config)
    assert float(np.abs(latent - want).max()) <= 1e-3
    assert float(np.abs(stateless - want).max()) > 1e-2


def test_fp16_wire_effect_is_small_and_measured(device_pipeline, cloud_runner):
    c32 = GenerationConfig(num_inference_steps=T, switch_step=10, seed=99)
    c16 = GenerationConfig(num_inference_steps=T, switch_step=10, seed=99, wire_dtype="float16")
    p32, h32, l32 = split_latent(device_pipeline, cloud_runner, c32)
    p16, h16, l16 = split_latent(device_pipeline, cloud_runner, c16)
    n = p32.request.n
    assert len(h32) - len(h16) == 2 * n * l32.size * 2  # latents + state, 2 bytes saved per value
    img32 = device_pipeline.engines.decode(l32).astype(np.float64)
    img16 = device_pipeline.engines.decode(l16).astype(np.float64)
    latent_diff = float(np.abs(l32 - l16).max())
    mse = float(((img32 - img16) ** 2).mean())
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    print(f"fp16 wire: final latent max abs diff {latent_diff:.2e}, image PSNR {psnr:.1f} dB vs fp32")
    assert 0 < latent_diff < 5e-2
    assert psnr > 35



# LCM (T = 8, the paper's LCM-SDXL setting) and the device timestep shift dt, for both solvers.
SOLVER_CASES = [(LCM, LCM_PAPER_STEPS, k, 0) for k in (0, 2, 4, 8)] + [
    (LCM, LCM_PAPER_STEPS, 4, 8), (LCM, LCM_PAPER_STEPS, 1, 8), (DPM_SOLVER, T, 10, 8), (DPM_SOLVER, T, 5, -8)]


@pytest.mark.parametrize("solver, steps, k, shift", SOLVER_CASES)
def test_split_equals_single_process_for_each_solver(solver, steps, k, shift, device_pipeline, cloud_runner,
                                                     cloud_model, device_torch_model):
    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=steps, switch_step=k, seed=1234,
                              solver=solver, device_timestep_shift=shift)
    prepared, handoff, latent = split_latent(device_pipeline, cloud_runner, config)
    if k > 0:
        assert prepared.request.solver == solver and prepared.request.device_timestep_shift == shift
        decoded = decode_handoff(handoff, prepared.request,
                                 device_pipeline.engines.latent_shape(prepared.height, prepared.width))
        assert decoded.lower_order_nums == (0 if solver == LCM else min(k, 2))
    want = reference(cloud_model, device_torch_model, prepared, k, solver, steps, shift)
    diff = float(np.abs(latent - want).max())
    assert diff <= 1e-3, f"{solver} T={steps} k={k} dt={shift}: split differs from the single process by {diff:.2e}"
    if shift and k < steps:  # the shift is applied: the unshifted reference is elsewhere
        unshifted = reference(cloud_model, device_torch_model, prepared, k, solver, steps, 0)
        moved = float(np.abs(latent - unshifted).max())
        print(f"{solver} k={k}: dt={shift} moves the final latent by {moved:.2e} (max abs)")
        assert moved > 10 * max(diff, 1e-5)


@pytest.mark.parametrize("k", [2, 4])
def test_lcm_device_noise_must_be_the_clouds(k, device_pipeline, cloud_runner, cloud_model, device_torch_model,
                                             monkeypatch):
    """The device draws the noise of its own LCM steps from the request's seed; noise from any other
    stream moves the result a lot, so the split check above would catch a device drawing its own."""
    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=LCM_PAPER_STEPS, switch_step=k, seed=1234,
                              solver=LCM)
    prepared, handoff, _ = split_latent(device_pipeline, cloud_runner, config)
    want = reference(cloud_model, device_torch_model, prepared, k, LCM, LCM_PAPER_STEPS)
    monkeypatch.setattr(denoise_module, "step_noise", lambda seed, i, shape: step_noise(seed + 1, i, shape))
    other = device_pipeline.finish(prepared, handoff, config)
    assert float(np.abs(other - want).max()) > 1e-1


def test_shift_out_of_the_trained_range_is_refused_before_sending(device_pipeline):
    # dt = -999 moves every device step's timestep below 0.
    config = GenerationConfig(num_inference_steps=LCM_PAPER_STEPS, switch_step=4, seed=1, solver=LCM,
                              device_timestep_shift=-999)
    with pytest.raises(InputError, match="outside the model's trained range"):
        device_pipeline.prepare(PROMPT, config)
    # With no cloud steps there is no switch to bridge: a shift is refused, not silently dropped.
    with pytest.raises(InputError, match="no cloud steps"):
        GenerationConfig(method=Method.DEVICE_ONLY, num_inference_steps=LCM_PAPER_STEPS, solver=LCM,
                         device_timestep_shift=8)
    with pytest.raises(InputError, match="at most 50 steps"):
        device_pipeline.prepare(PROMPT, GenerationConfig(num_inference_steps=51, switch_step=5, solver=LCM))
