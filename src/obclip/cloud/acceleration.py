"""Server-side acceleration of the cloud steps (METHOD.md, "Server-side acceleration").

One ``AcceleratedUNet`` serves one request, or a batch of requests with the
same T, k, size, guidance scale and acceleration (``cloud.steps.CloudStepRunner.run_batch``).
It installs attention processors
on the UNet for the duration of a ``with`` block (and puts the originals back
on exit), holds every per-request cache, and evaluates one guided UNet pass
per cloud step in the mode the step plan gives:

    FULL        plain pass; with an attention cache on, every attention output is stored
    REUSE       Algorithm 2: per guidance group, query, key and softmax map only for the
                pivot row (the group's first); values for every row; out = map x V
    CACHE       attention modules return the output stored at the last step they ran
    SKIP        the encoder (conv_in, down blocks, mid block) is not run: its outputs
                come from the last step that ran it; only the up blocks and head run
    CACHE_SKIP  both

Batch layout: rows are [unconditional x N, conditional x N], the two guidance
groups; candidate 0 (canonical order) is the conditional pivot. With
``merge_step0_uncond`` step 0 runs [unconditional x 1, conditional x N]
(all N latents are the shared z_T then, so those rows are equal); caches are
always stored in the full 2N layout. A batch of requests concatenates them per
guidance half: [uncond of request 0, ..., of request R-1, cond of request 0, ...];
groups, pivots, token alignment, cross_kv_once texts and the step-0 merge are
per request, and since a request's rows only ever read their own rows of a
cache (``_BatchState.request_rows``), caches stay per request.

Work skipped is really not run (no compute-and-discard), so a FLOPs counter
sees the saving.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from obclip.runtime.plan import AccelerationConfig, PlannedStep, SkipVariant, StepMode

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


def token_alignment(tokenizer, candidates) -> TokenAlignment:
    """Align every candidate's token positions to candidate 0's.

    Same words map to the same column; a differing span (an attribute value,
    "old" vs "middle-aged") maps proportionally onto the pivot's span; tokens
    the pivot lacks entirely read the column before them. A pivot column that
    no candidate token reads is dropped, and the gathered map is renormalised
    so each row still sums to 1.
    """
    length = tokenizer.model_max_length
    ids = tokenizer(list(candidates), padding="max_length", max_length=length, truncation=True).input_ids
    pivot = list(ids[0])
    columns, weights, identity = [], [], []
    for cand in ids:
        cand = list(cand)
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


# --- per-batch state ---------------------------------------------------------


@dataclass
class _BatchState:
    """Everything one batch of requests keeps between its steps. Dropped on exit.

    Row layout (full): [uncond x N_0, ..., uncond x N_{R-1}, cond x N_0, ..., cond x N_{R-1}],
    request r's rows at ``u_off[r]:u_off[r]+N_r`` and ``M + c_off[r]:...`` (M = sum N_r).
    Merged (step 0 with merge_step0_uncond): [uncond x 1 per request, cond rows as above].
    Texts: [empty_0, cand_0..., empty_1, cand_1..., ...]: request r's at ``t_off[r]``.
    Every cache is one tensor in the full layout of the whole batch; a request's rows
    only ever read their own rows (every op is row-wise except the attention of batch
    reuse, whose groups and pivots are per request), so caches stay per request.
    """

    config: AccelerationConfig
    sizes: tuple[int, ...]                    # N_r per request
    text: torch.Tensor                        # [sum (N_r + 1), 77, D]
    alignments: tuple[TokenAlignment | None, ...]
    mode: StepMode = StepMode.FULL
    merged: bool = False                      # uncond rows are one per request this step
    attention_out: dict[str, torch.Tensor] = field(default_factory=dict)   # full layout
    # cross_kv_once: keys and values on `text`, per module; keys for the pivot
    # texts only ("pivots") until a full step needs them all ("all").
    cross_k: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    cross_v: dict[str, torch.Tensor] = field(default_factory=dict)
    encoder_features: dict[str, object] = field(default_factory=dict)      # block-skip cache
    # Index tensors built once per batch on the UNet's device: indexing with
    # fresh host tensors in every attention call would stall a GPU.
    _device_tensors: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.n = sum(self.sizes)
        self.r = len(self.sizes)
        offs = [0]
        for n in self.sizes:
            offs.append(offs[-1] + n)
        self.c_off = tuple(offs[:-1])                       # cond rows of request r within the cond half
        self.t_off = tuple(o + i for i, o in enumerate(self.c_off))   # its empty prompt in `text`
        # The pivot texts, in pivot order [empty of each request, cand 0 of each request].
        self.pivot_text_rows = tuple(self.t_off) + tuple(t + 1 for t in self.t_off)

    @property
    def rows(self) -> int:
        return self.r + self.n if self.merged else 2 * self.n

    @property
    def uncond_rows(self) -> int:
        return self.r if self.merged else self.n

    def groups(self) -> list[tuple[int, int]]:
        """(start, stop) of every guidance group, in row order: the unconditional
        group of each request, then the conditional group of each; start is the pivot."""
        u = self.uncond_rows
        if self.merged:
            uncond = [(i, i + 1) for i in range(self.r)]
        else:
            uncond = [(o, o + n) for o, n in zip(self.c_off, self.sizes)]
        return uncond + [(u + o, u + o + n) for o, n in zip(self.c_off, self.sizes)]

    def request_rows(self, r: int) -> tuple[slice, slice]:
        """Request r's unconditional and conditional rows in the full layout (what caches hold)."""
        o, n = self.c_off[r], self.sizes[r]
        return slice(o, o + n), slice(self.n + o, self.n + o + n)

    def text_index(self, device) -> torch.Tensor:
        """Row -> index into ``text``."""
        key = ("text_index", self.merged, device)
        if key not in self._device_tensors:
            uncond = [t for t, n in zip(self.t_off, self.sizes) for _ in range(1 if self.merged else n)]
            cond = [t + 1 + j for t, n in zip(self.t_off, self.sizes) for j in range(n)]
            self._device_tensors[key] = torch.tensor(uncond + cond, dtype=torch.long).to(device)
        return self._device_tensors[key]

    def pivot_text_index(self, device) -> torch.Tensor:
        key = ("pivot_text_index", device)
        if key not in self._device_tensors:
            self._device_tensors[key] = torch.tensor(self.pivot_text_rows, dtype=torch.long).to(device)
        return self._device_tensors[key]

    def pivot_text(self) -> torch.Tensor:
        """The texts of the pivots, in pivot order (slices: no index tensor)."""
        return torch.cat([self.text[i:i + 1] for i in self.pivot_text_rows])

    def to_full(self, t: torch.Tensor) -> torch.Tensor:
        """A merged step's rows in the full layout, so caches have one shape."""
        if not self.merged:
            return t
        r = self.r
        return torch.cat([t[i:i + 1].expand(n, *t.shape[1:]) for i, n in enumerate(self.sizes)] + [t[r:]])

    def alignment_tensors(self, r: int, device):
        """Request r's (aligned rows, other rows, their columns [n_other, L], their weights [n_other, L])."""
        key = ("alignment", r, device)
        if key not in self._device_tensors:
            al = self.alignments[r]
            same = [i for i, ident in enumerate(al.identity) if ident]
            other = [i for i, ident in enumerate(al.identity) if not ident]
            self._device_tensors[key] = (
                torch.tensor(same, dtype=torch.long, device=device),
                torch.tensor(other, dtype=torch.long, device=device),
                torch.tensor([al.columns[i] for i in other], dtype=torch.long, device=device),
                torch.tensor([al.weights[i] for i in other], dtype=torch.float32, device=device),
            )
        return self._device_tensors[key]


