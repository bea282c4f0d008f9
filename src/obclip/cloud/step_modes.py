"""One definition of each cloud step mode: a pure function of tensors (docs/method.md, section 4).

    eps, writes = run_mode(unet, spec, inputs, caches)

``spec`` (``cloud/modes.py``) says which mode the step runs and which caches
it fills; ``inputs`` are the latents of the N candidates, the timestep, the
unique texts [empty, cand_0, ..., cand_N-1] per request, the guidance scale
and, for batch reuse, the token-alignment tensors; ``caches`` are the named
cache tensors earlier steps wrote. It returns the guided eps of the N
candidates and the cache tensors this step wrote. Nothing is kept anywhere
else: the torch backend (``cloud/steps.py``) passes the caches from step to
step, and the exporter (``export/cloud_engines.py``) traces this same function,
one ONNX graph per spec, so the graphs and torch cannot disagree.

The modes:

    FULL        plain pass
    REUSE       Algorithm 2: per guidance group, query, key and softmax map only for the
                pivot row (the group's first); values for every row; out = map x V; the
                cross-attention map is read at each candidate's aligned token positions
    CACHE       attention modules return ``attn/<module>`` from the cache
    SKIP        Faster Diffusion: the encoder (conv_in, down blocks, mid block) is not run, its
                outputs come from ``skip/*``; only the up blocks and head run. DeepCache: only
                conv_in, the first down block and the last up block run. DeepCache's shallowest
                branch: conv_in, the first down block's first layer, the last up block's last two
                layers (on ``skip/up_shallow_input``) and the head
    CACHE_SKIP  both
    PIVOT       candidate 0 only: rows [uncond of candidate 0, cond of candidate 0] per request, its
                guided eps for every candidate (their latents are identical then); writes no cache

SDXL-family UNets also take added inputs (``runtime/conditioning.py``: ``text_embeds``, ``time_ids``
and, for LCM's guidance embedding, ``timestep_cond``), one row per text like ``inputs.text`` and
mapped to UNet rows the same way. A guidance-embedding UNet (LCM) runs the conditional rows only
(``layouts.UnguidedRows``): its eps is the conditional prediction.

A frozen-guidance step (``spec.frozen_guidance``) runs the conditional rows only,
[cond x N]: its unconditional eps is eps_cond + ``guid/residual``, which every
step that evaluates both halves stores when the option is on (``write_residual``).
It reads the conditional half of the caches, and writes its rows into both
halves of a cache it fills (only frozen steps read those; docs/method.md 7.7).

Row layout (``cloud/layouts.py``, one type per layout): [unconditional x N, conditional x N],
the two guidance groups; candidate 0 is the pivot. Merged (step p = ``pivot_only_steps`` with
``merge_step0_uncond``): [unconditional x 1, conditional x N] (all N latents are still z_T's
then). Caches are always stored in the full 2N layout. A batch of requests (``inputs.sizes``)
concatenates them per guidance half: [uncond of request 0, ..., of R-1, cond
of request 0, ...]; groups, pivots, alignment and texts are per request, and a
request's rows only ever read their own rows of a cache, so caches stay per
request. With ``sizes=None`` there is one request whose N is read from the
tensors: that is how the graphs are traced, so N, height and width stay dynamic.

Work skipped is really not run (no compute-and-discard), so a FLOPs counter
sees the saving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from obclip.runtime.conditioning import TIMESTEP_COND, Conditioning
from obclip.runtime.errors import InputError
from obclip.runtime.plan import SkipVariant

from .layouts import Rows, expand_rows, rows_for
from .modes import ATTN, KV, RESIDUAL, SKIP_MID, SKIP_RES, SKIP_UP, SKIP_UP_SHALLOW, ModeSpec, TokenAlignment

Tensor = torch.Tensor


class MissingCacheError(InputError):
    """A step mode reads a cache that no earlier step of the request wrote (a plan that skips one)."""


@dataclass(frozen=True)
class AlignmentTensors:
    """One request's token alignment as tensors (``modes.TokenAlignment``). ``starts``/``stops``/``weights``
    [n, L] for the rows that read the pivot's cross-attention map through the alignment: all N
    candidates when ``other`` is None (what the graphs get), else the rows ``other``, while the rows
    ``same`` use the map as it is."""

    starts: Tensor
    stops: Tensor
    weights: Tensor
    same: Tensor | None = None
    other: Tensor | None = None

    @classmethod
    def partitioned(cls, al: TokenAlignment, device: Any) -> AlignmentTensors | None:
        """The torch fast path: identity rows through the fused kernel; None if every row is identity."""
        if all(al.identity):
            return None
        same = [i for i, ident in enumerate(al.identity) if ident]
        other = [i for i, ident in enumerate(al.identity) if not ident]

        def rows(table: Any, dtype: torch.dtype) -> Tensor:
            return torch.tensor([table[i] for i in other], dtype=dtype, device=device)

        return cls(starts=rows(al.starts, torch.long), stops=rows(al.stops, torch.long),
                   weights=rows(al.weights, torch.float32),
                   same=torch.tensor(same, dtype=torch.long, device=device),
                   other=torch.tensor(other, dtype=torch.long, device=device))

    @classmethod
    def full(cls, al: TokenAlignment, device: Any = None) -> AlignmentTensors:
        """Every candidate through the alignment (identity rows read [j, j+1) with weight 1)."""
        return cls(starts=torch.tensor(al.starts, dtype=torch.long, device=device),
                   stops=torch.tensor(al.stops, dtype=torch.long, device=device),
                   weights=torch.tensor(al.weights, dtype=torch.float32, device=device))


@dataclass(frozen=True)
class ModeInputs:
    x: Tensor                          # [sum N_r, C, h, w] latents
    timestep: Tensor                   # [] or [1]
    text: Tensor                       # [sum (N_r + 1), L, D]: per request its empty prompt, then its candidates
    guidance_scale: float | Tensor
    sizes: tuple[int, ...] | None = None                       # N_r per request; None: one request, N from x
    alignment: Sequence[AlignmentTensors | None] | None = None  # per request, batch reuse only
    added: Mapping[str, Tensor] | None = None   # the UNet's added inputs, one row per text like ``text``


# --- attention ------------------------------------------------------------------------


def _heads(x: Tensor, heads: int) -> Tensor:
    """[B, L, H*d] -> [B, H, L, d]"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge_heads(x: Tensor) -> Tensor:
    """[B, H, L, d] -> [B, L, H*d]"""
    return x.transpose(1, 2).flatten(2)


