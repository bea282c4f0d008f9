"""The single-process reference a split run must reproduce.

Hybrid SD's way: one scheduler, one loop over all T steps, the cloud UNet
(conditioned on the cloud prompt) for steps < k and the device UNet
(conditioned on the device prompt, and given the timestep plus the device
timestep shift dt) for the rest. A split ObCLIP run (cloud k steps -> wire
bytes -> device T-k steps in numpy + onnxruntime) must end on the same latent;
tests compare the two.

Each UNet is called through diffusers' own forward with the conditioning its
family takes (``TextToLatentModel.encode_texts`` / ``added_inputs``: SDXL's
pooled text and size conditioning, LCM's guidance embedding, which runs the
conditional rows only).

The scheduler is diffusers' own (DPMSolverMultistepScheduler or LCMScheduler),
so the comparison also checks the runtime's numpy solver. For LCM the reference
swaps in the request's shared noise (``runtime.noise.step_noise``) for the
noise diffusers draws from torch's generator, on diffusers' own alphas.
"""

from __future__ import annotations

import torch

from obclip.runtime.conditioning import TIMESTEP_COND
from obclip.runtime.noise import initial_noise, step_noise
from obclip.runtime.plan import make_plan
from obclip.runtime.solver import DPM_SOLVER, injects_noise

from .models import TextToLatentModel
from .torch_backend import make_scheduler


def reference_eps(model: TextToLatentModel, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
                  added: dict[str, torch.Tensor], guidance_scale: float) -> torch.Tensor:
    """One plain UNet evaluation (diffusers' forward) for latents ``x`` [b, ...] and the rows
    ``text``/``added`` of [negative prompt, prompt_1..prompt_b]: classifier-free guided, or (a
    guidance-embedding UNet) the conditional prediction."""
    b = x.shape[0]
    if not model.conditioning.guided:
        rest = {k: v[1:] for k, v in added.items() if k != TIMESTEP_COND}
        return model.unet(x, t, encoder_hidden_states=text[1:], timestep_cond=added[TIMESTEP_COND][1:],
                          added_cond_kwargs=rest).sample

    def rows(a: torch.Tensor) -> torch.Tensor:
        return torch.cat([a[:1].expand(b, *a.shape[1:]), a[1:]])

    eps = model.unet(torch.cat([x, x]), t, encoder_hidden_states=rows(text),
                     added_cond_kwargs={k: rows(v) for k, v in added.items()}).sample
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def hybrid_reference_latent(cloud: TextToLatentModel, device: TextToLatentModel, *, cloud_prompt: str,
                            device_prompt: str, seed: int, num_inference_steps: int, switch_step: int,
                            guidance_scale: float, height: int, width: int, solver: str = DPM_SOLVER,
                            device_timestep_shift: int = 0, negative_prompt: str = "") -> torch.Tensor:
    """Final latent [1, C, h, w] of a hybrid run that swaps the UNet at step k; the unconditional
    rows of both UNets are conditioned on ``negative_prompt`` (the empty prompt by default)."""
    plan = make_plan(num_inference_steps, switch_step, solver=solver, device_timestep_shift=device_timestep_shift)
    scheduler = make_scheduler(cloud if switch_step > 0 else device, num_inference_steps, solver)
    shape = (1, *device.latent_shape(height, width))
    x = torch.from_numpy(initial_noise(seed, shape))

    texts = {}
    for side, model, prompt in (("cloud", cloud, cloud_prompt), ("device", device, device_prompt)):
        emb, from_text = model.encode_texts([negative_prompt, prompt])
        texts[side] = (emb, model.added_inputs([negative_prompt, prompt], from_text, height, width, guidance_scale))

    for step in plan.steps:
        model = cloud if step.side == "cloud" else device
        text, added = texts[step.side]
        t = scheduler.timesteps[step.index]
        eps = reference_eps(model, x, t + step.timestep_shift, text, added, guidance_scale)
        # A generator of our own, so diffusers' (discarded) LCM draw leaves torch's global one alone.
        out = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(0))
        x = out.prev_sample
        if injects_noise(solver, step.index, num_inference_steps):
            alpha_bar = scheduler.alphas_cumprod[scheduler.timesteps[step.index + 1]]
            noise = torch.from_numpy(step_noise(seed, step.index, shape))
            x = alpha_bar.sqrt() * out.denoised + (1 - alpha_bar).sqrt() * noise
    return x
