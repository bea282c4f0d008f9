"""A test harness over cloud/step_modes.py: cloud steps run one at a time through ``run_mode`` on fixed
texts, holding the caches between them as the cloud step loop (``cloud/steps.py``) does."""

from __future__ import annotations

import torch

from obclip.cloud.modes import TokenAlignment, mode_spec
from obclip.cloud.step_modes import AlignmentTensors, ModeInputs, processors_installed, run_mode


class ModeSteps:
    """One request (``cond`` [N, L, D], ``uncond`` [1, L, D], ``alignment`` or None) or a batch of
    requests (sequences of each), as ``with ModeSteps(...) as steps: steps.guided_eps(x, t, step)``."""

    def __init__(self, unet, config, *, cond, uncond, guidance_scale, alignment=None, added=None):
        conds = [cond] if torch.is_tensor(cond) else list(cond)
        unconds = [uncond] * len(conds) if torch.is_tensor(uncond) else list(uncond)
        alignments = [alignment] * len(conds) if alignment is None or isinstance(alignment, TokenAlignment) \
            else list(alignment)
        self.unet, self.config, self.guidance_scale = unet, config, float(guidance_scale)
        self.sizes = tuple(int(c.shape[0]) for c in conds)
        self.text = torch.cat([t for u, c in zip(unconds, conds) for t in (u, c)])   # [empty, cands] per request
        self.alignment = tuple(None if al is None else AlignmentTensors.partitioned(al, self.text.device)
                               for al in alignments)
        self.added = added   # the UNet's added inputs, one row per text ([empty, cands] per request)
        self.caches: dict[str, torch.Tensor] = {}

    def __enter__(self) -> ModeSteps:
        self._installed = processors_installed(self.unet)
        self._installed.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.caches.clear()
        self._installed.__exit__(*exc)

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(t, list(self.sizes)))

    @torch.no_grad()
    def guided_eps(self, x, t, step):
        spec = mode_spec(self.config, step.index, step.mode)
        inputs = ModeInputs(x=x, timestep=t if torch.is_tensor(t) else torch.tensor(t), text=self.text,
                            guidance_scale=self.guidance_scale, sizes=self.sizes, alignment=self.alignment,
                            added=self.added)
        eps, writes = run_mode(self.unet, spec, inputs, self.caches)
        self.caches.update(writes)
        return eps
