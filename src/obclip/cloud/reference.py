"""The single-process reference a split run must reproduce.

Hybrid SD's way: one scheduler, one loop over all T steps, the cloud UNet
(conditioned on the cloud prompt) for steps < k and the device UNet
(conditioned on the device prompt) for the rest. A split ObCLIP run (cloud
k steps -> wire bytes -> device T-k steps in numpy + onnxruntime) must end on
the same latent; tests compare the two.
"""

from __future__ import annotations

import torch

from obclip.runtime.noise import initial_noise
from obclip.runtime.plan import make_plan

from .models import TextToLatentModel
from .torch_backend import guided_eps, make_scheduler


@torch.no_grad()
def hybrid_reference_latent(cloud: TextToLatentModel, device: TextToLatentModel, *, cloud_prompt: str,
                            device_prompt: str, seed: int, num_inference_steps: int, switch_step: int,
                            guidance_scale: float, height: int, width: int) -> torch.Tensor:
    """Final latent [1, C, h, w] of a hybrid run that swaps the UNet at step k."""
    plan = make_plan(num_inference_steps, switch_step)
    scheduler = make_scheduler(cloud if switch_step > 0 else device, num_inference_steps)
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
        eps = guided_eps(model.unet, x, t, cond, uncond, guidance_scale, step)
        x = scheduler.step(eps, t, x).prev_sample
    return x
