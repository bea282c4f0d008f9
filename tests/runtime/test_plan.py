"""runtime.plan (which step runs where) and runtime.noise (the shared z_T)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from obclip.runtime.noise import initial_noise
from obclip.runtime.plan import CLOUD, DEVICE, StepMode, make_plan

# --- plan -------------------------------------------------------------------


@given(st.integers(1, 200).flatmap(lambda t: st.tuples(st.just(t), st.integers(0, t))))
def test_plan_splits_at_k(tk):
    t, k = tk
    plan = make_plan(t, k)
    assert (plan.num_inference_steps, plan.switch_step) == (t, k)
    assert [s.index for s in plan.steps] == list(range(t))
    assert [s.index for s in plan.cloud_steps] == list(range(k))
    assert [s.index for s in plan.device_steps] == list(range(k, t))
    assert all(s.side == CLOUD for s in plan.cloud_steps) and all(s.side == DEVICE for s in plan.device_steps)
    assert all(s.mode is StepMode.FULL for s in plan.steps)


def test_plan_extremes_and_paper_setting():
    assert make_plan(25, 0).cloud_steps == ()  # device-only: nothing goes to the server
    assert make_plan(25, 25).device_steps == ()  # cloud-only
    plan = make_plan(25, 10)
    assert len(plan.cloud_steps) == 10 and plan.device_steps[0].index == 10
    assert StepMode("full") is StepMode.FULL and StepMode.FULL == "full"


def test_plan_is_immutable_and_hashable():
    plan = make_plan(5, 2)
    assert plan == make_plan(5, 2) and hash(plan) == hash(make_plan(5, 2))
    with pytest.raises(AttributeError):
        plan.switch_step = 3


@pytest.mark.parametrize(
    "t, k, message",
    [
        (0, 0, "num_inference_steps must be >= 1, got 0"),
        (-3, 0, "num_inference_steps must be >= 1"),
        (25, -1, r"switch_step must be in \[0, num_inference_steps=25\], got -1"),
        (25, 26, "use 0 for device-only, num_inference_steps for cloud-only"),
        (25.0, 5, "num_inference_steps must be an int, got 25.0"),
        (25, "5", "switch_step must be an int"),
        (25, True, "switch_step must be an int"),
        (None, 0, "num_inference_steps must be an int"),
    ],
)
def test_plan_rejects_bad_input(t, k, message):
    with pytest.raises(ValueError, match=message):
        make_plan(t, k)


def test_plan_accepts_numpy_ints():
    assert make_plan(np.int64(5), np.int32(2)) == make_plan(5, 2)


# --- noise ------------------------------------------------------------------


def test_noise_is_deterministic_float32():
    a = initial_noise(1234, (1, 4, 64, 64))
    b = initial_noise(1234, (1, 4, 64, 64))
    assert a.dtype == np.float32 and a.shape == (1, 4, 64, 64)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != initial_noise(1235, (1, 4, 64, 64)).tobytes()
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02


def test_noise_is_the_documented_generator():
    expected = np.random.Generator(np.random.PCG64(7)).standard_normal((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(initial_noise(7, (2, 3)), expected)
    # Known answer: if a numpy upgrade changes this stream, cloud and device
    # built with different numpy versions would draw different z_T.
    np.testing.assert_array_equal(
        initial_noise(0, (4,)), np.array([1.117622, -1.3871249, -0.4265716, -0.80358726], np.float32)
    )


def test_noise_accepts_the_full_seed_range():
    assert initial_noise(0, (2,)).shape == (2,)
    assert initial_noise(2**63 - 1, (2,)).shape == (2,)
    assert initial_noise(np.int64(5), [1, 2]).shape == (1, 2)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.0, "1", None, True])
def test_noise_rejects_bad_seeds(seed):
    with pytest.raises(ValueError, match="seed must be an int in"):
        initial_noise(seed, (1, 4, 8, 8))


@pytest.mark.parametrize("shape", [(), (1, 0, 8), (1, -4), (1.0, 4), "1,4", 4, None, (True, 2)])
def test_noise_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape must be a non-empty tuple of positive ints"):
        initial_noise(0, shape)


# --- solver, device timestep shift, the LCM preset -------------------------------------------------


def test_plan_carries_the_solver_and_shifts_device_steps_only():
    from obclip.runtime.plan import LCM_PAPER_STEPS, preset

    plan = make_plan(LCM_PAPER_STEPS, 4, preset("paper-lcm-k4"), solver="lcm", device_timestep_shift=8)
    assert plan.solver == "lcm" and plan.device_timestep_shift == 8
    assert [s.timestep_shift for s in plan.cloud_steps] == [0] * 4
    assert [s.timestep_shift for s in plan.device_steps] == [8] * 4
    # The paper's LCM setting: k = 4, r = 2 (s = r, our reading): reuse x2, cache+skip x2.
    assert [s.mode for s in plan.cloud_steps] == [StepMode.REUSE] * 2 + [StepMode.CACHE_SKIP] * 2
    assert make_plan(25, 10) == make_plan(25, 10, solver="dpmsolver++", device_timestep_shift=0)
    assert make_plan(25, 10).solver == "dpmsolver++"


@pytest.mark.parametrize("kw, message", [
    (dict(solver="euler"), "unknown solver 'euler'"),
    (dict(device_timestep_shift=2.0), "device_timestep_shift must be an int"),
    (dict(device_timestep_shift=1000), r"must be in \[-999, 999\]"),
])
def test_plan_rejects_bad_solver_and_shift(kw, message):
    with pytest.raises(ValueError, match=message):
        make_plan(8, 4, **kw)


def test_lcm_preset_is_exported_with_the_presets():
    from obclip.export.cloud_engines import export_configs, export_specs, plan_specs
    from obclip.runtime.plan import preset

    assert preset("paper-lcm-k4") in export_configs("presets")
    assert all(s in export_specs("presets") for s in plan_specs(preset("paper-lcm-k4"), 4))


def test_step_noise_is_its_own_stream_per_step():
    from obclip.runtime.noise import step_noise

    a = step_noise(1234, 0, (1, 4, 8, 8))
    assert a.dtype == np.float32 and a.tobytes() == step_noise(1234, 0, (1, 4, 8, 8)).tobytes()
    others = [initial_noise(1234, (1, 4, 8, 8)), step_noise(1234, 1, (1, 4, 8, 8)), step_noise(1235, 0, (1, 4, 8, 8))]
    assert all(a.tobytes() != o.tobytes() for o in others)
    # A function of (seed, step, shape) alone: the documented generator, and a known answer (as for z_T).
    expected = np.random.Generator(np.random.PCG64(7).jumped(3)).standard_normal((2, 3), dtype=np.float32)
    np.testing.assert_array_equal(step_noise(7, 2, (2, 3)), expected)
    np.testing.assert_array_equal(
        step_noise(0, 0, (4,)), np.array([0.470004, 0.02567934, -0.26519787, 1.2734578], np.float32))
    with pytest.raises(ValueError, match="step_index must be an int >= 0"):
        step_noise(0, -1, (4,))
    with pytest.raises(ValueError, match="seed must be an int"):
        step_noise(-1, 0, (4,))
