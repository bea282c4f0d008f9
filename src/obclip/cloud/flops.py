"""Counting the FLOPs of the ops that actually run.

Runs a callable under ``torch.utils.flop_counter.FlopCounterMode`` and sorts
what it counted into convolutions, linears and attention matmuls. Works on
real tensors and, for full-size models, on the meta device or under
``FakeTensorMode``: a full-size SD-v1.4 UNet pass is counted without any
arithmetic (build it with :func:`meta_unet`).

Op classes (by the aten op that ran):

- conv: ``aten.convolution`` (and its backend variants);
- linear: ``aten.mm`` / ``aten.addmm`` (``nn.Linear`` lowers to them, also on
  3-D inputs, which are flattened to 2-D);
- attention: ``aten.bmm`` / ``aten.baddbmm`` (attention written out, and
  ``matmul`` / ``einsum`` on >= 3-D tensors, which lower to bmm) and the fused
  scaled-dot-product-attention kernels, counted as their two matmuls.

Two conventions for totals:

- ``flops``: every matmul and convolution, both attention matmuls included,
  2 FLOPs per multiply-add. Norms, softmax and elementwise ops are not
  counted (FlopCounterMode counts none of them).
- ``paper_macs``: the ObCLIP paper's "FLOPs", which are multiply-accumulates
  of convolutions and linears plus ONE of the two attention matmuls, defined
  here as ``conv_macs + linear_macs + attention_macs / 2`` (half of all
  attention-matmul MACs: in a plain attention QK^T and map x V have the same
  size, so that is "one of the two"). ``no_attention_macs`` = conv + linear
  only, BK-SDM's convention, which the paper uses for its device model.

SDPA dispatch (torch 2.13, checked, not assumed): on the CPU, real tensors
and FakeTensorMode both dispatch ``F.scaled_dot_product_attention`` to
``aten._scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode
does not count by default; on the meta device SDPA runs its math
decomposition (``aten.bmm`` x 2, already counted). The missing formulas are
supplied per counter through ``custom_mapping``; nothing global changes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

aten = torch.ops.aten


# --- formulas FlopCounterMode lacks -------------------------------------------

def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Both matmuls of attention (QK^T and map x V), 2 FLOPs per multiply-add."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_ops_missing() -> list:
    ops = [getattr(aten, name) for name in ("_scaled_dot_product_flash_attention_for_cpu",
                                            "_scaled_dot_product_fused_attention_overrideable")
           if hasattr(aten, name)]
    return [op for op in ops if op not in flop_registry]


# Passed as FlopCounterMode(custom_mapping=...): the global registry is untouched.
EXTRA_FORMULAS: dict[Any, Callable] = {op: _sdpa_cpu_flop for op in _sdpa_ops_missing()}


def _packets(*names: str) -> frozenset:
    return frozenset(getattr(aten, n) for n in names if hasattr(aten, n))


CONV_OPS = _packets("convolution", "_convolution", "cudnn_convolution", "cudnn_convolution_transpose",
                    "_slow_conv2d_forward", "convolution_backward")
LINEAR_OPS = _packets("mm", "addmm", "_scaled_mm")
ATTENTION_OPS = _packets(
    "bmm", "baddbmm",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable", "_flash_attention_forward",
    "_efficient_attention_forward",
)


# --- the breakdown ------------------------------------------------------------

@dataclass(frozen=True)
class FlopBreakdown:
    """FLOPs (2 per multiply-add) by op class, as counted.

    ``other`` is anything FlopCounterMode counted outside the three classes
    (e.g. a backward op); it goes into every total like conv and linear.
    """

    conv: int = 0
    linear: int = 0
    attention: int = 0
    other: int = 0
    by_op: dict[str, int] = field(default_factory=dict, compare=False)

    # FLOP totals -----------------------------------------------------------
    @property
    def flops(self) -> int:
        """Every matmul and convolution, both attention matmuls, 2 FLOPs/MAC."""
        return self.conv + self.linear + self.attention + self.other

    @property
    def macs(self) -> float:
        """``flops`` / 2: multiply-adds with both attention matmuls."""
        return self.flops / 2

    # MAC conventions -------------------------------------------------------
    @property
    def conv_macs(self) -> float:
        return self.conv / 2

    @property
    def linear_macs(self) -> float:
        return self.linear / 2

    @property
    def attention_macs(self) -> float:
        """Multiply-adds of all attention matmuls (both of them)."""
        return self.attention / 2

    @property
    def no_attention_macs(self) -> float:
        """Convolutions + linears only: BK-SDM's convention (the paper's device numbers)."""
        return (self.conv + self.linear + self.other) / 2

    @property
    def paper_macs(self) -> float:
        """The paper's convention: conv + linear MACs + attention_macs / 2.

        Half of all attention-matmul MACs stands for "one of the two attention
        matmuls" (QK^T and map x V are the same size in a plain attention).
        """
        return self.no_attention_macs + self.attention_macs / 2

    # arithmetic --------------------------------------------------------------
    def __add__(self, other: FlopBreakdown) -> FlopBreakdown:
        if not isinstance(other, FlopBreakdown):
            return NotImplemented
        by_op = Counter(self.by_op)
        by_op.update(other.by_op)
        return FlopBreakdown(self.conv + other.conv, self.linear + other.linear,
                             self.attention + other.attention, self.other + other.other, dict(by_op))

    def __radd__(self, other):  # sum() starts from 0
        if other == 0:
            return self
        return NotImplemented

    def __mul__(self, n: int) -> FlopBreakdown:
        if isinstance(n, bool) or not isinstance(n, int):
            return NotImplemented
        return FlopBreakdown(self.conv * n, self.linear * n, self.attention * n, self.other * n,
                             {k: v * n for k, v in self.by_op.items()})

    __rmul__ = __mul__

    def to_dict(self) -> dict:
        return {"conv_flops": self.conv, "linear_flops": self.linear, "attention_flops": self.attention,
                "other_flops": self.other, "flops": self.flops, "paper_macs": self.paper_macs,
                "no_attention_macs": self.no_attention_macs, "by_op": dict(self.by_op)}

    @classmethod
    def from_counts(cls, counts: dict) -> FlopBreakdown:
        """From FlopCounterMode's ``get_flop_counts()["Global"]`` (op packet -> FLOPs)."""
        conv = linear = attention = other = 0
        for op, n in counts.items():
            if op in CONV_OPS:
                conv += n
            elif op in LINEAR_OPS:
                linear += n
            elif op in ATTENTION_OPS:
                attention += n
            else:
                other += n
        return cls(conv, linear, attention, other, {str(op): int(n) for op, n in counts.items()})


