"""The shared noise: the initial z_T, and what a stochastic solver (LCM) injects between steps.

ObCLIP starts every candidate from the same z_T, and the device must be able
to reproduce it from the seed alone. So both sides draw z_T with exactly
``initial_noise`` and nothing else:

- the device calls ``initial_noise(seed, (1, C, H, W))``; with k = 0
  (device-only) it runs all T steps from this without contacting the server;
- the cloud makes the same (1, C, H, W) draw and repeats it for all N
  candidates (``np.repeat(z, N, axis=0)``), so the latent the device extracts
  descends from the z_T the device itself would have drawn.

The generator is numpy's PCG64 seeded with ``seed``, drawing float32 standard
normals (numpy's ziggurat). numpy promises this stream only for the same
numpy build; its algorithms rarely change, but a numpy feature release may
change them (NEP 19). tests/runtime/test_plan.py pins the first values for a known
seed, so an upgrade that changes the stream fails there instead of silently
giving cloud and device different z_T. Never draw z_T with torch's generator
on one side only.

LCM adds fresh noise after every step but the last. It follows the same rule:
``step_noise(seed, i, (1, C, H, W))`` is step i's noise, drawn once per request
and repeated for all N candidates, so it is the same whichever candidate is real
(and the N latents of a pivot-only step stay equal), and the device, which holds
the seed, draws exactly what the cloud drew for any step it runs itself. Each
step has its own stream (PCG64 jumped i + 1 times: z_T's stream is the unjumped
one), so step i's noise is a function of (seed, i, shape) alone, whichever side
ran the steps before it.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

MAX_SEED = 2**63 - 1


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """z_T ~ N(0, I) as float32: ``Generator(PCG64(seed)).standard_normal(shape, dtype=float32)``.

    seed: int in [0, 2**63 - 1]. shape: non-empty tuple of positive ints,
    e.g. (1, 4, 64, 64) for a 512 px SD latent.
    """
    return _draw(np.random.PCG64(_checked_seed(seed)), shape)


def step_noise(seed: int, step_index: int, shape: tuple[int, ...]) -> np.ndarray:
    """The noise an LCM step injects after step ``step_index``, N(0, I) as float32:
    ``Generator(PCG64(seed).jumped(step_index + 1)).standard_normal(shape, dtype=float32)``."""
    if isinstance(step_index, (bool, np.bool_)) or not isinstance(step_index, (int, np.integer)) or step_index < 0:
        raise InputError(f"step_index must be an int >= 0, got {step_index!r}")
    return _draw(np.random.PCG64(_checked_seed(seed)).jumped(int(step_index) + 1), shape)


def _checked_seed(seed: int) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise InputError(f"seed must be an int in [0, 2**63 - 1], got {seed!r} ({type(seed).__name__})")
    if not 0 <= int(seed) <= MAX_SEED:
        raise InputError(f"seed must be an int in [0, 2**63 - 1], got {seed}")
    return int(seed)


def _draw(bit_generator: np.random.PCG64, shape: tuple[int, ...]) -> np.ndarray:
    dims = tuple(shape) if isinstance(shape, (tuple, list)) else None
    if (
        not dims
        or any(isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) for d in dims)
        or any(d < 1 for d in dims)
    ):
        raise InputError(f"shape must be a non-empty tuple of positive ints, e.g. (1, 4, 64, 64); got {shape!r}")
    rng = np.random.Generator(bit_generator)
    return rng.standard_normal(tuple(int(d) for d in dims), dtype=np.float32)
