"""The two solvers in numpy: DPM-Solver++(2M), matching diffusers' ``DPMSolverMultistepScheduler``,
and LCM's multistep consistency sampling, matching diffusers' ``LCMScheduler``.

The cloud runs the first k steps and the device the remaining T - k. For the
split run to equal a single-process run, both sides must share the timestep
schedule and the solver's memory (``SolverState``): for DPM-Solver++ the previous
data prediction and diffusers' order counter; for LCM nothing but the step
index, since each LCM step reads only the current latent, and the noise it
injects is drawn from the request's seed (``runtime.noise.step_noise``), which
the device holds. Everything here is a pure function of its inputs (the noise is
one of them), so the state that crosses the handoff is exactly what the next
step reads.

Which solver runs is the request's ``solver`` (``DPM_SOLVER`` or ``LCM``);
``solver_config(kind, scheduler_config)`` reads the model's scheduler config
for it. Only the algorithm diffusers uses by default for Stable Diffusion is
supported for DPM-Solver++ (``algorithm_type="dpmsolver++"``,
``solver_type="midpoint"``, order 1 or 2), and LCM without clipping or
thresholding; ``from_scheduler_config`` rejects anything else by name instead of
silently computing something different.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import InputError

DPM_SOLVER = "dpmsolver++"   # DPM-Solver++(2M), deterministic
LCM = "lcm"                  # LCM's multistep consistency sampling: injects noise between steps
SOLVER_KINDS = (DPM_SOLVER, LCM)

_BETA_SCHEDULES = ("linear", "scaled_linear")
_PREDICTION_TYPES = ("epsilon", "v_prediction")
_TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
_SOLVER_ORDERS = (1, 2)
_FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# DPMSolverMultistepScheduler.__init__ defaults for the keys we model: a
# scheduler config without a key gets these from diffusers' from_config, not
# our SD-v1.4 defaults.
_DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "solver_order": 2,
    "lower_order_final": True,
    "final_sigmas_type": "zero",
}

# diffusers options we do not implement: the only value(s) we accept. Other keys
# (other schedulers' options, and options that only matter when one of these is
# switched on, e.g. dynamic_thresholding_ratio, flow_shift) are ignored, as
# diffusers' from_config ignores them.
_UNSUPPORTED = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",),
    "euler_at_final": (False,),
    "use_karras_sigmas": (False,),
    "use_exponential_sigmas": (False,),
    "use_beta_sigmas": (False,),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "lambda_min_clipped": (-math.inf,),
    "variance_type": (None,),
    "rescale_betas_zero_snr": (False,),
    "use_dynamic_shifting": (False,),
}


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_choice(key: str, value: object, choices: tuple[object, ...]) -> None:
    # Types must match too: in Python 1 == True and 0 == False.
    if not any(type(value) is type(c) and value == c for c in choices):
        raise InputError(f"unsupported scheduler option {key}={reprlib.repr(value)}; "
                         f"supported: {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class NoiseSchedule:
    """The fields both solvers' configs share: the training noise schedule (diffusers' keys) and
    what the model predicts. Defaults are SD-v1.4's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "epsilon"


def _check_noise_schedule(config: NoiseSchedule) -> None:
    """Check (and normalise) the noise-schedule fields of a solver config."""
    if not _is_int(config.num_train_timesteps) or config.num_train_timesteps < 2:
        raise InputError(f"num_train_timesteps must be an int >= 2, got {config.num_train_timesteps!r}")
    for key in ("beta_start", "beta_end"):
        value = getattr(config, key)
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise InputError(f"{key} must be a number, got {value!r}")
        if not 0.0 < float(value) < 1.0:
            raise InputError(f"{key} must be in (0, 1), got {value!r}")
        object.__setattr__(config, key, float(value))
    _check_choice("beta_schedule", config.beta_schedule, _BETA_SCHEDULES)
    _check_choice("prediction_type", config.prediction_type, _PREDICTION_TYPES)
    object.__setattr__(config, "num_train_timesteps", int(config.num_train_timesteps))


