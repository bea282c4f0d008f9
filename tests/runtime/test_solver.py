"""runtime.solver against diffusers' DPMSolverMultistepScheduler (the reference we must match)."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from obclip.runtime.solver import (
    SD14_SOLVER_CONFIG,
    SolverConfig,
    SolverState,
    initial_state,
    make_schedule,
    solver_step,
)

# SD-v1.4's scheduler/scheduler_config.json (a PNDMScheduler config).
SD14_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.7.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (2, 4, 8, 8)
FIELDS = list(SD14_SOLVER_CONFIG.to_dict())


def _pair(T, **overrides):
    """(diffusers scheduler with set_timesteps(T), our config, our schedule) for SD-v1.4 + overrides."""
    cfg = {**SD14_SCHEDULER_CONFIG, **overrides}
    ref = DPMSolverMultistepScheduler.from_config(cfg)
    ref.set_timesteps(T)
    config = SolverConfig.from_scheduler_config(cfg)
    return ref, config, make_schedule(config, T)


def _denoiser(schedule, config, seed):
    """A stand-in UNet whose data prediction depends on the sample, as a real one does.

    x0(x) = the exact posterior mean for data ~ N(mu, I), plus a fixed random
    perturbation per step; returned as epsilon or v, in float32.
    """
    rng = np.random.default_rng(seed)
    mu = rng.standard_normal(SHAPE)
    wiggle = 0.3 * rng.standard_normal((schedule.num_inference_steps, *SHAPE))

    def model(i, x):
        x = np.asarray(x, np.float64)
        a, s = schedule.alpha_t[i], schedule.sigma_t[i]
        x0 = mu + a / (a * a + s * s) * (x - a * mu) + wiggle[i]
        out = (x - a * x0) / s if config.prediction_type == "epsilon" else (a * x - x0) / s
        return out.astype(np.float32)

    return model


def _x_T(seed=0):
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def _ref_run(ref, model, x, start=0, stop=None):
    """diffusers' loop from step `start` to `stop` (the scheduler must be at `start`)."""
    x = torch.from_numpy(np.array(x))
    for i in range(start, len(ref.timesteps) if stop is None else stop):
        x = ref.step(torch.from_numpy(model(i, x.numpy())), ref.timesteps[i], x).prev_sample
    return x.numpy()


def _our_run(schedule, config, model, x, state=None):
    state = initial_state() if state is None else state
    for i in range(state.step_index, schedule.num_inference_steps):
        x, state = solver_step(schedule, config, state, model(i, x), x)
    return x, state


# --- config -----------------------------------------------------------------


def test_sd14_config_is_what_diffusers_builds():
    ref = DPMSolverMultistepScheduler.from_config(SD14_SCHEDULER_CONFIG)
    ours = SolverConfig.from_scheduler_config(SD14_SCHEDULER_CONFIG)
    assert ours == SD14_SOLVER_CONFIG
    assert {f: ref.config[f] for f in FIELDS} == ours.to_dict()
    assert ours.timestep_spacing == "linspace" and ours.steps_offset == 1


def test_missing_keys_take_diffusers_defaults():
    ref = DPMSolverMultistepScheduler()
    assert SolverConfig.from_scheduler_config({}).to_dict() == {f: ref.config[f] for f in FIELDS}


def test_to_dict_is_json_and_round_trips():
    config = SolverConfig(prediction_type="v_prediction", timestep_spacing="trailing", solver_order=1)
    text = json.dumps(config.to_dict())
    assert SolverConfig.from_scheduler_config(json.loads(text)) == config


def test_diffusers_config_with_supported_defaults_is_accepted():
    # A scheduler saved by diffusers lists every option at its default; those must pass.
    full = dict(DPMSolverMultistepScheduler.from_config(SD14_SCHEDULER_CONFIG).config)
    assert SolverConfig.from_scheduler_config(full) == SD14_SOLVER_CONFIG


