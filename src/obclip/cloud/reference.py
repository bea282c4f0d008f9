"""The single-process reference a split run must reproduce.

Hybrid SD's way: one scheduler, one loop over all T steps, the cloud UNet
(conditioned on the cloud prompt) for steps < k and the device UNet
(conditioned on the device prompt, and given the timestep plus the device
timestep shift dt) for the rest. A split ObCLIP run (cloud k steps -> wire
bytes -> device T-k steps in numpy + onnxruntime) must end on the same latent;
tests compare the two.

The scheduler is diffusers' own (DPMSolverMultistepScheduler or LCMScheduler),
so the comparison also checks the runtime's numpy solver. For LCM the reference
swaps in the request's shared noise (``runtime.noise.step_noise``) for the
noise diffusers draws from torch's generator, on diffusers' own alphas.
"""

from __future__ import annotations

import torch

from obclip.runtime.noise import initial_noise, step_noise
from obclip.runtime.plan import make_plan
from obclip.runtime.solver import DPM_SOLVER, injects_noise

from .models import TextToLatentModel
from .torch_backend import guided_eps, make_scheduler


@torch.no_grad()
def hybrid_reference_latent(cloud: TextToLatentModel, device: TextToLatentModel, *, cloud_prompt: str,
                            device_prompt: str, seed: int, num_inference_steps: int, switch_step: int,
                            guidance_scale: float, height: int, width: int, solver: str = DPM_SOLVER,
                            device_timestep_shift: int = 0) -> torch.Tensor:
    """Final latent [1, C, h, w] of a hybrid run that swaps the UNet at step k."""
    plan = make_plan(num_inference_steps, switch_step, solver=solver, device_timestep_shift=device_timestep_shift)
    scheduler = make_scheduler(cloud if switch_step > 0 else device, num_inference_steps, solver)
    shape = (1, *device.latent_shape(height, width))
    x = torch.from_numpy(initial_noise(seed, shape))

    texts = {}
    for side, model, prompt in (("cloud", cloud, cloud_prompt), ("device", device, device_prompt)):
        emb = model.encode_prompts([prompt, ""])
        texts[side] = (emb[:1], emb[1:])

    for step in plan.steps:
        model = cloud if step.side == "cloud" else device
        cond, uncond = texts[step.side]
        t = scheduler.timesteps[step.index]
        eps = guided_eps(model.unet, x, t + step.timestep_shift, cond, uncond, guidance_scale, step)
        # A generator of our own, so diffusers' (discarded) LCM draw leaves torch's global one alone.
        out = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(0))
        x = out.prev_sample
        if injects_noise(solver, step.index, num_inference_steps):
            alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps[step.index + 1]]
            noise = torch.from_numpy(step_noise(seed, step.index, shape))
            x = alpha_bar.sqrt() * out.denoised + (1 - alpha_bar).sqrt() * noise
    return x
