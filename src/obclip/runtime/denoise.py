"""The device's denoising loop, written once: classifier-free-guided solver steps on numpy.

    x = denoise(unet, text, x, state, schedule, solver, steps, guidance_scale, seed=seed, timestep_shift=dt)

``unet`` is anything with diffusers' UNet signature, ``(sample, timestep, encoder_hidden_states,
**added) -> eps`` (``runtime.graphs.UNet`` on the device); ``text`` is the text encoder's output for
``["", *prompts]``, one prompt per row of ``x``, and ``added`` the UNet's added inputs laid out the
same way (SDXL family: ``text_embeds``, ``time_ids``; ``DeviceGraphs.condition`` gives both).
The device pipeline runs its steps through it
(``DevicePipeline.finish``), and export's fp16/int8 variant checks run device-only trajectories
through it, so a variant is checked on the loop that ships. ``solver`` is DPM-Solver++ or LCM
(``runtime.solver``); LCM's injected noise is the request's shared noise, drawn from ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .errors import InputError
from .noise import step_noise
from .solver import LCMConfig, Schedule, SolverConfig, SolverState, injects_noise, solver_step

UNetFn = Callable[..., np.ndarray]   # (sample, timestep, encoder_hidden_states, **added inputs) -> eps


def guidance_rows(text: np.ndarray, b: int) -> np.ndarray:
    """[empty prompt, prompt_1..prompt_b] conditioning -> one row per UNet row: [uncond x b, cond x b]."""
    if text.shape[0] != b + 1:
        raise InputError(f"text has {text.shape[0]} rows; the {b} latents need {b + 1} (the empty prompt first)")
    return np.concatenate([np.repeat(text[:1], b, axis=0), text[1:]])


def denoise(unet: UNetFn, text: np.ndarray, x: np.ndarray, state: SolverState, schedule: Schedule,
            solver: SolverConfig | LCMConfig, steps: Sequence[int], guidance_scale: float,
            on_step: Callable[[int, int], None] | None = None, *, seed: int | None = None,
            timestep_shift: int = 0, added: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Run the schedule's ``steps`` (consecutive indices, from ``state.step_index``) on the latents ``x``
    [b, C, h, w]; returns the latents after the last one. ``on_step(n, len(steps))`` after each.

    ``seed``: the request's seed, for the noise LCM injects (every row gets the same draw, as every
    candidate did on the cloud). ``timestep_shift``: dt, added to the timestep the UNet is given
    (the solver stays on the schedule's timesteps). ``added``: the UNet's added inputs, one row per
    text like ``text``."""
    b = x.shape[0]
    rows = guidance_rows(text, b)
    added_rows = {name: guidance_rows(value, b) for name, value in (added or {}).items()}
    for n, index in enumerate(steps):
        if index != state.step_index:
            raise InputError(f"step {index} cannot run from a solver state at step {state.step_index}")
        out = unet(np.concatenate([x, x]), schedule.model_timestep(index, timestep_shift), rows, **added_rows)
        eps = out[:b] + guidance_scale * (out[b:] - out[:b])
        noise = None
        if injects_noise(solver.kind, index, schedule.num_inference_steps):
            if seed is None:
                raise InputError(f"the {solver.kind} solver injects noise at step {index}: give denoise the "
                                 "request's seed")
            noise = np.repeat(step_noise(seed, index, (1, *x.shape[1:])), b, axis=0)
        x, state = solver_step(schedule, solver, state, eps, x, noise)
        if on_step is not None:
            on_step(n + 1, len(steps))
    return x
