"""The cloud's step loop: the first k DPM-Solver++ steps on all N candidates.

One request, written out:
  encode the N candidates and the empty prompt;
  z_T from the shared numpy generator, repeated N times (one shared noise);
  for each cloud step of the plan: one guided UNet pass over 2N rows in the
  step's mode (full / batch reuse / attention cache / block skip, see
  cloud/acceleration.py), one solver update (diffusers' DPMSolverMultistepScheduler);
  return the N latents and the solver state the device needs to resume.

Several requests with the same T, k, size, guidance scale and acceleration run
as one batch (``run_batch``): their rows are concatenated through the UNet and
the solver, each with its own candidates and its own z_T, and each gets what
it would get alone (to float rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler

from obclip.runtime.noise import initial_noise
from obclip.runtime.plan import AccelerationConfig, PlannedStep, make_plan
from obclip.runtime.protocol import RequestLimits, StepsRequest, encode_handoff
from obclip.runtime.solver import SolverConfig, make_schedule

from .acceleration import AcceleratedUNet, token_alignment
from .models import TextToLatentModel

# The request fields a batch must share (wire_dtype only changes the encoding of the answer).
BATCH_FIELDS = ("num_inference_steps", "switch_step", "height", "width", "guidance_scale", "acceleration")


def make_scheduler(model: TextToLatentModel, num_inference_steps: int) -> DPMSolverMultistepScheduler:
    """diffusers' DPM-Solver++ for the model's scheduler config, checked against
    the runtime's numpy schedule so the two sides cannot drift apart."""
    scheduler = DPMSolverMultistepScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    ours = make_schedule(SolverConfig.from_scheduler_config(model.scheduler_config), num_inference_steps)
    if not np.array_equal(scheduler.timesteps.numpy().astype(np.int64), ours.timesteps):
        raise RuntimeError("diffusers and runtime.solver disagree on the timestep schedule for "
                           f"{model.scheduler_config}; fix runtime/solver.py")
    return scheduler


@torch.no_grad()
def guided_eps(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               guidance_scale: float, step: PlannedStep | None = None) -> torch.Tensor:
    """One plain classifier-free-guided UNet evaluation for a batch of latents.

    Rows are [unconditional x N, conditional x N]. The reference hybrid run
    uses it; the cloud's accelerated steps go through AcceleratedUNet.
    """
    latent_in = torch.cat([x, x])
    eps = unet(latent_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@dataclass
class CloudResult:
    latents: np.ndarray       # [N, C, h, w] float32
    prev_x0: np.ndarray       # [N, C, h, w] float32
    lower_order_nums: int
    step_index: int
    timesteps: tuple[int, ...]


class CloudStepRunner:
    """Runs a StepsRequest on one loaded model. Stateless between requests."""

    def __init__(self, model: TextToLatentModel, limits: RequestLimits = RequestLimits()):
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
    def check_batchable(requests) -> None:
        if not requests:
            raise ValueError("a batch needs at least one request")
        first = requests[0]
        for i, other in enumerate(requests[1:], 1):
            for f in BATCH_FIELDS:
                if getattr(other, f) != getattr(first, f):
                    raise ValueError(f"requests 0 and {i} cannot be batched: their {f} differ "
                                     f"({getattr(first, f)!r} vs {getattr(other, f)!r})")

    @torch.no_grad()
    def run_batch(self, requests, before_step: Callable[[PlannedStep], None] | None = None) -> list[CloudResult]:
        """Run the cloud steps of several requests with the same T, k, size, guidance
        scale and acceleration as one batch through the UNet; one result per request,
        equal (to float rounding) to running it alone."""
        requests = list(requests)
        self.check_batchable(requests)
        for request in requests:
            self.limits.check(request)
        first = requests[0]
        model = self.model
        device, dtype = model.unet.device, model.unet.dtype
        acceleration = first.acceleration or AccelerationConfig.none(first.switch_step)
        plan = make_plan(first.num_inference_steps, first.switch_step, acceleration)
        scheduler = make_scheduler(model, first.num_inference_steps)
        if "sde" in str(scheduler.config.get("algorithm_type", "")):
            raise ValueError("the cloud steps need a deterministic DPM-Solver++ (algorithm_type dpmsolver++)")

        # One text-encoder call for every request: [cands of request 0, ..., cands of request R-1, ""].
        sizes = [r.n for r in requests]
        text = model.encode_prompts([c for r in requests for c in r.candidates] + [""])
        uncond = text[-1:]
        conds = list(torch.split(text[:-1], sizes))
        # Batch reuse reads the pivot's cross-attention map at each candidate's token positions.
        alignments = [token_alignment(model.tokenizer, r.candidates) if acceleration.batch_reuse else None
                      for r in requests]

        # One shared noise for every candidate of a request: the server's view must
        # not depend on which one is real, and the device can draw the same z_T.
        shape = (1, *model.latent_shape(first.height, first.width))
        x = torch.cat([torch.from_numpy(initial_noise(r.seed, shape)).to(device=device, dtype=dtype)
                       .repeat(r.n, 1, 1, 1)
                       for r in requests])

        # Caches live in `accel` and die with it: nothing carries over to the next batch.
        # DPM-Solver++ is row-wise with timesteps shared by the batch, so one scheduler steps every row.
        with AcceleratedUNet(model.unet, acceleration, cond=conds, uncond=[uncond] * len(requests),
                             guidance_scale=first.guidance_scale, alignment=alignments) as accel:
            for step in plan.cloud_steps:
                if before_step is not None:
                    before_step(step)
                t = scheduler.timesteps[step.index]
                eps = accel.guided_eps(x, t, step)
                x = scheduler.step(eps, t, x).prev_sample

        # DPM-Solver++(2M) state after step k-1: its last data prediction, cut per request.
        latents = x.float().cpu().numpy()
        prev_x0 = scheduler.model_outputs[-1].float().cpu().numpy()
        timesteps = tuple(int(t) for t in scheduler.timesteps)
        results, o = [], 0
        for n in sizes:
            results.append(CloudResult(
                latents=np.ascontiguousarray(latents[o:o + n]), prev_x0=np.ascontiguousarray(prev_x0[o:o + n]),
                lower_order_nums=int(scheduler.lower_order_nums), step_index=int(scheduler.step_index),
                timesteps=timesteps))
            o += n
        return results

    def handle(self, request_bytes: bytes) -> bytes:
        """Request bytes in, handoff bytes out: the whole server contract."""
        request = StepsRequest.from_bytes(request_bytes)
        result = self.run(request)
        return encode_handoff(
            request, result.latents, result.prev_x0, lower_order_nums=result.lower_order_nums,
            step_index=result.step_index, timesteps=result.timesteps, cloud_model=self.model.model_id,
        )