def _shared_map_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(q k^T) of one pivot, times every row's values: q [H, Lq, d], k [H, Lk, d],
    v [n, H, Lk, d] -> [n, H, Lq, d].

    The rows' values are laid side by side ([H, Lk, n*d]), so one fused
    attention kernel does every row without materialising the map (and
    without copying it n times); the scale is the per-head one.
    """
    d = v.shape[-1]
    side_by_side = v.permute(1, 2, 0, 3).flatten(2).unsqueeze(0)         # [1, H, Lk, n*d]
    out = F.scaled_dot_product_attention(q[None], k[None], side_by_side, dropout_p=0.0, is_causal=False,
                                         scale=scale)                    # [1, H, Lq, n*d]
    return out[0].unflatten(-1, (-1, d)).permute(2, 0, 1, 3)


def _gathered_map_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, starts: Tensor, stops: Tensor,
                            weights: Tensor) -> Tensor:
    """The pivot's map [H, Lq, Lk] read through an alignment: each row's token j gets the sum of the
    pivot columns [starts, stops) x weights ([n, L] each), renormalised, x v."""
    pivot_map = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)   # [H, Lq, Lk]
    # Column sums over ranges as differences of a running sum (float32: the differences of
    # numbers near 1 keep ~1e-7 absolute error, also when the graph itself runs in fp16).
    running = F.pad(torch.cumsum(pivot_map.float(), dim=-1), (1, 0))                 # [H, Lq, Lk + 1]
    m = (running[..., stops] - running[..., starts]).permute(2, 0, 1, 3)             # [n, H, Lq, L]
    m = m * weights.float()[:, None, None, :]
    m = m / m.sum(dim=-1, keepdim=True)
    return torch.matmul(m.to(v.dtype), v)


def _aligned_cross(q: Tensor, k: Tensor, v: Tensor, scale: float, al: AlignmentTensors | None) -> Tensor:
    """The pivot's cross-attention map, read at each candidate's token positions, x its values."""
    if al is None:
        return _shared_map_attention(q, k, v, scale)
    if al.other is None:
        return _gathered_map_attention(q, k, v, scale, al.starts, al.stops, al.weights)
    assert al.same is not None
    out = torch.empty(v.shape[0], *q.shape[:2], v.shape[-1], dtype=v.dtype, device=v.device)
    if len(al.same):  # tokens line up with the pivot's: its map as it is
        out.index_copy_(0, al.same, _shared_map_attention(q, k, v.index_select(0, al.same), scale))
    out.index_copy_(0, al.other, _gathered_map_attention(q, k, v.index_select(0, al.other), scale,
                                                         al.starts, al.stops, al.weights))
    return out


class _Pass:
    """One call of run_mode: what the attention processors read and write. Dropped after the call."""

    def __init__(self, spec: ModeSpec, layout: Rows, inputs: ModeInputs, reads: Mapping[str, Tensor],
                 writes: dict[str, Tensor]):
        self.spec, self.layout, self.inputs, self.reads, self.writes = spec, layout, inputs, reads, writes

    def read(self, name: str, what: str) -> Tensor:
        try:
            return self.reads[name]
        except KeyError:
            raise MissingCacheError(f"step mode {self.spec.mode.value} reads {what} {name}, but no earlier step "
                                    "of this request computed it; check the plan") from None

    def kv(self, name: str, attn: Any, which: str) -> Tensor:
        """cross_kv_once: the text side of cross-attention depends on the texts only, so it is projected
        once per request on the unique texts; reuse steps need the pivots' keys only."""
        key = f"{KV}{name}.{which}"
        for store in (self.reads, self.writes):
            if key in store:
                return store[key]
        text = self.inputs.text
        if which == "k_pivots":
            for store in (self.reads, self.writes):
                if f"{KV}{name}.k" in store:
                    return self.layout.pivot_texts(store[f"{KV}{name}.k"])
            out = attn.to_k(self.layout.pivot_texts(text))
        else:
            out = (attn.to_k if which == "k" else attn.to_v)(text)
        self.writes[key] = out
        return out

    def attention(self, name: str, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> Tensor:
        if self.spec.mode.attention_cached:
            return self.layout.from_full(self.read(ATTN + name, "the cached output of"))
        if self.spec.mode.batch_reuse:
            out = self._reuse(name, attn, hidden_states, encoder_hidden_states)
        else:
            out = self._full(name, attn, hidden_states, encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        if self.spec.write_attention:
            self.writes[ATTN + name] = self.layout.to_full(out)
        return out

    def _full(self, name: str, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> Tensor:
        q = attn.to_q(hidden_states)
        if encoder_hidden_states is not None and self.spec.cross_kv_once:
            k = self.layout.text_rows(self.kv(name, attn, "k"))
            v = self.layout.text_rows(self.kv(name, attn, "v"))
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            k, v = attn.to_k(context), attn.to_v(context)
        h = attn.heads
        out = F.scaled_dot_product_attention(_heads(q, h), _heads(k, h), _heads(v, h),
                                             dropout_p=0.0, is_causal=False, scale=attn.scale)
        return _merge_heads(out).to(q.dtype)

    def _reuse(self, name: str, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None) -> Tensor:
        """Algorithm 2: one softmax map per guidance group (per request and guidance half), from its pivot row."""
        layout, h = self.layout, attn.heads
        is_cross = encoder_hidden_states is not None
        once = is_cross and self.spec.cross_kv_once
        groups = layout.groups(hidden_states)
        pivots = torch.cat([g[:1] for g, _, _ in groups])
        q = _heads(attn.to_q(pivots), h)                                        # [G, H, Lq, d]
        if encoder_hidden_states is None:
            k = attn.to_k(pivots)
        elif once:
            k = self.kv(name, attn, "k_pivots")                                 # the pivots' texts, group order
        else:
            k = attn.to_k(torch.cat([g[:1] for g, _, _ in layout.groups(encoder_hidden_states)]))
        k = _heads(k, h)
        if once:
            text_values = layout.text_groups(self.kv(name, attn, "v"))
        else:
            row_values = layout.groups(attn.to_v(hidden_states if encoder_hidden_states is None
                                                 else encoder_hidden_states))
        alignment = self.inputs.alignment
        outs = []
        for g, (rows, r, conditional) in enumerate(groups):
            v = _heads(text_values[r][int(conditional)] if once else row_values[g][0], h)
            if not is_cross:
                outs.append(_shared_map_attention(q[g], k[g], v, attn.scale))
            elif once and not conditional:
                # Every unconditional row of a request has its negative prompt's values and,
                # under reuse, the pivot's map: the rows are equal, so compute one.
                one = _shared_map_attention(q[g], k[g], v, attn.scale)
                outs.append(expand_rows(one, rows.shape[0]))
            else:
                al = alignment[r] if (conditional and alignment is not None) else None
                outs.append(_aligned_cross(q[g], k[g], v, attn.scale, al))
        return _merge_heads(torch.cat(outs)).to(hidden_states.dtype)


# --- processors: how the pass reaches diffusers' blocks --------------------------------


class _Slot:
    current: _Pass | None = None


class ObClipAttnProcessor:
    """A diffusers attention processor that runs the current pass's mode (and refuses to run outside one)."""

    def __init__(self, name: str, slot: _Slot):
        self.name = name
        self.slot = slot

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if attention_mask is not None:
            raise InputError("ObCLIP attention processors do not support attention masks")
        current = self.slot.current
        if current is None:
            raise InputError("the UNet has ObCLIP attention processors installed; call it through run_mode")
        return current.attention(self.name, attn, hidden_states, encoder_hidden_states)


def _check_supported(name: str, attn: Any) -> None:
    """The processor implements SD-style attention only; refuse anything else by name."""
    unsupported = {
        "group_norm": attn.group_norm is not None,
        "spatial_norm": attn.spatial_norm is not None,
        "norm_cross": attn.norm_cross is not None,
        "residual_connection": bool(attn.residual_connection),
        "rescale_output_factor != 1": attn.rescale_output_factor != 1.0,
        "norm_q/norm_k": getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise InputError(f"attention module {name} uses {bad}, which the ObCLIP processors do not implement; "
                         "run this model without acceleration")


def unet_conditioning(unet: Any) -> Conditioning:
    """The UNet's family (``runtime.conditioning``); other added conditions are refused by name."""
    if unet.config.center_input_sample:
        raise InputError("the accelerated UNet pass does not implement center_input_sample")
    return Conditioning.from_unet_config(unet.config)


def check_unet(unet: Any) -> None:
    unet_conditioning(unet)


def attention_modules(unet: Any) -> dict[str, Any]:
    """Attention module name (the cache key after ``attn/``) -> module."""
    return {name: m for name, m in unet.named_modules() if m.__class__.__name__ == "Attention"}


@contextlib.contextmanager
def processors_installed(unet: Any) -> Iterator[None]:
    """Model surgery that is undone: the UNet's own processors are back after the block, even on error."""
    check_unet(unet)
    for name, module in attention_modules(unet).items():
        _check_supported(name, module)
    saved = unet.attn_processors
    slot = _Slot()
    unet.set_attn_processor({name: ObClipAttnProcessor(name.removesuffix(".processor"), slot) for name in saved})
    unet._obclip_slot = slot
    try:
        yield
    finally:
        unet.set_attn_processor(saved)
        del unet._obclip_slot


# --- the pure functions ---------------------------------------------------------------


def run_mode(unet: Any, spec: ModeSpec, inputs: ModeInputs,
             caches: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Guided eps [sum N_r, C, h, w] of one step in the spec's mode, and the cache tensors it wrote."""
    slot = getattr(unet, "_obclip_slot", None)
    if slot is None:
        with processors_installed(unet):
            return run_mode(unet, spec, inputs, caches)
    cond = unet_conditioning(unet)
    given = dict(inputs.added or {})
    if set(given) != set(cond.added_inputs):
        raise InputError(f"this UNet takes the added inputs {list(cond.added_inputs)}, got {sorted(given)}")
    layout = rows_for(spec, inputs.sizes, inputs.x, guided=cond.guided)
    added = {name: layout.text_rows(value) for name, value in given.items()}
    writes: dict[str, Tensor] = {}
    slot.current = p = _Pass(spec, layout, inputs, caches, writes)
    try:
        eps = _unet_pass(unet, spec, p, layout.unet_rows(inputs.x), inputs.timestep, layout.text_rows(inputs.text),
                         added)
        residual = p.read(RESIDUAL, "the guidance residual") if spec.frozen_guidance else None
    finally:
        slot.current = None
    eps_u, eps_c = layout.halves(eps, residual)
    if spec.write_residual:
        writes[RESIDUAL] = eps_u - eps_c
    return eps_u + inputs.guidance_scale * (eps_c - eps_u), writes


def cross_kv(unet: Any, text: Tensor) -> dict[str, Tensor]:
    """Every cross-attention module's keys and values of the texts: the ``kv/*`` caches, all at once
    (the onnxruntime backend runs this once per request; the torch path fills them lazily)."""
    out = {}
    for name, attn in attention_modules(unet).items():
        if attn.is_cross_attention:
            out[f"{KV}{name}.k"] = attn.to_k(text)
            out[f"{KV}{name}.v"] = attn.to_v(text)
    return out


def skip_res_count(unet: Any) -> int:
    """Skip features the encoder hands the up blocks: conv_in's, then every resnet's and downsampler's."""
    return 1 + sum(len(b.resnets) + (1 if b.downsamplers is not None else 0) for b in unet.down_blocks)


def _unet_pass(unet: Any, spec: ModeSpec, p: _Pass, sample: Tensor, timestep: Tensor, text: Tensor,
               added: Mapping[str, Tensor]) -> Tensor:
    """UNet2DConditionModel.forward for SD- and SDXL-family UNets, written out so the
    encoder can be skipped (Faster Diffusion) or cut short (DeepCache)."""
    # Up blocks need explicit sizes when the latent is not a multiple of the total downscale.
    up_factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(int(d) % up_factor for d in sample.shape[-2:])

    # non_blocking: a few bytes staged to the GPU without waiting for its queue
    timestep = timestep.to(sample.device, non_blocking=True).reshape(-1)
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep.expand(sample.shape[0])),
                              added.get(TIMESTEP_COND))
    # SDXL's text_time embedding (pooled text + size conditioning); None for SD UNets.
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=dict(added))
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    skipped = spec.mode.blocks_skipped
    variant = spec.skip_variant
    first_up = 0
    res: tuple[Tensor, ...]
    if skipped and variant is SkipVariant.FASTER_DIFFUSION:
        # The current latent does not enter the UNet on this step.
        h = p.layout.from_full(p.read(SKIP_MID, "the encoder features"))
        res = tuple(p.layout.from_full(p.read(f"{SKIP_RES}{i}", "the encoder features"))
                    for i in range(skip_res_count(unet)))
    elif skipped and variant is SkipVariant.DEEPCACHE_SHALLOW:
        # conv_in and the first down block's first layer; the last up block's last two layers
        # consume their outputs (in the full UNet too) on top of the cached input.
        h0 = unet.conv_in(sample)
        res = (h0,) + _run_down_block(unet.down_blocks[0], h0, emb, text, downsample=False, layers=1)
        h = p.layout.from_full(p.read(SKIP_UP_SHALLOW, "the encoder features"))
        first_up = len(unet.up_blocks) - 1
    elif skipped:  # DeepCache
        # Only the shallow branch sees the latent: conv_in, the first down
        # block's resnets/attentions (its downsampler output feeds nothing
        # that runs), then the last up block on the cached deep features.
        h0 = unet.conv_in(sample)
        res = (h0,) + _run_down_block(unet.down_blocks[0], h0, emb, text, downsample=False)
        h = p.layout.from_full(p.read(SKIP_UP, "the encoder features"))
        first_up = len(unet.up_blocks) - 1
    else:
        h = unet.conv_in(sample)
        res = (h,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, r = block(hidden_states=h, temb=emb, encoder_hidden_states=text)
            else:
                h, r = block(hidden_states=h, temb=emb)
            res += r
        if unet.mid_block is not None:  # BK-SDM UNets have none
            if getattr(unet.mid_block, "has_cross_attention", False):
                h = unet.mid_block(h, emb, encoder_hidden_states=text)
            else:
                h = unet.mid_block(h, emb)
        if spec.write_skip and variant is SkipVariant.FASTER_DIFFUSION:
            for i, r in enumerate(res):
                p.writes[f"{SKIP_RES}{i}"] = p.layout.to_full(r)
            p.writes[SKIP_MID] = p.layout.to_full(h)

    last = len(unet.up_blocks) - 1
    for i in range(first_up, len(unet.up_blocks)):
        block = unet.up_blocks[i]
        n_res = len(block.resnets)
        if i == last and variant is SkipVariant.DEEPCACHE_SHALLOW and (skipped or spec.write_skip):
            h = _run_shallow_up_block(p, block, h, res, emb, text, skipped)
            continue
        res_samples, res = res[-n_res:], res[:-n_res]
        if i == last and not skipped and spec.write_skip and variant is SkipVariant.DEEPCACHE:
            p.writes[SKIP_UP] = p.layout.to_full(h)
        upsample_size = res[-1].shape[2:] if (i != last and forward_upsample_size) else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res_samples,
                      encoder_hidden_states=text, upsample_size=upsample_size)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res_samples,
                      upsample_size=upsample_size)

    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def _run_shallow_up_block(p: _Pass, block: Any, h: Tensor, res: tuple[Tensor, ...], emb: Tensor, text: Tensor,
                          skipped: bool) -> Tensor:
    """The last up block written out (CrossAttnUpBlock2D / UpBlock2D.forward, no upsampler) for
    DeepCache's shallowest branch: a skip step runs its last two layers on the cached input of the
    first of them; a step that fills the cache runs every layer and stores that input."""
    n = len(block.resnets)
    if n < 2 or getattr(block, "upsamplers", None) is not None:
        raise InputError("skip_variant 'deepcache-shallow' needs a last up block of >= 2 layers and no "
                         f"upsampler; this UNet's has {n} layers")
    start = n - 2
    attentions = getattr(block, "attentions", None) or [None] * n
    for j in range(start if skipped else 0, n):
        if j == start and not skipped:
            p.writes[SKIP_UP_SHALLOW] = p.layout.to_full(h)
        h = torch.cat([h, res[-1]], dim=1)
        res = res[:-1]
        h = block.resnets[j](h, emb)
        if attentions[j] is not None:
            h = attentions[j](h, encoder_hidden_states=text, return_dict=False)[0]
    return h


def _run_down_block(block: Any, h: Tensor, emb: Tensor, text: Tensor, downsample: bool,
                    layers: int | None = None) -> tuple[Tensor, ...]:
    """A down block's skip features (of its first ``layers`` layers, default all); its downsampler only
    when asked."""
    outputs: tuple[Tensor, ...] = ()
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in list(zip(block.resnets, attentions))[:layers]:
        h = resnet(h, emb)
        if attn is not None:
            h = attn(h, encoder_hidden_states=text, return_dict=False)[0]
        outputs += (h,)
    if downsample and block.downsamplers is not None:
        for down in block.downsamplers:
            h = down(h)
        outputs += (h,)
    return outputs
