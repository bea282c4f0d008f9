"""The runtime's numpy solver as the cloud step loop's ``Solver``: one solver state stepping every row
of a batch. ``OrtEngine``'s solver, and the torch engine's for LCM (``TorchNumpySolver``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from obclip.runtime.solver import DPM_SOLVER, initial_state, make_schedule, solver_config, solver_step


class NumpySolver:
    """runtime.solver's solver of one kind, stepping every row of the batch (numpy in, numpy out)."""

    def __init__(self, scheduler_config: Mapping[str, Any], num_inference_steps: int, kind: str = DPM_SOLVER):
        self.config = solver_config(kind, scheduler_config)
        self.schedule = make_schedule(self.config, num_inference_steps)
        self.timesteps = tuple(int(t) for t in self.schedule.timesteps)
        self._state = initial_state()

    def timestep(self, index: int) -> int:
        return self.timesteps[index]

    def step(self, eps: np.ndarray, x: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        x, self._state = solver_step(self.schedule, self.config, self._state, eps, x, noise)
        return x

    def state(self) -> tuple[np.ndarray, int, int]:
        s = self._state
        assert s.prev_x0 is not None, "no cloud step ran"
        return s.prev_x0.astype(np.float32), s.lower_order_nums, s.step_index
