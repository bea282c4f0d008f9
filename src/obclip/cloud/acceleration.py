"""Server-side acceleration of the cloud steps, per request or batch (docs/method.md, section 4).

The modes themselves (full, batch reuse = the paper's Algorithm 2, attention
cache, both block-skip variants, cache + skip, the exact extras) are defined
once, as a pure function of tensors, in ``cloud/step_modes.py``; the
configuration side (which step runs which mode, cache names) in
``cloud/modes.py``. This module keeps the object the tests, the FLOPs
benchmark and older callers use: an ``AcceleratedUNet`` holds one batch's
texts, alignment and cache tensors and evaluates one guided UNet pass per
cloud step through ``run_mode``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from obclip.runtime.plan import AccelerationConfig, PlannedStep

from .modes import ATTN, TokenAlignment, align_tokens, mode_spec, text_tokens
from .step_modes import AlignmentTensors, ModeInputs, _Layout, processors_installed, run_mode

__all__ = ["AcceleratedUNet", "TokenAlignment", "token_alignment"]


def token_alignment(tokenizer: Any, candidates: Sequence[str]) -> TokenAlignment:
    """Align every candidate's tokens to candidate 0's, word by word (``modes.align_tokens``);
    ``tokenizer`` is a transformers fast tokenizer."""
    return align_tokens(text_tokens(tokenizer.backend_tokenizer, candidates, tokenizer.model_max_length,
                                    tokenizer.pad_token_id))


class _BatchView:
    """Read-only view of a batch's layout and caches (tests check that caches stay per request)."""

    def __init__(self, owner: AcceleratedUNet):
        self._owner = owner

    def request_rows(self, r: int) -> tuple[slice, slice]:
        return _Layout(self._owner.sizes, False, self._owner.cond).request_rows(r)

    @property
    def attention_out(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._owner.caches.items() if k.startswith(ATTN)}


class AcceleratedUNet:
    """Guided UNet evaluations for one request, or a batch of requests that share
    T, k, size, guidance scale and acceleration (so every step has one mode), in
    the modes their step plan gives.

    One request: ``cond`` [N, L, D], ``uncond`` [1, L, D], ``alignment`` or None.
    A batch of R: ``cond`` a sequence of R [N_r, L, D], ``uncond`` a sequence of R
    [1, L, D] (or one, shared), ``alignment`` a sequence of R (or None). ``x`` is
    then the requests' latents concatenated in order ([sum N_r, C, h, w]); use
    ``split`` to cut a result back per request. The cache tensors are ``caches``
    (named as in ``cloud/modes.py``); they die with the ``with`` block.
    """

    def __init__(self, unet: Any, config: AccelerationConfig | None, *, cond: Any, uncond: Any,
                 guidance_scale: float, alignment: Any = None):
        conds = [cond] if torch.is_tensor(cond) else list(cond)
        if not conds:
            raise ValueError("a batch needs at least one request")
        unconds = [uncond] * len(conds) if torch.is_tensor(uncond) else list(uncond)
        alignments = [alignment] * len(conds) if alignment is None or isinstance(alignment, TokenAlignment) \
            else list(alignment)
        if len(unconds) != len(conds) or len(alignments) != len(conds):
            raise ValueError(f"{len(conds)} requests but {len(unconds)} unconditional texts and "
                             f"{len(alignments)} alignments")
        if isinstance(alignment, TokenAlignment) and len(conds) > 1:
            raise ValueError("give one alignment per request in a batch")
        for c, u, al in zip(conds, unconds, alignments):
            if c.ndim != 3 or u.shape != (1, *c.shape[1:]) or c.shape[1:] != conds[0].shape[1:]:
                raise ValueError(f"cond must be [N, L, D] and uncond [1, L, D], got {tuple(c.shape)} and "
                                 f"{tuple(u.shape)}")
            if al is not None and len(al.starts) != c.shape[0]:
                raise ValueError(f"alignment is for {len(al.starts)} candidates, the request has {c.shape[0]}")
        self.unet = unet
        self.config = config or AccelerationConfig.none(0)
        self.sizes = tuple(int(c.shape[0]) for c in conds)
        self.n = sum(self.sizes)                  # latent rows, all requests
        self.guidance_scale = float(guidance_scale)
        self.cond = torch.cat(conds)
        # The unique texts: [empty of request 0, its candidates, empty of request 1, ...].
        self.text = torch.cat([t for u, c in zip(unconds, conds) for t in (u, c)])
        device = self.text.device
        self.alignment = tuple(None if al is None else AlignmentTensors.partitioned(al, device)
                               for al in alignments)
        self.caches: dict[str, torch.Tensor] = {}
        self.state = _BatchView(self)
        self._installed: Any = None

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Rows of a [sum N_r, ...] tensor, per request (views)."""
        return list(torch.split(t, list(self.sizes)))

    # Model surgery that can be undone: the UNet is as it was after the block.
    def __enter__(self) -> AcceleratedUNet:
        self._installed = processors_installed(self.unet)
        self._installed.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        installed, self._installed = self._installed, None
        self.caches.clear()
        installed.__exit__(*exc)

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t: Any, step: PlannedStep) -> torch.Tensor:
        """Classifier-free-guided eps for the latents x [sum N_r, C, h, w] at timestep t."""
        if self._installed is None:
            raise RuntimeError("use AcceleratedUNet inside a `with` block")
        if x.shape[0] != self.n:
            raise ValueError(f"x has {x.shape[0]} rows, the request has {self.n} candidates"
                             if len(self.sizes) == 1 else
                             f"x has {x.shape[0]} rows, the batch has {self.n} candidates in all")
        spec = mode_spec(self.config, step.index, step.mode)
        timestep = t if torch.is_tensor(t) else torch.tensor(t)
        inputs = ModeInputs(x=x, timestep=timestep, text=self.text, guidance_scale=self.guidance_scale,
                            sizes=self.sizes, alignment=self.alignment)
        eps, writes = run_mode(self.unet, spec, inputs, self.caches)
        self.caches.update(writes)
        return eps
