"""The rows of one cloud step, per request and guidance half: one small type per layout.

    FullRows     [uncond x N, cond x N]                      a plain guided step
    MergedRows   [uncond x 1, cond x N]                      merge_step0_uncond's step (every latent is z_T's)
    CondRows     [cond x N]                                  frozen guidance: eps_uncond = eps_cond + residual
    PivotRows    [uncond of candidate 0, cond of candidate 0]  a pivot-only step
    UnguidedRows [cond x N]                                  a UNet without classifier-free guidance (LCM)

per request, concatenated per guidance half for a batch of requests: [uncond of request 0, ..., of
R-1, cond of request 0, ...]. Caches are always stored in the full layout (``to_full``/``from_full``).
With one request every op is a slice from the start or end, a chunk or an expand, so traced graphs
keep N dynamic.
"""

from __future__ import annotations

from typing import Any

import torch

from obclip.runtime.errors import InputError
from obclip.runtime.plan import StepMode

from .modes import ModeSpec

Tensor = torch.Tensor
Group = tuple[Tensor, int, bool]   # (rows, request, conditional); a group's first row is its pivot


def expand_rows(t: Tensor, n: Any) -> Tensor:
    """A one-row tensor as n rows (a view); -1 keeps the other sizes dynamic in traced graphs."""
    return t.expand(n, *([-1] * (t.dim() - 1)))


