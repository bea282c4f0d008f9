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