_RequestState = _BatchState   # the name before batching


# --- attention --------------------------------------------------------------


def _check_supported(name: str, attn) -> None:
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
        raise ValueError(f"attention module {name} uses {bad}, which the ObCLIP processors do not implement; "
                         "run this model without acceleration")


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*d] -> [B, H, L, d]"""
    b, length, inner = x.shape
    return x.view(b, length, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, d] -> [B, L, H*d]"""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


class ObClipAttnProcessor:
    """A diffusers attention processor that follows the request's step mode."""

    def __init__(self, name: str, state: _RequestState):
        self.name = name
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        state = self.state
        if attention_mask is not None:
            raise ValueError("ObCLIP attention processors do not support attention masks")
        is_cross = encoder_hidden_states is not None
        if state.mode.attention_cached:
            try:
                return state.attention_out[self.name]
            except KeyError:
                raise RuntimeError(f"step mode {state.mode.value} reads the cached output of {self.name}, but no "
                                   "earlier step of this request computed it; check the plan") from None
        if state.mode.batch_reuse:
            out = self._reuse(attn, hidden_states, encoder_hidden_states, is_cross)
        else:
            out = self._full(attn, hidden_states, encoder_hidden_states, is_cross)
        out = attn.to_out[1](attn.to_out[0](out))
        if state.config.attention_cache:
            # Filled at every step the module runs, so it holds the last one.
            state.attention_out[self.name] = state.to_full(out)
        return out

    # cross_kv_once: the text side of cross-attention depends on the text only,
    # so it is projected once per batch, on the unique texts (each request's
    # empty prompt and candidates).
    def _once_keys(self, attn, pivots_only: bool) -> torch.Tensor:
        state = self.state
        cache = state.cross_k.setdefault(self.name, {})
        if "all" in cache:
            if not pivots_only:
                return cache["all"]
            if state.r == 1:  # texts 0 and 1: a slice
                return cache["all"][:2]
            return cache["all"].index_select(0, state.pivot_text_index(cache["all"].device))
        if pivots_only:  # reuse steps need the pivots' texts only: each request's empty prompt and candidate 0
            if "pivots" not in cache:
                cache["pivots"] = attn.to_k(state.pivot_text())
            return cache["pivots"]
        cache["all"] = attn.to_k(state.text)
        return cache["all"]

    def _once_values(self, attn) -> torch.Tensor:
        if self.name not in self.state.cross_v:
            self.state.cross_v[self.name] = attn.to_v(self.state.text)
        return self.state.cross_v[self.name]

    def _full(self, attn, hidden_states, encoder_hidden_states, is_cross):
        q = attn.to_q(hidden_states)
        if is_cross and self.state.config.cross_kv_once:
            index = self.state.text_index(q.device)
            k, v = self._once_keys(attn, pivots_only=False)[index], self._once_values(attn)[index]
        else:
            context = encoder_hidden_states if is_cross else hidden_states
            k, v = attn.to_k(context), attn.to_v(context)
        h = attn.heads
        out = F.scaled_dot_product_attention(_heads(q, h), _heads(k, h), _heads(v, h),
                                             dropout_p=0.0, is_causal=False, scale=attn.scale)
        return _merge_heads(out).to(q.dtype)

    def _reuse(self, attn, hidden_states, encoder_hidden_states, is_cross):
        """Algorithm 2: one softmax map per guidance group (per request and guidance half), from its pivot row."""
        state = self.state
        h = attn.heads
        groups = state.groups()           # [uncond of each request, cond of each request]
        once = is_cross and state.config.cross_kv_once

        def pivots(t):  # every group's first row, by slicing (no index tensor, no host sync)
            return torch.cat([t[a:a + 1] for a, _ in groups])

        q = _heads(attn.to_q(pivots(hidden_states)), h)                  # [2R, H, Lq, d]
        if not is_cross:
            k = attn.to_k(pivots(hidden_states))
        elif once:
            k = self._once_keys(attn, pivots_only=True)                  # the pivots' texts, in group order
        else:
            k = attn.to_k(pivots(encoder_hidden_states))
        k = _heads(k, h)
        if once:
            values = self._once_values(attn)
        else:
            values = attn.to_v(hidden_states if not is_cross else encoder_hidden_states)
        r_count = state.r
        outs = []
        for g, (start, stop) in enumerate(groups):
            r, conditional = g % r_count, g >= r_count
            if not is_cross:
                outs.append(_shared_map_attention(q[g], k[g], _heads(values[start:stop], h), attn.scale))
            elif once and not conditional:
                # Every unconditional row of a request has the empty prompt's values and,
                # under reuse, the pivot's map: the rows are equal, so compute one.
                t = state.t_off[r]
                one = _shared_map_attention(q[g], k[g], _heads(values[t:t + 1], h), attn.scale)
                outs.append(one.expand(stop - start, *one.shape[1:]))
            else:
                if once:
                    t = state.t_off[r] + 1
                    v = values[t:t + state.sizes[r]]
                else:
                    v = values[start:stop]
                outs.append(self._aligned_cross(q[g], k[g], _heads(v, h), attn.scale, r, conditional))
        return _merge_heads(torch.cat(outs)).to(hidden_states.dtype)

    def _aligned_cross(self, q, k, v, scale, r: int, conditional: bool):
        """The pivot's cross-attention map, read at each candidate's token positions, x its values."""
        al = self.state.alignments[r]
        if not conditional or al is None or all(al.identity):
            return _shared_map_attention(q, k, v, scale)
        same, other, cols, weights = self.state.alignment_tensors(r, q.device)
        out = torch.empty(v.shape[0], *q.shape[:2], v.shape[-1], dtype=v.dtype, device=v.device)
        if len(same):  # tokens line up with the pivot's: its map as it is
            out.index_copy_(0, same, _shared_map_attention(q, k, v.index_select(0, same), scale))
        # The others: the explicit map (Lk = 77 columns, small), gathered per candidate.
        pivot_map = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)   # [H, Lq, Lk]
        m = pivot_map[..., cols].permute(2, 0, 1, 3)                                     # [n_other, H, Lq, Lk]
        m = m * weights.to(m.dtype)[:, None, None, :]
        m = m / m.sum(dim=-1, keepdim=True)
        out.index_copy_(0, other, torch.matmul(m, v.index_select(0, other)))
        return out