@pytest.mark.parametrize(
    "key, value",
    [
        ("use_karras_sigmas", True),
        ("thresholding", True),
        ("algorithm_type", "dpmsolver"),
        ("algorithm_type", "sde-dpmsolver++"),
        ("solver_type", "heun"),
        ("trained_betas", [0.1] * 1000),
        ("euler_at_final", True),
        ("use_lu_lambdas", True),
        ("use_exponential_sigmas", True),
        ("use_beta_sigmas", True),
        ("use_flow_sigmas", True),
        ("lambda_min_clipped", -5.1),
        ("variance_type", "learned_range"),
        ("rescale_betas_zero_snr", True),
        ("use_dynamic_shifting", True),
        ("solver_order", 3),
        ("prediction_type", "sample"),
        ("beta_schedule", "squaredcos_cap_v2"),
        ("timestep_spacing", "karras"),
        ("final_sigmas_type", "sigma_max"),
        ("lower_order_final", 1),
    ],
)
def test_unsupported_options_are_rejected_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        SolverConfig.from_scheduler_config({**SD14_SCHEDULER_CONFIG, key: value})


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        SolverConfig(num_train_timesteps=1)
    with pytest.raises(ValueError, match="beta_start"):
        SolverConfig(beta_start="0.1")
    with pytest.raises(ValueError, match="steps_offset"):
        SolverConfig(steps_offset=-1)
    with pytest.raises(ValueError, match="scheduler config must be a mapping"):
        SolverConfig.from_scheduler_config([("beta_start", 0.1)])


# --- schedule ---------------------------------------------------------------

SPOT_CHECKS = [
    {},
    {"prediction_type": "v_prediction"},
    {"timestep_spacing": "leading"},
    {"timestep_spacing": "trailing"},
    {"solver_order": 1},
    {"final_sigmas_type": "sigma_min"},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"lower_order_final": False},
    {"beta_schedule": "linear"},
]


@pytest.mark.parametrize("overrides", SPOT_CHECKS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "sd14")
@pytest.mark.parametrize("T", [1, 2, 5, 10, 14, 15, 25, 50, 500])
def test_schedule_matches_set_timesteps(T, overrides):
    ref, _, schedule = _pair(T, **overrides)
    assert schedule.timesteps.dtype == np.int64 and schedule.sigmas.dtype == np.float64
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())
    # Equal up to torch's float32 pow (its vectorized x**0.5 is not always correctly rounded).
    np.testing.assert_allclose(schedule.sigmas, ref.sigmas.numpy(), rtol=1e-6, atol=0)
    assert schedule.num_inference_steps == T and schedule.sigmas.shape == (T + 1,)


def test_schedule_arrays_are_read_only():
    schedule = make_schedule(SD14_SOLVER_CONFIG, 25)
    with pytest.raises(ValueError):
        schedule.sigmas[0] = 0.0


@pytest.mark.parametrize("T", [0, -1, 1001, 2.0, True])
def test_schedule_rejects_bad_step_counts(T):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_schedule(SD14_SOLVER_CONFIG, T)


def test_schedule_refuses_what_diffusers_would_silently_break():
    # diffusers' trailing spacing yields 62 timesteps (the last -1) for T=61;
    # leading + steps_offset reaches timestep 1000 for T=999; linspace with
    # T=1000 repeats timesteps (zero step size).
    with pytest.raises(ValueError, match="timestep_spacing='trailing' with num_inference_steps=61"):
        make_schedule(SolverConfig(timestep_spacing="trailing"), 61)
    with pytest.raises(ValueError, match=r"in \[2, 1000\]"):
        make_schedule(SolverConfig(timestep_spacing="leading"), 999)
    with pytest.raises(ValueError, match="distinct"):
        make_schedule(SD14_SOLVER_CONFIG, 1000)


# --- full runs --------------------------------------------------------------


@pytest.mark.parametrize("T", [1, 2, 5, 10, 25, 50])
def test_full_run_matches_diffusers(T):
    ref, config, schedule = _pair(T)
    model = _denoiser(schedule, config, seed=T)
    ours, state = _our_run(schedule, config, model, _x_T())
    assert ours.dtype == np.float32
    assert np.abs(ours - _ref_run(ref, model, _x_T())).max() < 1e-5
    assert state.step_index == T and state.lower_order_nums == min(T, 2)


