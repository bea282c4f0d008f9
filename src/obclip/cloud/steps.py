"""The cloud's step loop: the first k solver steps (DPM-Solver++ or LCM) on all N candidates.

One request, written out:
  encode the N candidates and the request's negative prompt (the empty prompt when it has none);
  z_T from the shared numpy generator, repeated N times (one shared noise);
  for each cloud step of the plan: one guided UNet pass over the candidates in
  the step's mode (``cloud/modes.py`` names it, ``cloud/step_modes.py`` defines
  it), reading and writing named cache tensors that live in this loop only,
  then one solver update (LCM's with the step's shared noise, also repeated N times);
  return the N latents and the solver state the device needs to resume.

The loop does not know how a mode is computed: an engine answers "run mode M
on these tensors". ``TorchEngine`` (``cloud/torch_backend.py``) runs the
torch definition on a loaded model with diffusers' DPM-Solver++ (LCM: the
runtime's numpy solver, as diffusers' LCMScheduler draws its own noise);
``OrtEngine`` (``cloud/engine_backend.py``) runs the exported graphs of the
same definition in onnxruntime with the runtime's numpy solver
(``cloud/numpy_solver.py``), without torch. This module imports neither.

Several requests with the same T, k, size, guidance scale and acceleration run
as one batch (``run_batch``): their rows are concatenated through the UNet and
the solver, each with its own candidates and its own z_T, and each gets what
it would get alone (to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from obclip.runtime.errors import InputError
from obclip.runtime.noise import initial_noise, step_noise
from obclip.runtime.plan import AccelerationConfig, PlannedStep
from obclip.runtime.protocol import RequestLimits, StepsRequest, encode_handoff
from obclip.runtime.solver import DPM_SOLVER, injects_noise

from .modes import ModeSpec, TextTokens, TokenAlignment, align_tokens, mode_spec

# The request fields a batch must share (wire_dtype only changes the encoding of the answer; the
# device timestep shift only the device's steps).
BATCH_FIELDS = ("num_inference_steps", "switch_step", "height", "width", "guidance_scale", "acceleration",
                "solver")


class Solver(Protocol):
    """The request's solver over the batch's rows (row-wise, timesteps shared by the batch)."""

    timesteps: tuple[int, ...]

    def timestep(self, index: int) -> Any: ...
    def step(self, eps: Any, x: Any, noise: np.ndarray | None) -> Any:
        """The next latents; ``noise`` (numpy, one row per latent) on the steps that inject it, else None."""
        ...
    def state(self) -> tuple[np.ndarray, int, int]:
        """(last data prediction as float32 numpy, lower_order_nums, step_index)."""
        ...


class EngineBatch(Protocol):
    """One batch's texts and alignment on an engine; used as a ``with`` block."""

    def __enter__(self) -> EngineBatch: ...
    def __exit__(self, *exc: Any) -> None: ...
    def latents(self, z: np.ndarray) -> Any: ...
    def run(self, spec: ModeSpec, x: Any, t: Any, caches: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """Guided eps of every candidate in the spec's mode, and the cache tensors it wrote."""
        ...
    def numpy(self, x: Any) -> np.ndarray: ...


class Engine(Protocol):
    model_id: str
    scheduler_config: dict

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]: ...
    def text_tokens(self, texts: Sequence[str]) -> list[TextTokens]:
        """The texts as the text encoder reads them (ids, words, spans), for token alignment."""
        ...
    def batch(self, candidates: Sequence[Sequence[str]], alignments: Sequence[TokenAlignment | None],
              guidance_scale: float, negative_prompts: Sequence[str]) -> EngineBatch:
        """``negative_prompts``: each request's unconditional text ("" for the empty prompt)."""
        ...
    def solver(self, num_inference_steps: int, kind: str = DPM_SOLVER) -> Solver: ...


@dataclass
class CloudResult:
    latents: np.ndarray       # [N, C, h, w] float32
    prev_x0: np.ndarray       # [N, C, h, w] float32
    lower_order_nums: int
    step_index: int
    timesteps: tuple[int, ...]