# --- shape-only shortcuts for uncounted ops ----------------------------------

def _is_shape_only(t) -> bool:
    if not isinstance(t, torch.Tensor):
        return False
    return t.is_meta or isinstance(t, FakeTensor)


_UNARY_LIKE = _packets("silu", "gelu", "_safe_softmax", "_softmax", "clone")
_BINARY = _packets("add", "mul", "div", "sub")
_OVERLOADS_BINARY = {"Tensor", "Scalar"}
_SHORTCUT_PACKETS = _UNARY_LIKE | _BINARY | _packets("native_group_norm", "native_layer_norm", "addmm")


class _ShapeOnly(TorchDispatchMode):
    """Answers a few uncounted ops on meta/fake tensors from shapes alone.

    Their meta kernels are Python references (group/layer norm, softmax,
    elementwise) and take most of a meta UNet pass; none of them is counted,
    so only their output metadata matters. Everything else, and any op on
    real tensors, goes to its kernel as usual. Enter it *before* (outside)
    FlopCounterMode so the counter still sees every op first.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet not in _SHORTCUT_PACKETS:
            return func(*args, **kwargs)
        try:
            out = self._shortcut(func, packet, args, kwargs)
        except Exception:  # any doubt: the real kernel decides
            out = None
        if out is not None:
            return out
        return func(*args, **kwargs)

    @staticmethod
    def _shortcut(func, packet, args, kwargs):
        if not args or not _is_shape_only(args[0]):
            return None
        x = args[0]
        if packet in _UNARY_LIKE and func._overloadname == "default":
            if packet is aten._safe_softmax:  # (self, dim, dtype=None)
                dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None)
                return torch.empty_like(x, dtype=dtype or x.dtype)
            if packet is aten._softmax:  # (self, dim, half_to_float)
                return None if (len(args) > 2 and args[2]) else torch.empty_like(x)
            if kwargs.get("memory_format") is not None:
                return None
            return torch.empty_like(x)
        if packet in _BINARY and func._overloadname in _OVERLOADS_BINARY and len(args) == 2:
            y = args[1]
            if isinstance(y, torch.Tensor):
                if not (_is_shape_only(y) and y.device == x.device):
                    return None
                shape = torch.broadcast_shapes(x.shape, y.shape)
            elif isinstance(y, (int, float, bool)):
                shape = x.shape
            else:
                return None
            dtype = torch.result_type(x, y)
            if packet is aten.div and not (dtype.is_floating_point or dtype.is_complex):
                return None  # true division promotes ints; let the kernel say how
            if tuple(shape) == tuple(x.shape):
                return torch.empty_like(x, dtype=dtype)
            return torch.empty(shape, dtype=dtype, device=x.device)
        if packet is aten.native_group_norm and func._overloadname == "default":
            n, group = args[3], args[6]
            stats = torch.empty((n, group), dtype=x.dtype, device=x.device)
            return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)
        if packet is aten.native_layer_norm and func._overloadname == "default":
            normalized = list(args[1])
            axis = x.dim() - len(normalized)
            stat_shape = list(x.shape[:axis]) + [1] * len(normalized)
            stats = torch.empty(stat_shape, dtype=x.dtype, device=x.device)
            return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)
        if packet is aten.addmm and func._overloadname == "default" and len(args) == 3:
            a, b = args[1], args[2]
            if not (_is_shape_only(a) and _is_shape_only(b)) or a.dim() != 2 or b.dim() != 2:
                return None
            if a.shape[1] != b.shape[0]:
                return None
            return torch.empty((a.shape[0], b.shape[1]), dtype=torch.result_type(a, b), device=a.device)
        return None


# --- counting -----------------------------------------------------------------

class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every op is 'Global'.

    The tracker hooks every module call to attribute FLOPs per module; only
    the global total is used here, and the hooks cost about a quarter of a
    meta UNet pass.
    """

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FlopCounter:
    """Context manager: counts the FLOPs of what runs inside it.

        with FlopCounter() as fc:
            unet(x, t, encoder_hidden_states=text)
        fc.breakdown.paper_macs

    ``shortcuts`` (default on) answers uncounted ops on meta/fake tensors from
    their shapes, and ``per_module=False`` (default) skips FlopCounterMode's
    per-module attribution (its module hooks); both only make counting
    faster, the counts are identical (tested). With ``per_module=True``,
    ``per_module_counts`` holds FlopCounterMode's per-module table.
    Not reentrant; use one counter per region (e.g. per step).
    """

    def __init__(self, shortcuts: bool = True, per_module: bool = False) -> None:
        self.shortcuts = shortcuts
        self.per_module = per_module
        self.per_module_counts: dict | None = None
        self.breakdown: FlopBreakdown | None = None
        self._counter: FlopCounterMode | None = None
        self._shape_only: _ShapeOnly | None = None

    def __enter__(self) -> FlopCounter:
        self.breakdown = None
        if self.shortcuts:
            self._shape_only = _ShapeOnly()
            self._shape_only.__enter__()
        self._counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
        if not self.per_module and hasattr(self._counter, "mod_tracker"):
            # Per-module tracking is the slow part of FlopCounterMode; swap in a tracker that only
            # knows "Global" (a torch-internal attribute, hence the ignore).
            self._counter.mod_tracker = _GlobalOnly()  # type: ignore[assignment]
        try:
            self._counter.__enter__()
        except BaseException:
            if self._shape_only is not None:
                self._shape_only.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        try:
            self._counter.__exit__(*exc)
        finally:
            if self._shape_only is not None:
                self._shape_only.__exit__(*exc)
                self._shape_only = None
        counts = self._counter.get_flop_counts()
        self.breakdown = FlopBreakdown.from_counts(counts.get("Global", {}))
        if self.per_module:
            self.per_module_counts = counts
        self._counter = None
        return False