def _read_scheduler_config(config: Mapping[str, Any], unsupported: Mapping[str, tuple[object, ...]],
                           defaults: Mapping[str, object]) -> dict[str, Any]:
    """The modelled keys of a diffusers scheduler config (defaults for the missing ones), after
    refusing by name the options we do not implement."""
    if not isinstance(config, Mapping):
        raise InputError(f"scheduler config must be a mapping, got {type(config).__name__}")
    for key, allowed in unsupported.items():
        if key in config:
            _check_choice(key, config[key], allowed)
    return {key: config.get(key, default) for key, default in defaults.items()}


@dataclass(frozen=True)
class SolverConfig(NoiseSchedule):
    """The subset of diffusers' DPMSolverMultistepScheduler config we support.

    Defaults are what ``DPMSolverMultistepScheduler.from_config`` makes of
    SD-v1.4's scheduler config (``SD14_SOLVER_CONFIG``). Field names are the
    diffusers config keys.
    """

    kind: ClassVar[str] = DPM_SOLVER

    timestep_spacing: str = "linspace"
    steps_offset: int = 1
    solver_order: int = 2
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        _check_noise_schedule(self)
        _check_choice("timestep_spacing", self.timestep_spacing, _TIMESTEP_SPACINGS)
        if not _is_int(self.steps_offset) or self.steps_offset < 0:
            raise InputError(f"steps_offset must be an int >= 0, got {self.steps_offset!r}")
        if not _is_int(self.solver_order) or int(self.solver_order) not in _SOLVER_ORDERS:
            raise InputError(f"unsupported scheduler option solver_order={self.solver_order!r}; supported: 1, 2")
        _check_choice("lower_order_final", self.lower_order_final, (True, False))
        _check_choice("final_sigmas_type", self.final_sigmas_type, _FINAL_SIGMAS_TYPES)
        for key in ("steps_offset", "solver_order"):
            object.__setattr__(self, key, int(getattr(self, key)))

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> SolverConfig:
        """What ``DPMSolverMultistepScheduler.from_config(config)`` would use.

        ``config`` is any diffusers scheduler config dict (e.g. SD-v1.4's
        PNDMScheduler ``scheduler_config.json``). Missing keys take diffusers'
        DPMSolverMultistepScheduler defaults; keys that do not concern
        DPM-Solver++ are ignored; options we do not implement raise InputError.
        """
        return cls(**_read_scheduler_config(config, _UNSUPPORTED, _DIFFUSERS_DEFAULTS))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with diffusers' key names (``from_scheduler_config`` reads it back)."""
        return dataclasses.asdict(self)


SD14_SOLVER_CONFIG = SolverConfig()

# LCMScheduler.__init__ defaults for the keys we model. LCMScheduler.set_timesteps reads neither
# timestep_spacing nor steps_offset, and set_alpha_to_one only matters for a step to a timestep
# below 0, which its schedule never takes: those keys are ignored.
_LCM_DIFFUSERS_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
}
_LCM_UNSUPPORTED = {
    "trained_betas": (None,),
    "thresholding": (False,),
    "clip_sample": (False,),
    "rescale_betas_zero_snr": (False,),
}
# The consistency model's data standard deviation (diffusers' LCMScheduler.sigma_data).
_LCM_SIGMA_DATA = 0.5


@dataclass(frozen=True)
class LCMConfig(NoiseSchedule):
    """The subset of diffusers' LCMScheduler config we support; defaults are ``LCMScheduler()``'s.

    ``original_inference_steps`` is the distillation grid (50 steps: timesteps 19, 39, ..., 999)
    the T-step schedule is taken from; ``timestep_scaling`` scales the timestep in the
    boundary-condition scalings c_skip and c_out.
    """

    kind: ClassVar[str] = LCM

    original_inference_steps: int = 50
    timestep_scaling: float = 10.0

    def __post_init__(self) -> None:
        _check_noise_schedule(self)
        n = self.num_train_timesteps
        if not _is_int(self.original_inference_steps) or not 1 <= self.original_inference_steps <= n:
            raise InputError(f"original_inference_steps must be an int in [1, {n}] (num_train_timesteps), "
                             f"got {self.original_inference_steps!r}")
        object.__setattr__(self, "original_inference_steps", int(self.original_inference_steps))
        scaling = self.timestep_scaling
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float, np.floating, np.integer)) \
                or not 0.0 < float(scaling) < math.inf:
            raise InputError(f"timestep_scaling must be a positive number, got {scaling!r}")
        object.__setattr__(self, "timestep_scaling", float(scaling))

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> LCMConfig:
        """What ``LCMScheduler.from_config(config)`` would use (any diffusers scheduler config: the
        model's noise schedule, with LCM's defaults for the LCM keys it lacks)."""
        return cls(**_read_scheduler_config(config, _LCM_UNSUPPORTED, _LCM_DIFFUSERS_DEFAULTS))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with diffusers' key names (``from_scheduler_config`` reads it back)."""
        return dataclasses.asdict(self)