class CloudStepRunner:
    """Runs StepsRequests on one engine (a torch model, or exported engines). Stateless between requests."""

    def __init__(self, model: Any = None, limits: RequestLimits = RequestLimits(), *, engine: Engine | None = None):
        if engine is None:
            if model is None:
                raise InputError("give a model (torch backend) or an engine")
            from .torch_backend import TorchEngine
            engine = TorchEngine(model)
        self.engine = engine
        self.model = model
        self.limits = limits

    def run(self, request: StepsRequest, before_step: Callable[[PlannedStep], None] | None = None) -> CloudResult:
        """Run the request's cloud steps. ``before_step`` is called before each
        one (a service times steps with it, and stops abandoned work by raising)."""
        return self.run_batch([request], before_step)[0]

    @staticmethod
    def batch_key(request: StepsRequest) -> tuple:
        """Requests with equal keys can run as one batch (wire_dtype only changes the encoding)."""
        return tuple(getattr(request, f) for f in BATCH_FIELDS)

    @staticmethod
    def check_batchable(requests: Sequence[StepsRequest]) -> None:
        if not requests:
            raise InputError("a batch needs at least one request")
        first = requests[0]
        for i, other in enumerate(requests[1:], 1):
            for f in BATCH_FIELDS:
                if getattr(other, f) != getattr(first, f):
                    raise InputError(f"requests 0 and {i} cannot be batched: their {f} differ "
                                     f"({getattr(first, f)!r} vs {getattr(other, f)!r})")

    def run_batch(self, requests: Sequence[StepsRequest],
                  before_step: Callable[[PlannedStep], None] | None = None) -> list[CloudResult]:
        """Run the cloud steps of several requests with the same T, k, size, guidance
        scale and acceleration as one batch through the UNet; one result per request,
        equal (to float rounding) to running it alone."""
        requests = list(requests)
        self.check_batchable(requests)
        for request in requests:
            self.limits.check(request)
        first = requests[0]
        engine = self.engine
        acceleration = first.acceleration or AccelerationConfig.none(first.switch_step)
        plan = first.plan   # built once, when the request was made (its batch shares it)
        solver = engine.solver(first.num_inference_steps, first.solver)
        # Batch reuse reads the pivot's cross-attention map word by word (modes.align_tokens).
        alignments = [align_tokens(engine.text_tokens(r.candidates)) if acceleration.reuses_attention else None
                      for r in requests]
        # One shared noise for every candidate of a request: the server's view must
        # not depend on which one is real, and the device can draw the same z_T.
        shape = (1, *engine.latent_shape(first.height, first.width))
        z = np.concatenate([np.repeat(initial_noise(r.seed, shape), r.n, axis=0) for r in requests])

        with engine.batch([r.candidates for r in requests], alignments, first.guidance_scale,
                          [r.negative_prompt for r in requests]) as batch:
            x = batch.latents(z)
            # The cache tensors, by name: written by one step, read by later ones, dropped with the batch.
            caches: dict[str, Any] = {}
            for step in plan.cloud_steps:
                if before_step is not None:
                    before_step(step)
                eps, writes = batch.run(mode_spec(acceleration, step.index), x, solver.timestep(step.index),
                                        caches)
                caches.update(writes)
                noise = None
                if injects_noise(first.solver, step.index, first.num_inference_steps):
                    # Like z_T: one draw per request from its seed, the same for all its candidates.
                    noise = np.concatenate([np.repeat(step_noise(r.seed, step.index, shape), r.n, axis=0)
                                            for r in requests])
                x = solver.step(eps, x, noise)
            del caches
            latents = batch.numpy(x)
        # The solver state after step k-1: its last data prediction, cut per request.
        prev_x0, lower_order_nums, step_index = solver.state()
        results, o = [], 0
        for r in requests:
            results.append(CloudResult(
                latents=np.ascontiguousarray(latents[o:o + r.n]), prev_x0=np.ascontiguousarray(prev_x0[o:o + r.n]),
                lower_order_nums=lower_order_nums, step_index=step_index, timesteps=solver.timesteps))
            o += r.n
        return results

    def handle(self, request_bytes: bytes) -> bytes:
        """Request bytes in, handoff bytes out: the whole server contract."""
        request = StepsRequest.from_bytes(request_bytes)
        result = self.run(request)
        return encode_handoff(
            request, result.latents, result.prev_x0, lower_order_nums=result.lower_order_nums,
            step_index=result.step_index, timesteps=result.timesteps, cloud_model=self.engine.model_id,
        )