class Rows:
    """What every layout shares: the requests' sizes and offsets, and the texts' groups."""

    def __init__(self, sizes: tuple[int, ...] | None, x: Tensor):
        self.one = sizes is None or len(sizes) == 1
        self.sizes = sizes if sizes is not None else (int(x.shape[0]),)
        self.n_x = x.shape[0]   # traced when exporting
        self.r = len(self.sizes)
        offs = [0]
        for n in self.sizes:
            offs.append(offs[-1] + n)
        self.c_off = tuple(offs[:-1])                                   # request r's rows in a guidance half
        self.t_off = tuple(o + i for i, o in enumerate(self.c_off))     # its empty prompt among the texts

    def unet_rows(self, x: Tensor) -> Tensor:
        """The candidates' latents [sum N_r, ...] -> this step's UNet rows."""
        raise NotImplementedError

    def text_rows(self, t: Tensor) -> Tensor:
        """A per-text tensor ([empty, cands] per request) -> one row per UNet row."""
        raise NotImplementedError

    def groups(self, t: Tensor) -> list[Group]:
        """(rows, request, conditional) of every guidance group, in row order."""
        raise NotImplementedError

    def halves(self, eps: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        """(unconditional, conditional) eps of the candidates."""
        raise NotImplementedError

    def to_full(self, t: Tensor) -> Tensor:
        """This step's rows in the full layout, so caches have one shape."""
        return t

    def from_full(self, t: Tensor) -> Tensor:
        """A cache in the full layout -> this step's rows of it."""
        return t

    def pivot_texts(self, t: Tensor) -> Tensor:
        """The pivots' texts in group order: each request's empty prompt, then its candidate 0."""
        if self.one:
            return t[:2]
        return torch.cat([t[a:a + 1] for a in self.t_off] + [t[a + 1:a + 2] for a in self.t_off])

    def text_groups(self, t: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per request: (its empty prompt's row, its candidates' rows) of a per-text tensor."""
        if self.one:
            return [(t[:1], t[1:])]
        return [(t[a:a + 1], t[a + 1:a + 1 + n]) for a, n in zip(self.t_off, self.sizes)]

    def _candidates(self, t: Tensor) -> list[Tensor]:
        return [t[a + 1:a + 1 + n] for a, n in zip(self.t_off, self.sizes)]


class FullRows(Rows):
    def unet_rows(self, x: Tensor) -> Tensor:
        return torch.cat([x, x])

    def text_rows(self, t: Tensor) -> Tensor:
        if self.one:
            return torch.cat([expand_rows(t[:1], self.n_x), t[1:]])
        return torch.cat([expand_rows(t[a:a + 1], n) for a, n in zip(self.t_off, self.sizes)] + self._candidates(t))

    def groups(self, t: Tensor) -> list[Group]:
        if self.one:
            u, c = t.chunk(2)
            return [(u, 0, False), (c, 0, True)]
        m = sum(self.sizes)
        uncond = [t[o:o + n] for o, n in zip(self.c_off, self.sizes)]
        cond = [t[m + o:m + o + n] for o, n in zip(self.c_off, self.sizes)]
        return [(g, r, False) for r, g in enumerate(uncond)] + [(g, r, True) for r, g in enumerate(cond)]

    def halves(self, eps: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        eps_u, eps_c = eps.chunk(2)
        return eps_u, eps_c


class MergedRows(Rows):
    def unet_rows(self, x: Tensor) -> Tensor:
        if self.one:
            return torch.cat([x[:1], x])
        return torch.cat([x[o:o + 1] for o in self.c_off] + [x])

    def text_rows(self, t: Tensor) -> Tensor:
        if self.one:
            return t
        return torch.cat([t[a:a + 1] for a in self.t_off] + self._candidates(t))

    def groups(self, t: Tensor) -> list[Group]:
        if self.one:
            return [(t[:1], 0, False), (t[1:], 0, True)]
        uncond = [t[i:i + 1] for i in range(self.r)]
        cond = [t[self.r + o:self.r + o + n] for o, n in zip(self.c_off, self.sizes)]
        return [(g, r, False) for r, g in enumerate(uncond)] + [(g, r, True) for r, g in enumerate(cond)]

    def to_full(self, t: Tensor) -> Tensor:
        if self.one:
            return torch.cat([expand_rows(t[:1], self.n_x), t[1:]])
        return torch.cat([expand_rows(t[i:i + 1], n) for i, n in enumerate(self.sizes)] + [t[self.r:]])

    def halves(self, eps: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.one:
            return eps[:1], eps[1:]   # broadcast over the candidates
        return torch.cat([expand_rows(eps[i:i + 1], n) for i, n in enumerate(self.sizes)]), eps[self.r:]


class CondRows(Rows):
    """Frozen guidance. A cache it fills gets its rows in both halves: only such steps read them."""

    def unet_rows(self, x: Tensor) -> Tensor:
        return x

    def text_rows(self, t: Tensor) -> Tensor:
        return t[1:] if self.one else torch.cat(self._candidates(t))

    def groups(self, t: Tensor) -> list[Group]:
        if self.one:
            return [(t, 0, True)]
        return [(t[o:o + n], r, True) for r, (o, n) in enumerate(zip(self.c_off, self.sizes))]

    def to_full(self, t: Tensor) -> Tensor:
        return torch.cat([t, t])

    def from_full(self, t: Tensor) -> Tensor:
        return t.chunk(2)[1] if self.one else t[sum(self.sizes):]

    def halves(self, eps: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        assert residual is not None, "a frozen-guidance step needs the guidance residual"
        return eps + residual, eps


class PivotRows(Rows):
    """Candidate 0 only; every candidate gets its eps (their latents are identical then)."""

    def unet_rows(self, x: Tensor) -> Tensor:
        pivots = x[:1] if self.one else torch.cat([x[o:o + 1] for o in self.c_off])
        return torch.cat([pivots, pivots])

    def text_rows(self, t: Tensor) -> Tensor:
        return self.pivot_texts(t)

    def groups(self, t: Tensor) -> list[Group]:
        return [(t[i:i + 1], i % self.r, i >= self.r) for i in range(2 * self.r)]

    def to_full(self, t: Tensor) -> Tensor:
        raise NotImplementedError("a pivot-only step writes no cache")

    def halves(self, eps: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.one:
            return expand_rows(eps[:1], self.n_x), expand_rows(eps[1:2], self.n_x)
        u = torch.cat([expand_rows(eps[i:i + 1], n) for i, n in enumerate(self.sizes)])
        c = torch.cat([expand_rows(eps[self.r + i:self.r + i + 1], n) for i, n in enumerate(self.sizes)])
        return u, c


class UnguidedRows(CondRows):
    """A guidance-embedding UNet (LCM-SDXL): the conditional rows are all there is, and its caches are
    stored in this layout (every step of such a model has it)."""

    def to_full(self, t: Tensor) -> Tensor:
        return t

    def from_full(self, t: Tensor) -> Tensor:
        return t

    def pivot_texts(self, t: Tensor) -> Tensor:
        """Each request's candidate 0 (there is no unconditional group)."""
        return t[1:2] if self.one else torch.cat([t[a + 1:a + 2] for a in self.t_off])

    def halves(self, eps: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        return eps, eps   # guided eps = eps_u + w (eps_c - eps_u) = eps exactly


def rows_for(spec: ModeSpec, sizes: tuple[int, ...] | None, x: Tensor, guided: bool = True) -> Rows:
    """The layout of a step in the spec's mode (``guided``: the UNet takes classifier-free guidance)."""
    pivot = spec.mode is StepMode.PIVOT
    if not guided:
        used = [name for name, on in (("merge_step0_uncond", spec.merged), ("frozen_guidance", spec.frozen_guidance
                                      or spec.write_residual), ("pivot_only_steps", pivot)) if on]
        if used:
            raise InputError(f"{', '.join(used)} change the unconditional rows, which a guidance-embedding UNet "
                             "(LCM) does not have; turn them off for this model")
        return UnguidedRows(sizes, x)
    if spec.merged + spec.frozen_guidance + pivot > 1:
        raise InputError("a step's rows are merged, conditional-only or pivot-only, not several of them")
    kind = PivotRows if pivot else CondRows if spec.frozen_guidance else MergedRows if spec.merged else FullRows
    return kind(sizes, x)
