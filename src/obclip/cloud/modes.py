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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from obclip.runtime.plan import AccelerationConfig, FrozenGuidance, SkipVariant, StepMode

# --- cross-attention token alignment -----------------------------------------

# The exported reuse graphs' alignment inputs, each [N, L]: the pivot key columns
# [start, stop) a candidate token reads, and the share of their weight it gets.
ALIGN_INPUTS = ("align_starts", "align_stops", "align_weights")


@dataclass(frozen=True)
class TextTokens:
    """One text as the text encoder sees it, padded to its context length: the token ids,
    the pre-tokenizer word each token belongs to (None for BOS, EOS and padding) and each
    token's character span in the text."""

    ids: tuple[int, ...]
    words: tuple[int | None, ...]
    spans: tuple[tuple[int, int], ...]


def text_tokens(tokenizer: Any, texts: Sequence[str], length: int, pad_id: int) -> list[TextTokens]:
    """Tokenize with a ``tokenizers.Tokenizer`` (BOS/EOS added by its post-processor), cut to
    ``length`` and padded with ``pad_id``: the ids are exactly what the text encoder reads."""
    out = []
    for enc in tokenizer.encode_batch(list(texts)):
        ids, words, spans = list(enc.ids[:length]), list(enc.word_ids[:length]), list(enc.offsets[:length])
        pad = length - len(ids)
        out.append(TextTokens(tuple(ids) + (pad_id,) * pad, tuple(words) + (None,) * pad,
                              tuple(map(tuple, spans)) + ((0, 0),) * pad))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class TokenAlignment:
    """Where each candidate's tokens read the pivot's (candidate 0's) cross-attention map.

    Candidate i's token j reads the sum of the pivot's key columns
    ``starts[i][j] <= c < stops[i][j]`` (a whole word of the pivot), scaled by
    ``weights[i][j]``, which splits that word's weight among the candidate tokens
    reading it; each query row is then renormalised to sum to 1. Candidates whose
    tokens line up one to one with the pivot's are identity and use its map as it is.
    """

    starts: tuple[tuple[int, ...], ...]
    stops: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    identity: tuple[bool, ...]


@dataclass(frozen=True)
class _Unit:
    key: tuple              # what makes two units equal: their token ids
    start: int              # token positions [start, stop)
    stop: int
    group: int              # the whitespace-separated word it belongs to


def _units(text: TextTokens) -> list[_Unit]:
    """A text as pre-tokenizer words (special tokens one unit each), each tagged with its
    whitespace word: "middle-aged" is three pre-tokenizer words and one whitespace word."""
    units: list[_Unit] = []
    group, prev_end = -1, None
    j = 0
    while j < len(text.ids):
        w = text.words[j]
        stop = j + 1
        if w is not None:
            while stop < len(text.ids) and text.words[stop] == w:
                stop += 1
        begins = text.spans[j][0]
        if w is None or prev_end is None or begins != prev_end:
            group += 1
        prev_end = None if w is None else text.spans[stop - 1][1]
        key = ("word", *text.ids[j:stop]) if w is not None else ("special", text.ids[j])
        units.append(_Unit(key, j, stop, group))
        j = stop
    return units


def _groups(units: Sequence[_Unit]) -> list[tuple[int, int]]:
    """Token ranges of the whitespace words in a run of units, in order."""
    out: list[tuple[int, int]] = []
    last = None
    for u in units:
        if u.group == last:
            out[-1] = (out[-1][0], u.stop)
        else:
            out.append((u.start, u.stop))
            last = u.group
    return out


def align_tokens(texts: Sequence[TextTokens]) -> TokenAlignment:
    """Align every candidate to candidate 0 (the pivot), word by word.

    Words (the tokenizer's pre-tokenizer words, mapped to token positions) are
    matched with difflib; equal words read the pivot's tokens one to one. In a
    differing span ("young man" vs "middle-aged woman"), whitespace words pair up in
    order when both sides have as many (else each candidate word reads the pivot
    words its proportional position overlaps), and every token of a candidate word
    reads the sum of its pivot word's columns, so a 3-token value against a 1-token
    one (or the reverse) loses none of the word's weight. Words the pivot lacks read
    the token before them; pivot words no candidate token reads are dropped (the
    renormalisation absorbs them).
    """
    pivot = _units(texts[0])
    starts, stops, weights, identity = [], [], [], []
    for text in texts:
        cand = _units(text)
        ranges: list[tuple[int, int]] = [(j, j + 1) for j in range(len(text.ids))]
        matcher = difflib.SequenceMatcher(None, [u.key for u in pivot], [u.key for u in cand], autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal":
                for p, c in zip(pivot[i1:i2], cand[j1:j2]):
                    for off in range(c.stop - c.start):
                        ranges[c.start + off] = (p.start + off, p.start + off + 1)
            elif tag == "insert":
                before = max(pivot[i1].start - 1, 0) if i1 < len(pivot) else pivot[-1].stop - 1
                for c in cand[j1:j2]:
                    for j in range(c.start, c.stop):
                        ranges[j] = (before, before + 1)
            elif tag == "replace":
                p_words, c_words = _groups(pivot[i1:i2]), _groups(cand[j1:j2])
                P, C = len(p_words), len(c_words)
                for g, (c0, c1) in enumerate(c_words):
                    if P == C:
                        first, last = g, g
                    else:  # the pivot words under this candidate word's share of the span
                        first, last = g * P // C, max(-(-(g + 1) * P // C) - 1, g * P // C)
                    for j in range(c0, c1):
                        ranges[j] = (p_words[first][0], p_words[last][1])
            # "delete": pivot words the candidate lacks are read by no one
        share = {r: ranges.count(r) for r in set(ranges)}
        starts.append(tuple(a for a, _ in ranges))
        stops.append(tuple(b for _, b in ranges))
        weights.append(tuple(1.0 / share[r] for r in ranges))
        identity.append(ranges == [(j, j + 1) for j in range(len(text.ids))])
    return TokenAlignment(tuple(starts), tuple(stops), tuple(weights), tuple(identity))


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


def spec_to_dict(spec: ModeSpec) -> dict:
    return {"mode": spec.mode.value, "skip_variant": spec.skip_variant.value,
            "write_attention": spec.write_attention, "write_skip": spec.write_skip,
            "cross_kv_once": spec.cross_kv_once, "merged": spec.merged,
            "frozen_guidance": spec.frozen_guidance, "write_residual": spec.write_residual}


def spec_from_dict(d: Mapping[str, Any]) -> ModeSpec:
    # Fields added later default to off, so manifests written before them still load.
    return ModeSpec(StepMode(d["mode"]), SkipVariant(d["skip_variant"]), bool(d["write_attention"]),
                    bool(d["write_skip"]), bool(d["cross_kv_once"]), bool(d["merged"]),
                    frozen_guidance=bool(d.get("frozen_guidance", False)),
                    write_residual=bool(d.get("write_residual", False)))


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
