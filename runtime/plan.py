"""The step plan: which of the T denoising steps runs where, and how.

A pure function of the request's parameters, shared by cloud, device and
benchmarks so they cannot disagree about which step does what. Steps
0..k-1 run on the cloud (large model, all N candidates), steps k..T-1 on the
device (small model, own prompt). k = 0 is device-only (nothing is sent),
k = T cloud-only.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from enum import Enum

CLOUD = "cloud"
DEVICE = "device"


class StepMode(str, Enum):
    """How a step evaluates the UNet."""

    FULL = "full"  # a plain UNet pass
    # Server-side accelerations add modes here (batch reuse, attention cache,
    # block skip); make_plan gains the parameters (r, s, ...) that choose them.


@dataclass(frozen=True)
class PlannedStep:
    index: int  # position in the T-step schedule
    side: str  # CLOUD or DEVICE
    mode: StepMode


@dataclass(frozen=True)
class StepPlan:
    num_inference_steps: int  # T
    switch_step: int  # k: steps [0, k) on the cloud, [k, T) on the device
    steps: tuple[PlannedStep, ...]

    @property
    def cloud_steps(self) -> tuple[PlannedStep, ...]:
        return tuple(s for s in self.steps if s.side == CLOUD)

    @property
    def device_steps(self) -> tuple[PlannedStep, ...]:
        return tuple(s for s in self.steps if s.side == DEVICE)


def _require_int(name: str, value) -> int:
    # bool is an int subclass; a True step count is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def make_plan(num_inference_steps: int, switch_step: int) -> StepPlan:
    """Plan T = num_inference_steps steps with the switch point k = switch_step."""
    t = _require_int("num_inference_steps", num_inference_steps)
    k = _require_int("switch_step", switch_step)
    if t < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {t}")
    if not 0 <= k <= t:
        raise ValueError(
            f"switch_step must be in [0, num_inference_steps={t}], got {k}: "
            "use 0 for device-only, num_inference_steps for cloud-only"
        )
    steps = tuple(PlannedStep(i, CLOUD if i < k else DEVICE, StepMode.FULL) for i in range(t))
    return StepPlan(num_inference_steps=t, switch_step=k, steps=steps)