@pytest.mark.parametrize("overrides", SPOT_CHECKS[1:], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("T", [2, 5, 25])
def test_spot_checks_match_diffusers(T, overrides):
    ref, config, schedule = _pair(T, **overrides)
    model = _denoiser(schedule, config, seed=T)
    ours, _ = _our_run(schedule, config, model, _x_T())
    assert np.abs(ours - _ref_run(ref, model, _x_T())).max() < 1e-5


@pytest.mark.parametrize("overrides", [{}, {"prediction_type": "v_prediction"}, {"timestep_spacing": "trailing"}])
@pytest.mark.parametrize("T", [1, 2, 5, 10, 25, 50])
def test_fixed_random_eps_matches_diffusers(T, overrides):
    # Model outputs fixed in advance, independent of the sample. Noise-only eps
    # makes the data predictions large (|x| ~ 60), and diffusers computes in
    # float32, so the agreement is relative to that scale: ~1e-6, bounded at 1e-5.
    ref, config, schedule = _pair(T, **overrides)
    eps = np.random.default_rng(T).standard_normal((T, *SHAPE)).astype(np.float32)
    ours, _ = _our_run(schedule, config, lambda i, x: eps[i], _x_T())
    theirs = _ref_run(ref, lambda i, x: eps[i], _x_T())
    assert np.abs(ours - theirs).max() < 1e-5 * max(1.0, np.abs(theirs).max())


# --- handoff ----------------------------------------------------------------


def _resume_from_diffusers(T, k, keep_state=True):
    """Run diffusers for k steps, hand its state to the numpy solver, finish; compare with diffusers alone."""
    ref, config, schedule = _pair(T)
    model = _denoiser(schedule, config, seed=7)
    full = _ref_run(ref, model, _x_T())

    cloud, _, _ = _pair(T)
    x_k = _ref_run(cloud, model, _x_T(), stop=k)
    if keep_state:
        state = SolverState(cloud.step_index, cloud.lower_order_nums, cloud.model_outputs[-1].numpy())
    else:  # what a handoff without the solver state amounts to: restart the multistep order
        state = SolverState(cloud.step_index, 0, None)
    resumed, _ = _our_run(schedule, config, model, x_k, state)
    return np.abs(resumed - full).max()


@pytest.mark.parametrize("k", [1, 2, 5, 10, 13, 20, 24])
def test_resume_from_diffusers_state_matches_uninterrupted_run(k):
    assert _resume_from_diffusers(25, k) < 1e-5


@pytest.mark.parametrize("k", [5, 10, 13, 20])
def test_dropping_the_state_changes_the_result(k):
    assert _resume_from_diffusers(25, k, keep_state=False) > 1e-3


@pytest.mark.parametrize("k", [0, 1, 5, 10, 25])
def test_split_numpy_run_is_bit_identical(k):
    # cloud k steps -> state through the wire (fp32 copies) -> device T-k steps.
    config, T = SD14_SOLVER_CONFIG, 25
    schedule = make_schedule(config, T)
    model = _denoiser(schedule, config, seed=3)
    single, _ = _our_run(schedule, config, model, _x_T())
    state, x = initial_state(), _x_T()
    for i in range(k):
        x, state = solver_step(schedule, config, state, model(i, x), x)
    wire = SolverState(
        int(state.step_index),
        int(state.lower_order_nums),
        None if state.prev_x0 is None else np.frombuffer(state.prev_x0.astype("<f4").tobytes(), "<f4").reshape(SHAPE),
    )
    split, _ = _our_run(make_schedule(config, T), config, model, np.array(x), wire)
    np.testing.assert_array_equal(split, single)


def test_only_the_final_step_is_first_order_in_2m():
    # diffusers' "second-to-last step lower order" (T < 15) lowers order 3 to 2, so
    # for 2M the second-to-last step still reads prev_x0; the last one does not.
    config, T = SD14_SOLVER_CONFIG, 10
    schedule = make_schedule(config, T)
    x = _x_T()
    eps = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    for i, uses_prev in [(T - 2, True), (T - 1, False)]:
        a = SolverState(i, 2, np.zeros(SHAPE, np.float32))
        b = SolverState(i, 2, np.ones(SHAPE, np.float32))
        out_a, _ = solver_step(schedule, config, a, eps, x)
        out_b, _ = solver_step(schedule, config, b, eps, x)
        assert (not np.array_equal(out_a, out_b)) == uses_prev


# --- step contract ----------------------------------------------------------


def test_step_is_pure_and_keeps_dtype():
    schedule = make_schedule(SD14_SOLVER_CONFIG, 5)
    x = _x_T()
    eps = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    x_copy, eps_copy = x.copy(), eps.copy()
    state = SolverState(1, 1, np.ones(SHAPE, np.float32))
    out1, s1 = solver_step(schedule, SD14_SOLVER_CONFIG, state, eps, x)
    out2, s2 = solver_step(schedule, SD14_SOLVER_CONFIG, state, eps, x)
    np.testing.assert_array_equal(x, x_copy)
    np.testing.assert_array_equal(eps, eps_copy)
    np.testing.assert_array_equal(state.prev_x0, 1.0)
    np.testing.assert_array_equal(out1, out2)
    assert (s1.step_index, s1.lower_order_nums) == (2, 2)
    for dtype, x0_dtype in [(np.float16, np.float32), (np.float32, np.float32), (np.float64, np.float64)]:
        out, s = solver_step(schedule, SD14_SOLVER_CONFIG, initial_state(), eps.astype(dtype), x.astype(dtype))
        assert out.dtype == dtype and s.prev_x0.dtype == x0_dtype


def test_step_errors():
    config = SD14_SOLVER_CONFIG
    schedule = make_schedule(config, 5)
    x = _x_T()
    with pytest.raises(ValueError, match="past the last step"):
        solver_step(schedule, config, SolverState(5, 2, x), x, x)
    with pytest.raises(ValueError, match="shape"):
        solver_step(schedule, config, initial_state(), x[:1], x)
    with pytest.raises(ValueError, match="prev_x0 is None"):
        solver_step(schedule, config, SolverState(2, 2, None), x, x)
    with pytest.raises(ValueError, match="prev_x0 shape"):
        solver_step(schedule, config, SolverState(2, 2, x[:1]), x, x)
    with pytest.raises(ValueError, match="exceeds solver_order"):
        solver_step(schedule, SolverConfig(solver_order=1), SolverState(2, 2, x), x, x)
    with pytest.raises(ValueError, match="exceeds step_index"):
        SolverState(0, 1, x)
    with pytest.raises(ValueError, match="step_index"):
        SolverState(-1, 0, None)
    # A restarted order (lower_order_nums = 0) needs no prev_x0.
    out, state = solver_step(schedule, config, SolverState(2, 0, None), x, x)
    assert state.lower_order_nums == 1 and np.isfinite(out).all()


def test_last_step_to_sigma_zero_returns_the_data_prediction():
    # lambda is +inf at sigma 0; the update must reduce to x0 without NaNs or warnings.
    config = SD14_SOLVER_CONFIG
    schedule = make_schedule(config, 3)
    assert schedule.sigmas[-1] == 0.0 and math.isinf(schedule.lambda_t[-1])
    x = _x_T().astype(np.float64)
    eps = np.random.default_rng(2).standard_normal(SHAPE)
    with np.errstate(all="raise"):
        out, state = solver_step(schedule, config, SolverState(2, 2, np.zeros(SHAPE)), eps, x)
    np.testing.assert_allclose(out, state.prev_x0, rtol=0, atol=1e-12)


# --- LCM --------------------------------------------------------------------

import diffusers.schedulers.scheduling_lcm as diffusers_lcm  # noqa: E402
from diffusers import LCMScheduler  # noqa: E402

from obclip.runtime.noise import step_noise  # noqa: E402
from obclip.runtime.solver import DPM_SOLVER, LCM, LCMConfig, injects_noise, solver_config  # noqa: E402

LCM_FIELDS = list(LCMConfig().to_dict())
# latent-consistency/lcm-sdxl's scheduler/scheduler_config.json, as its model card lists it.
LCM_SDXL_SCHEDULER_CONFIG = {
    "_class_name": "LCMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "clip_sample_range": 1.0, "num_train_timesteps": 1000, "original_inference_steps": 50,
    "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "set_alpha_to_one": True,
    "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0, "timestep_spacing": "leading",
    "trained_betas": None,
}


def _lcm_pair(T, base=SD14_SCHEDULER_CONFIG, **overrides):
    cfg = {**base, **overrides}
    ref = LCMScheduler.from_config(cfg)
    ref.set_timesteps(T)
    config = LCMConfig.from_scheduler_config(cfg)
    return ref, config, make_schedule(config, T)


def _lcm_noise(seed, T):
    """Each step's shared noise, one draw repeated over the rows (as the cloud and the device draw it)."""
    return [np.repeat(step_noise(seed, i, (1, *SHAPE[1:])), SHAPE[0], axis=0) for i in range(T)]


def _lcm_ref_run(ref, model, x, noises, monkeypatch, start=0, stop=None):
    """diffusers' LCMScheduler loop, its injected noise replaced by ours (it draws from torch's generator)."""
    current = {}
    monkeypatch.setattr(diffusers_lcm, "randn_tensor",
                        lambda shape, generator=None, device=None, dtype=None: torch.from_numpy(current["noise"]))
    x = torch.from_numpy(np.array(x))
    for i in range(start, len(ref.timesteps) if stop is None else stop):
        current["noise"] = noises[i]
        x = ref.step(torch.from_numpy(model(i, x.numpy())), ref.timesteps[i], x).prev_sample
    return x.numpy()


def _lcm_our_run(schedule, config, model, x, noises, state=None, stop=None):
    state = initial_state() if state is None else state
    T = schedule.num_inference_steps
    for i in range(state.step_index, T if stop is None else stop):
        noise = noises[i] if injects_noise(LCM, i, T) else None
        x, state = solver_step(schedule, config, state, model(i, x), x, noise)
    return x, state


def test_lcm_config_is_what_diffusers_builds():
    for cfg in (SD14_SCHEDULER_CONFIG, LCM_SDXL_SCHEDULER_CONFIG, {}):
        ref = LCMScheduler.from_config(cfg)
        assert LCMConfig.from_scheduler_config(cfg).to_dict() == {f: ref.config[f] for f in LCM_FIELDS}
    full = dict(LCMScheduler.from_config(LCM_SDXL_SCHEDULER_CONFIG).config)
    assert LCMConfig.from_scheduler_config(full) == LCMConfig()
    assert isinstance(solver_config(LCM, SD14_SCHEDULER_CONFIG), LCMConfig)
    assert solver_config(DPM_SOLVER, SD14_SCHEDULER_CONFIG) == SD14_SOLVER_CONFIG
    with pytest.raises(ValueError, match="unknown solver 'euler'"):
        solver_config("euler", SD14_SCHEDULER_CONFIG)


@pytest.mark.parametrize("key, value", [("thresholding", True), ("clip_sample", True), ("trained_betas", [0.1] * 1000),
                                        ("rescale_betas_zero_snr", True), ("prediction_type", "sample"),
                                        ("beta_schedule", "squaredcos_cap_v2"), ("original_inference_steps", 0),
                                        ("original_inference_steps", 1001), ("timestep_scaling", 0.0),
                                        ("timestep_scaling", True)])
def test_lcm_unsupported_options_are_rejected_by_name(key, value):
    with pytest.raises(ValueError, match=key):
        LCMConfig.from_scheduler_config({**LCM_SDXL_SCHEDULER_CONFIG, key: value})


@pytest.mark.parametrize("overrides", [{}, {"original_inference_steps": 30}, {"original_inference_steps": 1000},
                                       {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "sd14")
@pytest.mark.parametrize("T", [1, 2, 3, 4, 7, 8, 13, 30])
def test_lcm_schedule_matches_set_timesteps(T, overrides):
    ref, _, schedule = _lcm_pair(T, **overrides)
    np.testing.assert_array_equal(schedule.timesteps, ref.timesteps.numpy())
    alphas = ref.alphas_cumprod[ref.timesteps].double().numpy()
    np.testing.assert_allclose(schedule.alpha_t[:-1], np.sqrt(alphas), rtol=1e-12)
    np.testing.assert_allclose(schedule.sigma_t[:-1], np.sqrt(1 - alphas), rtol=1e-12)
    assert (schedule.alpha_t[-1], schedule.sigma_t[-1]) == (1.0, 0.0)
    assert schedule.num_train_timesteps == 1000


def test_lcm_8_step_schedule_is_the_papers():
    # 8 of the 50-step distillation grid 999, 979, ..., 19, evenly spaced by index.
    schedule = make_schedule(LCMConfig(), 8)
    assert schedule.timesteps.tolist() == [999, 879, 759, 639, 499, 379, 259, 139]


def test_lcm_refuses_more_steps_than_its_grid():
    with pytest.raises(ValueError, match="at most 50 steps"):
        make_schedule(LCMConfig(), 51)
    with pytest.raises(ValueError, match="smaller than `num_inference_steps`: 51"):
        LCMScheduler().set_timesteps(51)   # diffusers refuses too


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("T", [1, 2, 4, 8, 13])
def test_lcm_run_matches_diffusers(T, prediction_type, monkeypatch):
    ref, config, schedule = _lcm_pair(T, prediction_type=prediction_type)
    model, noises = _denoiser(schedule, config, seed=T), _lcm_noise(11, T)
    ours, state = _lcm_our_run(schedule, config, model, _x_T(), noises)
    theirs = _lcm_ref_run(ref, model, _x_T(), noises, monkeypatch)
    assert ours.dtype == np.float32
    assert np.abs(ours - theirs).max() < 1e-5 * max(1.0, np.abs(theirs).max())
    assert state.step_index == T and state.lower_order_nums == 0


@pytest.mark.parametrize("T", [2, 8])
def test_lcm_fixed_random_eps_matches_diffusers(T, monkeypatch):
    # Noise-only eps: large data predictions (as in the DPM test above); agreement relative to their scale.
    ref, config, schedule = _lcm_pair(T, base=LCM_SDXL_SCHEDULER_CONFIG)
    eps = np.random.default_rng(T).standard_normal((T, *SHAPE)).astype(np.float32)
    noises = _lcm_noise(3, T)
    ours, _ = _lcm_our_run(schedule, config, lambda i, x: eps[i], _x_T(), noises)
    theirs = _lcm_ref_run(ref, lambda i, x: eps[i], _x_T(), noises, monkeypatch)
    assert np.abs(ours - theirs).max() < 1e-5 * max(1.0, np.abs(theirs).max())


@pytest.mark.parametrize("k", [1, 2, 4, 6, 7])
def test_lcm_resumes_at_the_handoff_from_the_latent_alone(k, monkeypatch):
    """diffusers k steps -> only the latent and the step index cross -> numpy finishes == diffusers alone."""
    T = 8
    ref, config, schedule = _lcm_pair(T)
    model, noises = _denoiser(schedule, config, seed=5), _lcm_noise(21, T)
    full = _lcm_ref_run(ref, model, _x_T(), noises, monkeypatch)
    cloud, _, _ = _lcm_pair(T)
    x_k = _lcm_ref_run(cloud, model, _x_T(), noises, monkeypatch, stop=k)
    resumed, _ = _lcm_our_run(schedule, config, model, x_k, noises, SolverState(k, 0, None))
    assert np.abs(resumed - full).max() < 1e-5 * max(1.0, np.abs(full).max())


@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_lcm_split_numpy_run_is_bit_identical(k):
    T = 8
    config = LCMConfig()
    schedule = make_schedule(config, T)
    model, noises = _denoiser(schedule, config, seed=3), _lcm_noise(8, T)
    single, _ = _lcm_our_run(schedule, config, model, _x_T(), noises)
    x, state = _lcm_our_run(schedule, config, model, _x_T(), noises, stop=k)
    wire = np.frombuffer(np.asarray(x, "<f4").tobytes(), "<f4").reshape(SHAPE)
    split, _ = _lcm_our_run(make_schedule(config, T), config, model, wire, noises, SolverState(k, 0, state.prev_x0))
    np.testing.assert_array_equal(split, single)


def test_lcm_noise_is_injected_on_every_step_but_the_last():
    T = 4
    config = LCMConfig()
    schedule = make_schedule(config, T)
    x = _x_T()
    eps = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    assert [injects_noise(LCM, i, T) for i in range(T)] == [True, True, True, False]
    assert not any(injects_noise(DPM_SOLVER, i, T) for i in range(T))
    with pytest.raises(ValueError, match="injects noise"):
        solver_step(schedule, config, initial_state(), eps, x)
    with pytest.raises(ValueError, match="noise shape"):
        solver_step(schedule, config, initial_state(), eps, x, x[:1])
    with pytest.raises(ValueError, match="injects no noise"):
        solver_step(schedule, config, SolverState(T - 1, 0, None), eps, x, x)
    with pytest.raises(ValueError, match="injects no noise"):
        solver_step(make_schedule(SD14_SOLVER_CONFIG, T), SD14_SOLVER_CONFIG, initial_state(), eps, x, x)
    with pytest.raises(ValueError, match="keeps no multistep memory"):
        solver_step(schedule, config, SolverState(2, 2, x), eps, x, x)
    # The noise enters the next latent at that level; the last step returns the consistency output.
    a, _ = solver_step(schedule, config, initial_state(), eps, x, np.zeros(SHAPE, np.float32))
    b, s = solver_step(schedule, config, initial_state(), eps, x, np.ones(SHAPE, np.float32))
    np.testing.assert_allclose(b - a, schedule.sigma_t[1], rtol=1e-5)
    last, s = solver_step(schedule, config, SolverState(T - 1, 0, None), eps, x)
    np.testing.assert_array_equal(last, s.prev_x0)


def test_model_timestep_adds_the_shift_within_the_trained_range():
    schedule = make_schedule(LCMConfig(), 8)
    assert schedule.model_timestep(4) == 499.0 and schedule.model_timestep(4, 8) == 507.0
    assert schedule.model_timestep(7, -139) == 0.0
    with pytest.raises(ValueError, match="outside the model's trained range"):
        schedule.model_timestep(0, 8)   # 999 + 8
    with pytest.raises(ValueError, match="outside the model's trained range"):
        schedule.model_timestep(7, -140)
