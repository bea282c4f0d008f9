"""The step plan: which of the T denoising steps runs where, and how.

A pure function of the request's parameters, shared by cloud, device and
benchmarks so they cannot disagree about which step does what. Steps
0..k-1 run on the cloud (large model, all N candidates), steps k..T-1 on the
device (small model, own prompt). k = 0 is device-only (nothing is sent),
k = T cloud-only.

Server-side accelerations (docs/method.md, section 4) are chosen
here too, per cloud step i, from one ``AccelerationConfig``:

    i <  r                  batch-reused attention (pivot's maps, every row's values)
    r <= i                  attention cache (self- and cross-attention outputs reused)
    s <= i                  block skip (cached encoder features, only the up blocks run)
    i = r + m * refresh     a refresh step that refills every cache (m >= 1; off by default): a full
                            pass, or with refresh_mode "reuse" a batch-reused one

frozen_guidance ("skip" or "cached", off by default) makes the block-skip
steps (or every step that reads a cache) evaluate the conditional rows only.
pivot_only_steps p (0 by default) makes steps i < p evaluate candidate 0 only
(mode PIVOT); with merge_step0_uncond, step p runs its unconditional rows as one.

Device steps are always full passes of the small model. The plan also carries the
solver (``runtime.solver``: DPM-Solver++ or LCM, the same on both sides) and the
device timestep shift dt: a device step's UNet is given the schedule's timestep plus
dt (the paper's t_device = t_cloud + dt for LCM-SDXL; 0 by default).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import InputError
from .solver import DPM_SOLVER, SOLVER_KINDS

CLOUD = "cloud"
DEVICE = "device"


class StepMode(str, Enum):
    """How a step evaluates the UNet."""

    FULL = "full"              # a plain UNet pass (also a cache refresh)
    PIVOT = "pivot"            # candidate 0 only (one unconditional + one conditional row), its eps for all
    REUSE = "reuse"            # batch-reused attention: pivot's maps x every row's values
    CACHE = "cache"            # attention modules return their cached outputs
    SKIP = "skip"              # cached encoder features; attention in the up blocks computed
    CACHE_SKIP = "cache+skip"  # both: the paper's cheapest step

    @property
    def batch_reuse(self) -> bool:
        return self is StepMode.REUSE

    @property
    def attention_cached(self) -> bool:
        return self in (StepMode.CACHE, StepMode.CACHE_SKIP)

    @property
    def blocks_skipped(self) -> bool:
        return self in (StepMode.SKIP, StepMode.CACHE_SKIP)


class SkipVariant(str, Enum):
    """What a block-skip step recomputes."""

    # Faster Diffusion (the paper's reading): every down-block skip feature and
    # the mid-block output come from the cache; only the up blocks and the
    # output head run, so the current latent does not enter the UNet.
    FASTER_DIFFUSION = "faster-diffusion"
    # DeepCache: conv_in, the first down block and the last up block run on the
    # current latent; the input of the last up block comes from the cache.
    DEEPCACHE = "deepcache"
    # DeepCache's shallowest branch (its cache_block_id = cache_layer_id = 0): conv_in, the first
    # layer (resnet + attention) of the first down block, the last two layers of the last up block
    # (the ones whose skip inputs are that layer's output and conv_in's) and the output head; the
    # input of the first of those two layers comes from the cache.
    DEEPCACHE_SHALLOW = "deepcache-shallow"


class RefreshMode(str, Enum):
    """What a refresh step (``refresh_every``) runs; either way it refills every cache."""

    FULL = "full"     # a plain full pass
    REUSE = "reuse"   # batch-reused attention (pivot's maps x every row's values)


class FrozenGuidance(str, Enum):
    """Which steps evaluate the conditional rows only (FasterCache-style frozen guidance residual):
    their unconditional eps is their conditional eps plus R = eps_uncond - eps_cond per candidate,
    stored by the last step that computed both."""

    OFF = "off"
    SKIP = "skip"       # block-skip steps (SKIP, CACHE_SKIP)
    CACHED = "cached"   # every step that reads a cache: attention-cache and block-skip steps

    def covers(self, mode: StepMode) -> bool:
        if self is FrozenGuidance.SKIP:
            return mode.blocks_skipped
        if self is FrozenGuidance.CACHED:
            return mode.attention_cached or mode.blocks_skipped
        return False


def _require_int(name: str, value: object) -> int:
    # bool is an int subclass; a True step count is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    return int(value)


def _require_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    return value


@dataclass(frozen=True)
class AccelerationConfig:
    """The cloud's schedule of accelerations: k, r, s and what is switched on.

    ``cross_kv_once`` and ``merge_step0_uncond`` are exact (they change nothing
    beyond float rounding); the paper leaves them out, so its presets do too.
    """

    switch_step: int                 # k: the cloud runs steps 0..k-1
    cache_step: int                  # r: batch reuse before it, attention cache from it on
    skip_step: int                   # s: block skip from it on
    refresh_every: int = 0           # 0: never; else a full step at r + m * refresh_every
    skip_variant: SkipVariant = SkipVariant.FASTER_DIFFUSION
    batch_reuse: bool = True
    attention_cache: bool = True
    block_skip: bool = True
    cross_kv_once: bool = False      # exact: cross-attention K/V once per request, on unique texts
    merge_step0_uncond: bool = False  # exact: at step p (0 by default) the N unconditional rows are one row
    refresh_mode: RefreshMode = RefreshMode.FULL   # what a refresh step runs (both refill every cache)
    frozen_guidance: FrozenGuidance = FrozenGuidance.OFF  # steps that skip the unconditional rows
    pivot_only_steps: int = 0        # p: steps 0..p-1 evaluate candidate 0 only, every candidate gets its eps

    def __post_init__(self) -> None:
        for name in ("switch_step", "cache_step", "skip_step", "refresh_every", "pivot_only_steps"):
            object.__setattr__(self, name, _require_int(name, getattr(self, name)))
        for name in ("batch_reuse", "attention_cache", "block_skip", "cross_kv_once", "merge_step0_uncond"):
            _require_bool(name, getattr(self, name))
        try:
            object.__setattr__(self, "skip_variant", SkipVariant(self.skip_variant))
        except ValueError:
            raise InputError(f"skip_variant {self.skip_variant!r} must be one of "
                             f"{[v.value for v in SkipVariant]}") from None
        for name, kind in (("refresh_mode", RefreshMode), ("frozen_guidance", FrozenGuidance)):
            try:
                object.__setattr__(self, name, kind(getattr(self, name)))
            except ValueError:
                raise InputError(f"{name} {getattr(self, name)!r} must be one of "
                                 f"{[v.value for v in kind]}") from None
        k, r, s = self.switch_step, self.cache_step, self.skip_step
        if min(k, r, s, self.refresh_every) < 0:
            raise InputError(f"k={k}, r={r}, s={s}, refresh_every={self.refresh_every} must all be >= 0")
        if not r <= s <= k:
            raise InputError(f"need cache point r <= skip point s <= switch point k, got r={r}, s={s}, k={k}")
        # A cache is read only after a step has filled it.
        if self.attention_cache and r == 0 and k > 0:
            raise InputError("attention_cache needs cache_step r >= 1: step 0 has no cached attention to reuse")
        if self.block_skip and s == 0 and k > 0:
            raise InputError("block_skip needs skip_step s >= 1: step 0 has no cached encoder features")
        p = self.pivot_only_steps
        if not 0 <= p <= k:
            raise InputError(f"pivot_only_steps p={p} must be in [0, switch point k={k}]")
        # A step that reads a cache must read what a step over every candidate wrote, not the pivot's.
        if p and self.attention_cache and r < k and p >= r:
            raise InputError(f"pivot_only_steps p={p} must be < cache_step r={r}: the attention cache read from "
                             "step r on must come from a step that evaluated every candidate")
        if p and self.block_skip and s < k and p >= s:
            raise InputError(f"pivot_only_steps p={p} must be < skip_step s={s}: the encoder features read from "
                             "step s on must come from a step that evaluated every candidate")
        if self.refresh_mode is not RefreshMode.FULL and not self.refresh_every:
            raise InputError(f"refresh_mode {self.refresh_mode.value!r} needs refresh_every >= 1 "
                             "(with refresh_every=0 no step refreshes)")
        if self.frozen_guidance is FrozenGuidance.SKIP and not self.block_skip:
            raise InputError("frozen_guidance 'skip' needs block_skip: it freezes the guidance on block-skip steps")
        if self.frozen_guidance is FrozenGuidance.CACHED and not (self.attention_cache or self.block_skip):
            raise InputError("frozen_guidance 'cached' needs attention_cache or block_skip: it freezes the "
                             "guidance on the steps that read a cache")

    @classmethod
    def none(cls, switch_step: int) -> AccelerationConfig:
        """Every step a full pass: the paper's "ObCLIP, no acceleration" row."""
        return cls(switch_step, switch_step, switch_step, batch_reuse=False, attention_cache=False,
                   block_skip=False)

    @property
    def exact_only(self) -> bool:
        return not (self.batch_reuse or self.attention_cache or self.block_skip)

    @property
    def reuses_attention(self) -> bool:
        """Whether some cloud step runs batch-reused attention (and so needs the token alignment)."""
        return any(self.mode(i).batch_reuse for i in range(self.switch_step))

    def replace(self, **changes: Any) -> AccelerationConfig:
        return dataclasses.replace(self, **changes)

    def mode(self, i: int) -> StepMode:
        """The mode of cloud step i (0 <= i < k)."""
        r, s = self.cache_step, self.skip_step
        if i < self.pivot_only_steps:
            return StepMode.PIVOT
        if i < r:
            return StepMode.REUSE if self.batch_reuse else StepMode.FULL
        if self.refresh_every and i > r and (i - r) % self.refresh_every == 0:
            # refresh: recompute everything, refill every cache
            return StepMode.REUSE if self.refresh_mode is RefreshMode.REUSE else StepMode.FULL
        cached = self.attention_cache
        skipped = self.block_skip and i >= s
        if cached and skipped:
            return StepMode.CACHE_SKIP
        if cached:
            return StepMode.CACHE
        if skipped:
            return StepMode.SKIP
        return StepMode.FULL

    @property
    def merged_step(self) -> int | None:
        """The step whose N unconditional rows run as one (``merge_step0_uncond``): the first that evaluates
        every candidate, p = pivot_only_steps, whose latents are all still z_T's; None if none is."""
        p = self.pivot_only_steps
        return p if self.merge_step0_uncond and p < self.switch_step else None

    def guidance_frozen(self, mode: StepMode) -> bool:
        """Whether a step of this mode evaluates the conditional rows only (frozen guidance residual)."""
        return self.frozen_guidance.covers(mode)

    def to_dict(self) -> dict[str, Any]:
        """Every field; the fields added after the paper presets only when they differ from their
        default, so a config that does not use them has the same request bytes as before."""
        d = dataclasses.asdict(self)
        for name, value in d.items():
            if isinstance(value, Enum):
                d[name] = value.value
        for name, default in _OMITTED_AT_DEFAULT.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: object) -> AccelerationConfig:
        if not isinstance(d, dict):
            raise InputError(f"acceleration must be an object of {sorted(cls.__dataclass_fields__)}, got {d!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise InputError(f"acceleration has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        missing = {"switch_step", "cache_step", "skip_step"} - set(d)
        if missing:
            raise InputError(f"acceleration is missing fields {sorted(missing)}")
        return cls(**d)


# Fields that to_dict leaves out at their default value (wire compatibility with older peers).
_OMITTED_AT_DEFAULT: dict[str, Any] = {"refresh_mode": RefreshMode.FULL.value,
                                       "frozen_guidance": FrozenGuidance.OFF.value, "pivot_only_steps": 0}

# paper-k5 / paper-k10: the paper's two server settings (T = 25, DPM-Solver): batch reuse before
# r, attention cache from r, block skip from s, no refresh inside the cloud steps.
# lean-k10: chosen from the measured Pareto front (docs/sweep/; its cost and accuracy are reported
# there): no batch reuse; step 0 on the pivot only, then the N unconditional rows merged exactly at
# step 1; full passes to r; attention cache from r; DeepCache skip from s; guidance frozen (the
# stored uncond - cond residual) on cache and skip steps; cross-attention K/V once per request.
PRESETS: dict[str, AccelerationConfig] = {
    "paper-k5": AccelerationConfig(switch_step=5, cache_step=3, skip_step=3),
    "paper-k10": AccelerationConfig(switch_step=10, cache_step=4, skip_step=6),
    "lean-k10": AccelerationConfig(switch_step=10, cache_step=4, skip_step=6, skip_variant=SkipVariant.DEEPCACHE,
                                   batch_reuse=False, cross_kv_once=True, merge_step0_uncond=True,
                                   pivot_only_steps=1, frozen_guidance=FrozenGuidance.CACHED),
    # paper-lcm-k4: the paper's LCM-SDXL setting, run with solver "lcm" and T = 8 (LCM_PAPER_STEPS):
    # k = 4, r = 2; the paper gives no s, we read it as s = r (as in paper-k5): reuse x2, cache+skip x2.
    "paper-lcm-k4": AccelerationConfig(switch_step=4, cache_step=2, skip_step=2),
}
# The paper's LCM-SDXL run: T = 8 LCM steps (with the device timestep shift dt = 8, its best).
LCM_PAPER_STEPS = 8
# A timestep shift beyond any 1000-step model's trained range means nothing; the request refuses it.
MAX_TIMESTEP_SHIFT = 999


def preset(name: str) -> AccelerationConfig:
    """A named acceleration setting; ``none-k<k>`` is the unaccelerated run with switch point k."""
    if name in PRESETS:
        return PRESETS[name]
    if name.startswith("none-k") and name[6:].isdigit():
        return AccelerationConfig.none(int(name[6:]))
    raise InputError(f"unknown acceleration preset {name!r}; known: {sorted(PRESETS)} or none-k<k>")


@dataclass(frozen=True)
class PlannedStep:
    index: int  # position in the T-step schedule
    side: str  # CLOUD or DEVICE
    mode: StepMode
    timestep_shift: int = 0  # added to the timestep the UNet is given: dt on device steps, 0 on cloud steps


@dataclass(frozen=True)
class StepPlan:
    num_inference_steps: int  # T
    switch_step: int  # k: steps [0, k) on the cloud, [k, T) on the device
    steps: tuple[PlannedStep, ...]
    acceleration: AccelerationConfig | None = None
    solver: str = DPM_SOLVER  # runtime.solver's DPM_SOLVER or LCM, on every step
    device_timestep_shift: int = 0  # dt

    @property
    def cloud_steps(self) -> tuple[PlannedStep, ...]:
        return tuple(s for s in self.steps if s.side == CLOUD)

    @property
    def device_steps(self) -> tuple[PlannedStep, ...]:
        return tuple(s for s in self.steps if s.side == DEVICE)


def make_plan(num_inference_steps: int, switch_step: int,
              acceleration: AccelerationConfig | None = None, *, solver: str = DPM_SOLVER,
              device_timestep_shift: int = 0) -> StepPlan:
    """Plan T = num_inference_steps steps with the switch point k = switch_step.

    Without ``acceleration`` every step is a full pass. ``solver``: runtime.solver's DPM_SOLVER
    or LCM. ``device_timestep_shift``: dt, added to the UNet's timestep on every device step
    (whether the shifted timesteps stay in the model's range is the schedule's check,
    ``Schedule.model_timestep``).
    """
    t = _require_int("num_inference_steps", num_inference_steps)
    k = _require_int("switch_step", switch_step)
    dt = _require_int("device_timestep_shift", device_timestep_shift)
    if solver not in SOLVER_KINDS:
        raise InputError(f"unknown solver {solver!r}; known: {', '.join(SOLVER_KINDS)}")
    if abs(dt) > MAX_TIMESTEP_SHIFT:
        raise InputError(f"device_timestep_shift dt={dt} must be in [-{MAX_TIMESTEP_SHIFT}, {MAX_TIMESTEP_SHIFT}]")
    if t < 1:
        raise InputError(f"num_inference_steps must be >= 1, got {t}")
    if not 0 <= k <= t:
        raise InputError(
            f"switch_step must be in [0, num_inference_steps={t}], got {k}: "
            "use 0 for device-only, num_inference_steps for cloud-only"
        )
    if acceleration is not None and acceleration.switch_step != k:
        raise InputError(f"acceleration is for switch point k={acceleration.switch_step} but the plan has "
                         f"k={k}; pick a preset for k={k} or set switch_step to {acceleration.switch_step}")
    steps = tuple(
        PlannedStep(i, CLOUD, acceleration.mode(i) if acceleration else StepMode.FULL) if i < k
        else PlannedStep(i, DEVICE, StepMode.FULL, timestep_shift=dt)
        for i in range(t)
    )
    return StepPlan(num_inference_steps=t, switch_step=k, steps=steps, acceleration=acceleration,
                    solver=solver, device_timestep_shift=dt)