def count_flops(fn: Callable, *args, shortcuts: bool = True, per_module: bool = False,
                **kwargs) -> tuple[Any, FlopBreakdown]:
    """Run ``fn(*args, **kwargs)`` under a counter: (its result, the breakdown)."""
    with FlopCounter(shortcuts=shortcuts, per_module=per_module) as fc:
        out = fn(*args, **kwargs)
    assert fc.breakdown is not None  # set on exit
    return out, fc.breakdown


# --- full-size UNets without weights ------------------------------------------

def meta_unet(name: str):
    """A named UNet (``cloud.models.UNET_CONFIGS``) on the meta device: no
    memory, no init arithmetic, full-size shapes."""
    from .models import build_unet

    with torch.device("meta"):
        return build_unet(name).eval()


def unet_pass_flops(unet, batch: int = 1, latent_hw: tuple[int, int] | None = None, text_len: int = 77,
                    shortcuts: bool = True, per_module: bool = False) -> FlopBreakdown:
    """The FLOPs of one plain UNet forward over ``batch`` rows.

    ``unet`` is a UNet2DConditionModel or a name from ``UNET_CONFIGS`` (built
    on the meta device). Inputs are made on the UNet's device (meta for a
    meta UNet); ``latent_hw`` defaults to the config's sample size (64x64 for
    SD-v1.4: 512 px).
    """
    if isinstance(unet, str):
        unet = meta_unet(unet)
    cfg = unet.config
    h, w = latent_hw or (cfg.sample_size, cfg.sample_size)
    p = next(unet.parameters())
    x = torch.empty(batch, cfg.in_channels, h, w, device=p.device, dtype=p.dtype)
    text = torch.empty(batch, text_len, cfg.cross_attention_dim, device=p.device, dtype=p.dtype)
    t = torch.tensor(999, device=p.device)
    with torch.no_grad():
        _, fl = count_flops(unet, x, t, encoder_hidden_states=text, shortcuts=shortcuts, per_module=per_module)
    return fl


# --- the cloud steps of a plan ------------------------------------------------------------

def step_flops(unet, config, steps, inputs, shortcuts: bool = True,
               per_module: bool = False) -> Iterator[tuple[Any, FlopBreakdown]]:
    """(step, its FLOPs) for each of ``steps`` (``PlannedStep``s of ``config``'s plan), run in order
    through ``step_modes.run_mode`` on the same ``inputs`` (``ModeInputs``), each reading the caches
    the steps before it wrote: what the cloud step loop runs, step by step, counted."""
    from .modes import mode_spec
    from .step_modes import processors_installed, run_mode

    caches: dict[str, torch.Tensor] = {}
    with torch.no_grad(), processors_installed(unet):
        for step in steps:
            spec = mode_spec(config, step.index, step.mode)
            with FlopCounter(shortcuts=shortcuts, per_module=per_module) as fc:
                _, writes = run_mode(unet, spec, inputs, caches)
            caches.update(writes)
            assert fc.breakdown is not None
            yield step, fc.breakdown