def _shared_map_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T) of one pivot, times every row's values: q [H, Lq, d], k [H, Lk, d],
    v [n, H, Lk, d] -> [n, H, Lq, d].

    The rows' values are laid side by side ([H, Lk, n*d]), so one fused
    attention kernel does every row without materialising the map (and
    without copying it n times); the scale is the per-head one.
    """
    n, h, lk, d = v.shape
    side_by_side = v.permute(1, 2, 0, 3).reshape(1, h, lk, n * d)
    out = F.scaled_dot_product_attention(q[None], k[None], side_by_side, dropout_p=0.0, is_causal=False,
                                         scale=scale)                    # [1, H, Lq, n*d]
    return out[0].view(h, -1, n, d).permute(2, 0, 1, 3)


# --- the UNet pass ------------------------------------------------------------


def _check_unet(unet) -> None:
    c = unet.config
    extras = {
        "class_embed_type": c.class_embed_type, "addition_embed_type": c.addition_embed_type,
        "encoder_hid_dim_type": c.encoder_hid_dim_type, "center_input_sample": c.center_input_sample or None,
        "time_cond_proj_dim": c.time_cond_proj_dim,
    }
    used = {k: v for k, v in extras.items() if v is not None}
    if used:
        raise ValueError(f"the accelerated UNet pass implements SD-style UNets only; this one sets {used}")


class AcceleratedUNet:
    """Guided UNet evaluations for one request, or a batch of requests that share
    T, k, size, guidance scale and acceleration (so every step has one mode), in
    the modes their step plan gives.

    One request: ``cond`` [N, L, D], ``uncond`` [1, L, D], ``alignment`` or None.
    A batch of R: ``cond`` a sequence of R [N_r, L, D], ``uncond`` a sequence of R
    [1, L, D] (or one, shared), ``alignment`` a sequence of R (or None). ``x`` is
    then the requests' latents concatenated in order ([sum N_r, C, h, w]); use
    ``split`` to cut a result back per request.
    """

    def __init__(self, unet, config: AccelerationConfig | None, *, cond, uncond, guidance_scale: float,
                 alignment=None):
        _check_unet(unet)
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
            if al is not None and len(al.columns) != c.shape[0]:
                raise ValueError(f"alignment is for {len(al.columns)} candidates, the request has {c.shape[0]}")
        self.unet = unet
        self.config = config or AccelerationConfig.none(0)
        self.sizes = tuple(int(c.shape[0]) for c in conds)
        self.n = sum(self.sizes)                  # latent rows, all requests
        self.guidance_scale = float(guidance_scale)
        self.cond = torch.cat(conds)
        self.uncond = unconds[0] if len(unconds) == 1 else torch.cat(unconds)
        text = torch.cat([t for u, c in zip(unconds, conds) for t in (u, c)])
        self.state = _BatchState(self.config, self.sizes, text, tuple(alignments))
        # The UNet's text rows, per layout: full [uncond x N_r ..., cond ...], merged [uncond x 1 ..., cond ...].
        self._text_full = torch.cat([u.expand(n, -1, -1) for u, n in zip(unconds, self.sizes)] + [self.cond])
        self._text_merged = torch.cat(unconds + [self.cond])
        self._saved_processors = None

    def split(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Rows of a [sum N_r, ...] tensor, per request (views)."""
        return list(torch.split(t, self.sizes))

    # Model surgery that can be undone: the UNet is as it was after the block.
    def __enter__(self) -> AcceleratedUNet:
        for name, module in self.unet.named_modules():
            if module.__class__.__name__ == "Attention":
                _check_supported(name, module)
        self._saved_processors = self.unet.attn_processors
        self.unet.set_attn_processor({name: ObClipAttnProcessor(name, self.state)
                                      for name in self._saved_processors})
        return self

    def __exit__(self, *exc) -> None:
        self.unet.set_attn_processor(self._saved_processors)
        self._saved_processors = None
        self.state.attention_out.clear()
        self.state.cross_k.clear()
        self.state.cross_v.clear()
        self.state.encoder_features.clear()

    @torch.no_grad()
    def guided_eps(self, x: torch.Tensor, t, step: PlannedStep) -> torch.Tensor:
        """Classifier-free-guided eps for the latents x [sum N_r, C, h, w] at timestep t."""
        if self._saved_processors is None:
            raise RuntimeError("use AcceleratedUNet inside a `with` block")
        if x.shape[0] != self.n:
            raise ValueError(f"x has {x.shape[0]} rows, the request has {self.n} candidates"
                             if len(self.sizes) == 1 else
                             f"x has {x.shape[0]} rows, the batch has {self.n} candidates in all")
        state = self.state
        state.mode = step.mode
        # At step 0 every latent of a request is its z_T, so its N unconditional rows are one.
        state.merged = self.config.merge_step0_uncond and step.index == 0
        if state.merged:
            offs = state.c_off
            sample = torch.cat([x[o:o + 1] for o in offs] + [x])
            text = self._text_merged
        else:
            sample = torch.cat([x, x])
            text = self._text_full
        eps = self._unet_pass(sample, t, text, step.mode)
        u = state.uncond_rows
        eps_uncond, eps_cond = eps[:u], eps[u:]
        if state.merged and state.r > 1:
            eps_uncond = torch.cat([eps_uncond[i:i + 1].expand(n, *eps.shape[1:])
                                    for i, n in enumerate(self.sizes)])
        return eps_uncond + self.guidance_scale * (eps_cond - eps_uncond)

    def _unet_pass(self, sample, t, text, mode: StepMode) -> torch.Tensor:
        """UNet2DConditionModel.forward for SD-style UNets, written out so the
        encoder can be skipped (Faster Diffusion) or cut short (DeepCache)."""
        unet, state = self.unet, self.state
        # Up blocks need explicit sizes when the latent is not a multiple of the total downscale.
        up_factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(d % up_factor for d in sample.shape[-2:])

        # non_blocking: a few bytes staged to the GPU without waiting for its queue
        timestep = (t if torch.is_tensor(t) else torch.tensor(t)).to(sample.device, non_blocking=True)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep.expand(sample.shape[0])))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)

        skipped = mode.blocks_skipped
        variant = self.config.skip_variant
        feats = state.encoder_features
        if skipped and not feats:
            raise RuntimeError(f"step mode {mode.value} reuses encoder features, but no earlier step of this "
                               "request computed them; check the plan")
        first_up = 0
        if skipped and variant is SkipVariant.FASTER_DIFFUSION:
            # The current latent does not enter the UNet on this step.
            h = feats["mid"]
            res = feats["res"]
        elif skipped and variant is SkipVariant.DEEPCACHE:
            # Only the shallow branch sees the latent: conv_in, the first down
            # block's resnets/attentions (its downsampler output feeds nothing
            # that runs), then the last up block on the cached deep features.
            h0 = unet.conv_in(sample)
            res = (h0,) + _run_down_block(unet.down_blocks[0], h0, emb, text, downsample=False)
            h = feats["last_up_input"]
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
            if self.config.block_skip and variant is SkipVariant.FASTER_DIFFUSION:
                feats["res"] = tuple(state.to_full(r) for r in res)
                feats["mid"] = state.to_full(h)

        last = len(unet.up_blocks) - 1
        for i in range(first_up, len(unet.up_blocks)):
            block = unet.up_blocks[i]
            n_res = len(block.resnets)
            res_samples, res = res[-n_res:], res[:-n_res]
            if i == last and not skipped and self.config.block_skip and variant is SkipVariant.DEEPCACHE:
                feats["last_up_input"] = state.to_full(h)
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


def _run_down_block(block, h, emb, text, downsample: bool) -> tuple[torch.Tensor, ...]:
    """A down block's skip features; its downsampler only when asked."""
    outputs = ()
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    for resnet, attn in zip(block.resnets, attentions):
        h = resnet(h, emb)
        if attn is not None:
            h = attn(h, encoder_hidden_states=text, return_dict=False)[0]
        outputs += (h,)
    if downsample and block.downsamplers is not None:
        for down in block.downsamplers:
            h = down(h)
        outputs += (h,)
    return outputs