def solver_config(kind: str, scheduler_config: Mapping[str, Any]) -> SolverConfig | LCMConfig:
    """The config of solver ``kind`` (``DPM_SOLVER`` or ``LCM``) for a model's scheduler config."""
    if kind == DPM_SOLVER:
        return SolverConfig.from_scheduler_config(scheduler_config)
    if kind == LCM:
        return LCMConfig.from_scheduler_config(scheduler_config)
    raise InputError(f"unknown solver {kind!r}; known: {', '.join(SOLVER_KINDS)}")


def injects_noise(kind: str, index: int, num_inference_steps: int) -> bool:
    """Whether step ``index`` of a ``kind`` run adds fresh noise: every LCM step but the last."""
    return kind == LCM and index < num_inference_steps - 1


@dataclass(frozen=True, eq=False)
class Schedule:
    """Timesteps and per-step noise levels for one T; index i is step i, index T the end.

    For DPM-Solver++, ``sigmas`` are diffusers' (float32 values, kept as float64);
    ``alpha_t``, ``sigma_t`` and ``lambda_t = log(alpha_t / sigma_t)`` are derived from
    them in float64. With final sigma 0, ``lambda_t[T]`` is +inf (the update handles
    it). For LCM, ``alpha_t`` and ``sigma_t`` are sqrt(alpha_bar) and sqrt(1 - alpha_bar)
    at each timestep (diffusers' float32 alpha_bar, kept as float64), and the end is the
    clean sample (alpha 1, sigma 0). Either way ``x_i = alpha_t[i] x0 + sigma_t[i] eps``.
    """

    timesteps: np.ndarray  # int64 [T]
    sigmas: np.ndarray  # float64 [T+1]
    alpha_t: np.ndarray  # float64 [T+1]
    sigma_t: np.ndarray  # float64 [T+1]
    lambda_t: np.ndarray  # float64 [T+1]
    num_train_timesteps: int  # the model's trained timesteps are 0..num_train_timesteps-1

    @property
    def num_inference_steps(self) -> int:
        return len(self.timesteps)

    def model_timestep(self, index: int, shift: int = 0) -> float:
        """The timestep the UNet is given at step ``index``: the schedule's, plus ``shift`` (the
        device timestep shift dt on device steps). The solver stays on the schedule's own timesteps.
        InputError if the shifted timestep leaves the model's trained range [0, num_train_timesteps)."""
        t = int(self.timesteps[index]) + int(shift)
        if not 0 <= t < self.num_train_timesteps:
            raise InputError(
                f"the timestep shift dt={shift} moves step {index}'s timestep {int(self.timesteps[index])} to {t}, "
                f"outside the model's trained range [0, {self.num_train_timesteps - 1}]; use a smaller dt "
                "(or run the first steps in the cloud: the shift applies to device steps only)")
        return float(t)


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    # torch.linspace(float32) on CPU, bit for bit: a fused multiply-add from
    # `start` for the first half and from `end` for the second half. (The float32
    # product with an integer index is exact in float64, so rounding the float64
    # sum once to float32 is the fused result.)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    from_start = (step * i + np.float64(start32)).astype(np.float32)
    from_end = (-step * (n - 1 - i) + np.float64(end32)).astype(np.float32)
    return np.asarray(np.where(np.arange(n) < n // 2, from_start, from_end))


def _train_alphas_cumprod(config: NoiseSchedule) -> np.ndarray:
    """diffusers' float32 ``alphas_cumprod`` over the training timesteps."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = _torch_linspace_f32(config.beta_start, config.beta_end, n)
    else:  # scaled_linear: linear in sqrt(beta), the latent-diffusion schedule
        betas = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
    # torch's CPU cumprod accumulates float32 in float64 and rounds each output.
    return np.asarray(np.cumprod((1.0 - betas).astype(np.float64)).astype(np.float32))


def _train_sigmas(config: SolverConfig) -> np.ndarray:
    """diffusers' float32 ``((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`` over the training timesteps."""
    alphas_cumprod = _train_alphas_cumprod(config)
    return np.asarray(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)


def _timesteps(config: SolverConfig, t: int) -> np.ndarray:
    # Copied from DPMSolverMultistepScheduler.set_timesteps (lambda_min_clipped=-inf,
    # so last_timestep = num_train_timesteps).
    last = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.asarray(np.linspace(0, last - 1, t + 1).round()[::-1][:-1].astype(np.int64))
    if config.timestep_spacing == "leading":
        leading_ratio = last // (t + 1)
        return np.asarray((np.arange(0, t + 1) * leading_ratio).round()[::-1][:-1].astype(np.int64)
                          + config.steps_offset)
    trailing_ratio = config.num_train_timesteps / t
    return np.asarray(np.arange(last, 0, -trailing_ratio).round().astype(np.int64) - 1)


def make_schedule(config: SolverConfig | LCMConfig, num_inference_steps: int) -> Schedule:
    """The schedule ``set_timesteps(num_inference_steps)`` of the config's diffusers scheduler builds
    (``DPMSolverMultistepScheduler`` or ``LCMScheduler``)."""
    t, n = num_inference_steps, config.num_train_timesteps
    if not _is_int(t) or not 1 <= t <= n:
        raise InputError(f"num_inference_steps must be an int in [1, {n}] (num_train_timesteps), got {t!r}")
    t = int(t)
    if isinstance(config, LCMConfig):
        return _lcm_schedule(config, t)
    timesteps = _timesteps(config, t)
    # diffusers would silently run a different number of steps or repeat a
    # timestep (zero step size -> NaN) here; refuse instead.
    if len(timesteps) != t or len(np.unique(timesteps)) != t or timesteps.min() < 0 or timesteps.max() >= n:
        raise InputError(
            f"timestep_spacing={config.timestep_spacing!r} with num_inference_steps={t} gives {len(timesteps)} "
            f"timesteps, {len(np.unique(timesteps))} distinct, in [{timesteps.min()}, {timesteps.max()}], not {t} "
            f"distinct values in [0, {n}) as the solver needs; "
            "choose a different num_inference_steps or timestep_spacing"
        )
    train_sigmas = _train_sigmas(config)
    final = train_sigmas[0] if config.final_sigmas_type == "sigma_min" else np.float32(0.0)
    sigmas = np.append(train_sigmas[timesteps], final).astype(np.float64)

    alpha_t = 1.0 / np.sqrt(sigmas**2 + 1.0)
    sigma_t = sigmas * alpha_t
    with np.errstate(divide="ignore"):  # sigma 0 at the end -> lambda +inf
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
    return _frozen_schedule(timesteps, sigmas, alpha_t, sigma_t, lambda_t, n)


def _frozen_schedule(timesteps: np.ndarray, sigmas: np.ndarray, alpha_t: np.ndarray, sigma_t: np.ndarray,
                     lambda_t: np.ndarray, num_train_timesteps: int) -> Schedule:
    for a in (timesteps, sigmas, alpha_t, sigma_t, lambda_t):
        a.setflags(write=False)
    return Schedule(timesteps, sigmas, alpha_t, sigma_t, lambda_t, num_train_timesteps)


def _lcm_timesteps(config: LCMConfig, t: int) -> np.ndarray:
    # Copied from LCMScheduler.set_timesteps (strength 1): T indices evenly spaced over the
    # descending distillation grid of original_inference_steps timesteps.
    original = config.original_inference_steps
    if t > original:
        raise InputError(f"the lcm solver takes its {t} steps from the original_inference_steps={original} "
                         f"distillation grid, so it runs at most {original} steps; choose "
                         f"num_inference_steps <= {original} (LCM's usual: 2-8)")
    ratio = config.num_train_timesteps // original
    grid = (np.arange(1, original + 1, dtype=np.int64) * ratio - 1)[::-1]
    indices = np.floor(np.linspace(0, len(grid), num=t, endpoint=False)).astype(np.int64)
    return np.asarray(grid[indices])


def _lcm_schedule(config: LCMConfig, t: int) -> Schedule:
    """The schedule ``LCMScheduler.set_timesteps(t)`` builds, with the noise levels its steps read."""
    timesteps = _lcm_timesteps(config, t)
    alphas_cumprod = _train_alphas_cumprod(config)[timesteps].astype(np.float64)
    alpha_t = np.append(np.sqrt(alphas_cumprod), 1.0)       # the last step returns the clean sample
    sigma_t = np.append(np.sqrt(1.0 - alphas_cumprod), 0.0)
    sigmas = sigma_t / alpha_t
    with np.errstate(divide="ignore"):
        lambda_t = np.log(alpha_t) - np.log(sigma_t)
    return _frozen_schedule(timesteps, sigmas, alpha_t, sigma_t, lambda_t, config.num_train_timesteps)


@dataclass(frozen=True, eq=False)
class SolverState:
    """What a split run carries across the cloud->device handoff.

    step_index: index of the NEXT step to run (0..T).
    lower_order_nums: diffusers' counter of steps taken since the (re)start, capped at solver_order
        (DPM-Solver++); always 0 for LCM, which keeps no memory of earlier steps.
    prev_x0: the last data prediction (diffusers' ``model_outputs[-1]``; for LCM the last step's
        ``denoised``, which the next LCM step does not read), shape of the sample; None at step 0.
    """

    step_index: int
    lower_order_nums: int
    prev_x0: np.ndarray | None

    def __post_init__(self) -> None:
        for key in ("step_index", "lower_order_nums"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                raise InputError(f"SolverState.{key} must be an int >= 0, got {value!r}")
        if self.lower_order_nums > self.step_index:
            raise InputError(
                f"SolverState.lower_order_nums={self.lower_order_nums} exceeds step_index={self.step_index}: "
                "a counter of steps taken cannot exceed the steps taken"
            )
        if self.prev_x0 is not None and not isinstance(self.prev_x0, np.ndarray):
            raise InputError(f"SolverState.prev_x0 must be a numpy array or None, got {type(self.prev_x0).__name__}")


def initial_state() -> SolverState:
    return SolverState(step_index=0, lower_order_nums=0, prev_x0=None)


def solver_step(
    schedule: Schedule,
    config: SolverConfig | LCMConfig,
    state: SolverState,
    model_output: np.ndarray,
    sample: np.ndarray,
    noise: np.ndarray | None = None,
) -> tuple[np.ndarray, SolverState]:
    """One solver update at ``state.step_index`` (diffusers' ``step`` of the config's scheduler).

    ``noise``: what an LCM step injects (``injects_noise``: every step but the last), the shape
    of the sample; None otherwise. Returns the sample for the next step (same dtype as
    ``sample``) and the new state. Computes in float64; the stored data prediction is kept at
    least in float32, like diffusers' ``model_outputs``.
    """
    i, t = state.step_index, schedule.num_inference_steps
    if i >= t:
        raise InputError(f"step_index {i} is past the last step of a {t}-step schedule")
    model_output, sample = np.asarray(model_output), np.asarray(sample)
    if model_output.shape != sample.shape:
        raise InputError(f"model_output shape {model_output.shape} != sample shape {sample.shape}")
    if injects_noise(config.kind, i, t):
        if noise is None:
            raise InputError(f"step {i} of the {config.kind} solver injects noise: give it the request's shared "
                             "noise for this step (runtime.noise.step_noise)")
        noise = np.asarray(noise)
        if noise.shape != sample.shape:
            raise InputError(f"noise shape {noise.shape} != sample shape {sample.shape}")
    elif noise is not None:
        raise InputError(f"step {i} of the {config.kind} solver injects no noise, but noise was given")
    if isinstance(config, LCMConfig):
        return _lcm_step(schedule, config, state, model_output, sample, noise)
    if state.lower_order_nums > config.solver_order:
        raise InputError(f"lower_order_nums {state.lower_order_nums} exceeds solver_order {config.solver_order}")

    x = sample.astype(np.float64)
    alpha_s, sigma_s = schedule.alpha_t[i], schedule.sigma_t[i]
    alpha_t, sigma_t = schedule.alpha_t[i + 1], schedule.sigma_t[i + 1]

    # convert_model_output: DPM-Solver++ integrates the data prediction x0.
    x0 = _data_prediction(config.prediction_type, alpha_s, sigma_s, x, model_output)

    # Stepping to sigma 0 (or, for short schedules, the last step) is done first
    # order for stability. Note diffusers' "second-to-last step lower order"
    # rule only lowers order 3 to 2, so it never applies to 2M.
    final_first_order = i == t - 1 and (
        (config.lower_order_final and t < 15) or config.final_sigmas_type == "zero"
    )
    h = schedule.lambda_t[i + 1] - schedule.lambda_t[i]
    phi = alpha_t * (np.exp(-h) - 1.0)  # exp(-inf) = 0 at sigma 0
    if config.solver_order == 1 or state.lower_order_nums < 1 or final_first_order:
        x_next = (sigma_t / sigma_s) * x - phi * x0
    else:
        if state.prev_x0 is None:
            raise InputError(
                f"step {i} is a second-order step but SolverState.prev_x0 is None; carry the previous data "
                "prediction across the handoff (or restart with lower_order_nums=0)"
            )
        if state.prev_x0.shape != sample.shape:
            raise InputError(f"prev_x0 shape {state.prev_x0.shape} != sample shape {sample.shape}")
        # 2M midpoint: a finite difference of the last two data predictions.
        r0 = (schedule.lambda_t[i] - schedule.lambda_t[i - 1]) / h
        d1 = (x0 - state.prev_x0.astype(np.float64)) / r0
        x_next = (sigma_t / sigma_s) * x - phi * x0 - 0.5 * phi * d1

    new_state = SolverState(
        step_index=i + 1,
        lower_order_nums=min(state.lower_order_nums + 1, config.solver_order),
        prev_x0=x0.astype(np.promote_types(sample.dtype, np.float32)),
    )
    return x_next.astype(sample.dtype), new_state


def _data_prediction(prediction_type: str, alpha: float, sigma: float, x: np.ndarray,
                     model_output: np.ndarray) -> np.ndarray:
    """x0 from the model's output at noise level (alpha, sigma), in float64."""
    out = model_output.astype(np.float64)
    if prediction_type == "epsilon":
        return np.asarray((x - sigma * out) / alpha)
    return np.asarray(alpha * x - sigma * out)   # v_prediction


def _lcm_step(schedule: Schedule, config: LCMConfig, state: SolverState, model_output: np.ndarray,
              sample: np.ndarray, noise: np.ndarray | None) -> tuple[np.ndarray, SolverState]:
    """One LCM step (diffusers' ``LCMScheduler.step``): the consistency function's boundary-condition
    scalings turn the data prediction into ``denoised``, which is noised back to the next
    timestep's level with the given noise (or returned, at the last step)."""
    i = state.step_index
    if state.lower_order_nums != 0:
        raise InputError(f"SolverState.lower_order_nums={state.lower_order_nums}: the lcm solver keeps no "
                         "multistep memory, its state always has 0")
    x = sample.astype(np.float64)
    x0 = _data_prediction(config.prediction_type, schedule.alpha_t[i], schedule.sigma_t[i], x, model_output)
    scaled = float(schedule.timesteps[i]) * config.timestep_scaling
    c_skip = _LCM_SIGMA_DATA**2 / (scaled**2 + _LCM_SIGMA_DATA**2)
    c_out = scaled / math.sqrt(scaled**2 + _LCM_SIGMA_DATA**2)
    denoised = c_out * x0 + c_skip * x
    if noise is None:   # the last step
        x_next = denoised
    else:
        x_next = schedule.alpha_t[i + 1] * denoised + schedule.sigma_t[i + 1] * noise.astype(np.float64)
    new_state = SolverState(step_index=i + 1, lower_order_nums=0,
                            prev_x0=denoised.astype(np.promote_types(sample.dtype, np.float32)))
    return x_next.astype(sample.dtype), new_state
