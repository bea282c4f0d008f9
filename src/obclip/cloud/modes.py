"""The cloud's step modes as data: which mode a step runs, and what state it reads and writes.

Torch-free, so the onnxruntime backend (``cloud/engine_backend.py``) and the
exporter agree with the torch path (``cloud/step_modes.py``) on every name.

A ``ModeSpec`` is everything that changes the computation of one cloud step:
the plan's ``StepMode`` plus what the acceleration config adds (which caches
the step fills, the block-skip variant, the exact extras). The torch path
runs a spec on tensors; the exporter writes one ONNX graph per spec a preset
needs, named ``spec.name``.

Caches are named tensors (``attn/<module>``, ``skip/...``, ``kv/<module>.k|v``,
``guid/residual``), always in the full row layout of the request ([uncond x N,
cond x N]), except ``kv/*``, which hold the projections of the unique texts
([empty, cand_0, ...]), and ``guid/residual``, one row per candidate.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from obclip.runtime.plan import AccelerationConfig, FrozenGuidance, SkipVariant, StepMode

# --- cross-attention token alignment -----------------------------------------


@dataclass(frozen=True)
class TokenAlignment:
    """Where each candidate's text tokens sit in the pivot's (candidate 0's).

    ``columns[i][j]`` is the pivot key column that candidate i's token j reads
    its attention weight from; ``weights[i][j]`` divides a pivot column's weight
    among the candidate tokens that share it. Candidates whose tokens line up
    one to one with the pivot's (same length attribute words) are identity and
    use the pivot's map as it is.
    """

    columns: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    identity: tuple[bool, ...]


def align_token_ids(ids: Sequence[Sequence[int]]) -> TokenAlignment:
    """Align every candidate's padded token ids to candidate 0's.

    Same words map to the same column; a differing span (an attribute value,
    "old" vs "middle-aged") maps proportionally onto the pivot's span; tokens
    the pivot lacks entirely read the column before them. A pivot column that
    no candidate token reads is dropped, and the gathered map is renormalised
    so each row still sums to 1.
    """
    pivot = list(ids[0])
    columns, weights, identity = [], [], []
    for cand_ids in ids:
        cand = list(cand_ids)
        col = [0] * len(cand)
        for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, pivot, cand, autojunk=False).get_opcodes():
            for j in range(j1, j2):
                if tag == "equal":
                    col[j] = i1 + (j - j1)
                elif tag == "replace":
                    col[j] = i1 + (j - j1) * (i2 - i1) // (j2 - j1)
                elif tag == "insert":
                    col[j] = max(i1 - 1, 0)
        share = {c: col.count(c) for c in set(col)}
        columns.append(tuple(col))
        weights.append(tuple(1.0 / share[c] for c in col))
        identity.append(col == list(range(len(cand))))
    return TokenAlignment(tuple(columns), tuple(weights), tuple(identity))


# --- step modes ------------------------------------------------------------------


@dataclass(frozen=True)
class ModeSpec:
    """One cloud step's computation: a pure function of (latents, timestep, texts,
    alignment, the caches it reads) -> (guided eps, the caches it writes)."""

    mode: StepMode
    skip_variant: SkipVariant = SkipVariant.FASTER_DIFFUSION   # only meaningful with block skip
    write_attention: bool = False   # store every attention output it computes (attention cache on)
    write_skip: bool = False        # store the encoder features its skip variant reuses (block skip on)
    cross_kv_once: bool = False     # cross-attention K/V of the unique texts come from kv/* (exact)
    merged: bool = False            # merge_step0_uncond's step (p): one unconditional row (exact)
    frozen_guidance: bool = False   # conditional rows only; eps_uncond = eps_cond + guid/residual
    write_residual: bool = False    # store guid/residual = eps_uncond - eps_cond (frozen guidance on)

    @property
    def name(self) -> str:
        """A file-name-safe id, e.g. ``reuse.wa.ws-fd.kv.m``."""
        parts = [self.mode.value.replace("+", "-")]
        if self.write_attention:
            parts.append("wa")
        if self.write_skip:
            parts.append("ws")
        if self.mode.blocks_skipped or self.write_skip:
            parts.append(_VARIANT_TAGS[self.skip_variant])
        if self.cross_kv_once:
            parts.append("kv")
        if self.merged:
            parts.append("m")
        if self.frozen_guidance:
            parts.append("fg")
        if self.write_residual:
            parts.append("wr")
        return ".".join(parts)

    @property
    def aligned(self) -> bool:
        """Reads the token-alignment tensors (batch reuse's cross-attention)."""
        return self.mode.batch_reuse


_VARIANT_TAGS = {SkipVariant.FASTER_DIFFUSION: "fd", SkipVariant.DEEPCACHE: "dc", SkipVariant.DEEPCACHE_SHALLOW: "dcs"}


def mode_spec(config: AccelerationConfig | None, index: int, mode: StepMode | None = None) -> ModeSpec:
    """The spec of cloud step ``index`` under ``config`` (None: every step a plain full pass);
    ``mode`` overrides the plan's mode (tests run hand-picked sequences)."""
    if config is None:
        return ModeSpec(mode or StepMode.FULL)
    mode = config.mode(index) if mode is None else mode
    # The variant only changes steps that skip or fill the skip cache; normalise it otherwise.
    # (A pivot-only step neither skips nor fills the skip cache.)
    variant = config.skip_variant if config.block_skip and mode is not StepMode.PIVOT else SkipVariant.FASTER_DIFFUSION
    frozen = config.guidance_frozen(mode)
    # A pivot-only step writes no cache: every cache is rewritten by a step over all candidates before
    # anything reads it (AccelerationConfig checks p < r, p < s).
    pivot = mode is StepMode.PIVOT
    return ModeSpec(
        mode=mode, skip_variant=variant,
        write_attention=config.attention_cache and not mode.attention_cached and not pivot,
        write_skip=config.block_skip and not mode.blocks_skipped and not pivot,
        # A step whose attention is all cached projects no text: the flag would not change its graph.
        cross_kv_once=config.cross_kv_once and not mode.attention_cached,
        merged=index == config.merged_step and not pivot and not frozen,
        frozen_guidance=frozen,
        write_residual=config.frozen_guidance is not FrozenGuidance.OFF and not frozen and not pivot,
    )


def plan_specs(config: AccelerationConfig | None, switch_step: int) -> list[ModeSpec]:
    """The distinct specs the cloud steps 0..k-1 of a config run, in first-use order."""
    out: list[ModeSpec] = []
    for i in range(switch_step):
        spec = mode_spec(config, i)
        if spec not in out:
            out.append(spec)
    return out


# Cache tensor names (also ONNX input/output names).
ATTN = "attn/"        # attn/<attention module>: its output [2N, Lq, C]
SKIP_RES = "skip/res."   # skip/res.<i>: Faster Diffusion's cached down-block skip features [2N, C, h, w]
SKIP_MID = "skip/mid"    # Faster Diffusion: the mid block's output
SKIP_UP = "skip/up_input"   # DeepCache: the last up block's input
SKIP_UP_SHALLOW = "skip/up_shallow_input"   # DeepCache's shallowest branch: the input of the last up
                                            # block's second-to-last layer
KV = "kv/"            # kv/<attention module>.k | .v | .k_pivots: cross-attention projections of the texts
RESIDUAL = "guid/residual"   # frozen guidance: eps_uncond - eps_cond per candidate [N, C, h, w]


def is_kv(name: str) -> bool:
    return name.startswith(KV)
