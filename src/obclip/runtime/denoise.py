"""The device's denoising loop, written once: classifier-free-guided DPM-Solver++ steps on numpy.

    x = denoise(unet, text, x, state, schedule, solver, steps, guidance_scale)

``unet`` is anything with diffusers' UNet signature, ``(sample, timestep, encoder_hidden_states) ->
eps`` (``runtime.graphs.UNet`` on the device); ``text`` is the text encoder's output for
``["", *prompts]``, one prompt per row of ``x``. The device pipeline runs its steps through it
(``DevicePipeline.finish``), and export's fp16/int8 variant checks run device-only trajectories
through it, so a variant is checked on the loop that ships.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .errors import InputError
from .solver import Schedule, SolverConfig, SolverState, solver_step

UNetFn = Callable[[np.ndarray, float, np.ndarray], np.ndarray]


def guidance_rows(text: np.ndarray, b: int) -> np.ndarray:
    """[empty prompt, prompt_1..prompt_b] conditioning -> one row per UNet row: [uncond x b, cond x b]."""
    if text.shape[0] != b + 1:
        raise InputError(f"text has {text.shape[0]} rows; the {b} latents need {b + 1} (the empty prompt first)")
    return np.concatenate([np.repeat(text[:1], b, axis=0), text[1:]])


def denoise(unet: UNetFn, text: np.ndarray, x: np.ndarray, state: SolverState, schedule: Schedule,
            solver: SolverConfig, steps: Sequence[int], guidance_scale: float,
            on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Run the schedule's ``steps`` (consecutive indices, from ``state.step_index``) on the latents ``x``
    [b, C, h, w]; returns the latents after the last one. ``on_step(n, len(steps))`` after each."""
    b = x.shape[0]
    rows = guidance_rows(text, b)
    for n, index in enumerate(steps):
        if index != state.step_index:
            raise InputError(f"step {index} cannot run from a solver state at step {state.step_index}")
        t = float(schedule.timesteps[index])
        out = unet(np.concatenate([x, x]), t, rows)
        eps = out[:b] + guidance_scale * (out[b:] - out[:b])
        x, state = solver_step(schedule, solver, state, eps, x)
        if on_step is not None:
            on_step(n + 1, len(steps))
    return x
