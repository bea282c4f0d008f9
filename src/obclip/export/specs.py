"""Every exported graph as one spec: tensor names, shapes with their dynamic axes, sample inputs, and
the TensorRT profile (the TensorRT demo's ``BaseModel`` and onnxruntime's ``diffusion_models.py`` way).

A tensor's shape is written with numbers for fixed sizes and names for dynamic ones, so the dynamic
axes handed to the exporter, the inputs a graph is traced and checked on, and the shapes of a
TensorRT profile all come from one declaration::

    spec = unet_spec(channels=4, text_length=77, text_dim=768)
    spec.dynamic_axes()                       # {"sample": {0: "batch", 2: "height", 3: "width"}, ...}
    spec.sample({"batch": 2, "height": 8, "width": 8}, rng)   # random inputs at those sizes

Torch-free (numpy only): the exporters feed the samples to torch, the fp16 check and the TensorRT
builder read the specs back from a manifest (``ModeGraphSpec.from_manifest``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from obclip.cloud.modes import ALIGN_INPUTS, ATTN, KV, RESIDUAL, ModeSpec, spec_from_dict
from obclip.runtime.conditioning import TIME_IDS
from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.graphs import PENULTIMATE
from obclip.runtime.manifest import Manifest
from obclip.runtime.plan import StepMode

Dim = int | str
Shape = tuple[int, ...]
Dims = Mapping[str, int]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``fill`` says how sample values are drawn: "normal", "ids"
    (integers in [0, value)), "constant" (every element ``value``) or "alignment" (batch reuse's tables)."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    fill: str = "normal"
    value: float = 0.0

    def axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    def at(self, dims: Dims) -> Shape:
        try:
            return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)
        except KeyError as e:
            raise InputError(f"{self.name}: no size given for its dynamic axis {e.args[0]!r}") from None

    def sample(self, dims: Dims, rng: np.random.Generator) -> np.ndarray:
        shape = self.at(dims)
        if self.fill == "ids":
            return rng.integers(0, int(self.value), shape).astype(self.dtype)
        if self.fill == "constant":
            return np.full(shape, self.value, self.dtype)
        return rng.standard_normal(shape).astype(self.dtype)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: t.axes() for t in (*self.inputs, *self.outputs) if t.axes()}

    def shapes(self, dims: Dims) -> dict[str, Shape]:
        """Every input's shape at the given dynamic sizes."""
        return {t.name: t.at(dims) for t in self.inputs}

    def sample(self, dims: Dims, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random inputs at the given dynamic sizes, in input order."""
        return {t.name: t.sample(dims, rng) for t in self.inputs}


# --- the device's graphs (optimum's names) ----------------------------------------------


def text_encoder_spec(text_length: int, text_dim: int, vocab_size: int, name: str = "text_encoder",
                      pooled: str = "pooler_output", pooled_dim: int | None = None,
                      penultimate: bool = False) -> GraphSpec:
    """A CLIP text encoder: ``input_ids`` -> ``last_hidden_state``, its pooled output (``pooler_output``;
    SDXL's ``text_encoder_2``: the projected ``text_embeds``) and, for the SDXL family, the
    ``penultimate_hidden_state`` its UNet is conditioned on."""
    outputs = [TensorSpec("last_hidden_state", ("batch", text_length, text_dim)),
               TensorSpec(pooled, ("batch", text_dim if pooled_dim is None else pooled_dim))]
    if penultimate:
        outputs.append(TensorSpec(PENULTIMATE, ("batch", text_length, text_dim)))
    return GraphSpec(name, (TensorSpec("input_ids", ("batch", text_length), "int32", "ids", vocab_size),),
                     tuple(outputs))


def added_input_specs(widths: Mapping[str, int], rows: str, image_size: int) -> list[TensorSpec]:
    """The UNet's added inputs (``Conditioning.added_widths``), one row each along axis ``rows``; the
    size conditioning is sampled at the model's image size, as the runtime computes it."""
    return [TensorSpec(name, (rows, width), fill="constant", value=float(image_size)) if name == TIME_IDS
            else TensorSpec(name, (rows, width)) for name, width in widths.items()]


def unet_spec(channels: int, text_length: int, text_dim: int, added: Mapping[str, int] | None = None,
              image_size: int = 0) -> GraphSpec:
    """The device UNet; ``added``: the widths of its added inputs (SDXL family), fed after the text."""
    latent = ("batch", channels, "height", "width")
    return GraphSpec("unet",
                     (TensorSpec("sample", latent), TensorSpec("timestep", ("batch",), fill="constant", value=501.0),
                      TensorSpec("encoder_hidden_states", ("batch", text_length, text_dim)),
                      *added_input_specs(added or {}, "batch", image_size)),
                     (TensorSpec("out_sample", latent),))


def vae_decoder_spec(channels: int) -> GraphSpec:
    return GraphSpec("vae_decoder", (TensorSpec("latent_sample", ("batch", channels, "height", "width")),),
                     (TensorSpec("sample", ("batch", 3, "image_height", "image_width")),))


def vae_encoder_spec(channels: int) -> GraphSpec:
    """Not run by the device: diffusers' ONNX pipelines load one (img2img encodes with it)."""
    return GraphSpec("vae_encoder", (TensorSpec("sample", ("batch", 3, "image_height", "image_width")),),
                     (TensorSpec("latent_sample", ("batch", channels, "height", "width")),))


# --- the cloud's step-mode graphs --------------------------------------------------------


def _cache_tensor(name: str, traced: Sequence[int]) -> TensorSpec:
    """A cache tensor, its dynamic axes by kind (names in ``cloud/modes.py``)."""
    s = list(traced)
    if name.startswith(KV):        # [N + 1, L, C]: one row per unique text
        return TensorSpec(name, ("n_text", *s[1:]))
    if name == RESIDUAL:           # [N, C, h, w]: one row per candidate, the latent's size
        return TensorSpec(name, ("n", s[1], "h", "w"))
    if name.startswith(ATTN):      # [2N, tokens, C]: tokens scale with the latent area
        return TensorSpec(name, ("rows", f"{name}:len", s[2]))
    if name.startswith("skip/"):   # [2N, C, h, w] at this block's level
        return TensorSpec(name, ("rows", s[1], f"{name}:h", f"{name}:w"))
    raise ArtifactError(f"unknown cache tensor {name!r}; re-export the cloud engines")


@dataclass(frozen=True)
class ModeGraphSpec(GraphSpec):
    """``run_mode`` for one step-mode spec and one request (N candidates, dynamic N, h and w). Cache
    tensors scale from the shapes they had when traced at ``trace_n`` candidates and latent side
    ``trace_side``. An SDXL-family UNet's added inputs (``added``: name -> row width,
    ``Conditioning.added_widths``) follow ``text``, one row per text like it."""

    mode: ModeSpec
    traced: Mapping[str, Sequence[int]]     # cache tensor -> its shape when traced
    trace_n: int
    trace_side: int

    @classmethod
    def build(cls, spec: ModeSpec, reads: Sequence[str], writes: Sequence[str], traced: Mapping[str, Sequence[int]],
              channels: int, text_length: int, text_dim: int, trace_n: int, trace_side: int,
              added: Mapping[str, int] | None = None, image_size: int = 0) -> ModeGraphSpec:
        latent = ("n", channels, "h", "w")
        inputs = [TensorSpec("sample", latent), TensorSpec("timestep", (1,), fill="constant", value=601.0),
                  TensorSpec("text", ("n_text", text_length, text_dim)),
                  *added_input_specs(added or {}, "n_text", image_size),
                  TensorSpec("guidance_scale", (1,), fill="constant", value=7.5)]
        if spec.aligned:
            inputs += [TensorSpec(ALIGN_INPUTS[0], ("n", text_length), "int64", "alignment"),
                       TensorSpec(ALIGN_INPUTS[1], ("n", text_length), "int64", "alignment"),
                       TensorSpec(ALIGN_INPUTS[2], ("n", text_length), "float32", "alignment")]
        inputs += [_cache_tensor(r, traced[r]) for r in reads]
        outputs = [TensorSpec("eps", latent)] + [_cache_tensor(w, traced[w]) for w in writes]
        return cls(spec.name, tuple(inputs), tuple(outputs), spec, dict(traced), trace_n, trace_side)

    @classmethod
    def from_manifest(cls, manifest: Manifest, mode: str) -> ModeGraphSpec:
        info, src = manifest.modes[mode], manifest.source or {}
        return cls.build(spec_from_dict(info["spec"]), info.get("reads", ()), info.get("writes", ()),
                         info.get("shapes", {}), manifest.latent_channels, manifest.text_max_length,
                         int(src["text_dim"]), int(src["trace_n"]), int(src["trace_latent"]),
                         manifest.unet_conditioning().added_widths(), manifest.default_image_size)

    @property
    def reads(self) -> list[str]:
        return [t.name for t in self.inputs if t.name in self.traced]

    def dims(self, n: int, side: int) -> dict[str, int]:
        """The dynamic sizes at N candidates and a square latent side."""
        out = {"n": n, "n_text": n + 1, "rows": 2 * n, "h": side, "w": side}
        for name, shape in self.traced.items():
            if name.startswith(ATTN):    # tokens = (latent area) / downscale^2 at this module's level
                per = self.trace_side * self.trace_side // int(shape[1])
                out[f"{name}:len"] = side * side // per
            elif name.startswith("skip/"):
                down = self.trace_side // int(shape[2])
                out[f"{name}:h"] = out[f"{name}:w"] = side // down
        return out

    def sample(self, dims: Dims, rng: np.random.Generator) -> dict[str, np.ndarray]:
        feeds = {t.name: t.sample(dims, rng) for t in self.inputs if t.fill != "alignment"}
        if self.mode.aligned:
            length = self.shapes(dims)[ALIGN_INPUTS[0]][1]
            feeds.update(zip(ALIGN_INPUTS, sample_alignment(int(dims["n"]), length)))
        return {t.name: feeds[t.name] for t in self.inputs}


def request_spec(channels: int, text_length: int, text_dim: int, added: Mapping[str, int] | None = None,
                 image_size: int = 0) -> ModeGraphSpec:
    """The inputs every mode graph of one request takes (a batch-reuse graph's: with the alignment
    tables and, SDXL family, the added inputs), without caches: for random requests."""
    return ModeGraphSpec.build(ModeSpec(StepMode.REUSE), (), (), {}, channels, text_length, text_dim, 1, 1,
                               added, image_size)


def manifest_request_spec(manifest: Manifest) -> ModeGraphSpec:
    """``request_spec`` of an exported cloud engines folder."""
    return request_spec(manifest.latent_channels, manifest.text_max_length, int((manifest.source or {})["text_dim"]),
                        manifest.unet_conditioning().added_widths(), manifest.default_image_size)


def sample_alignment(n: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token-alignment tables (``modes.TokenAlignment`` as arrays) whose range sums are exercised:
    one candidate reading a 3-column word and sharing a column, the others the identity."""
    starts = np.tile(np.arange(length, dtype=np.int64), (n, 1))
    stops = starts + 1
    weights = np.ones((n, length), np.float32)
    if n > 1:
        stops[-1, 1] = 4
        starts[-1, 2:] = np.minimum(np.arange(3, length + 1), length - 1)
        stops[-1, 2:] = starts[-1, 2:] + 1
        weights[-1, -2:] = 0.5
    return starts, stops, weights


def cross_kv_spec(traced: Mapping[str, Sequence[int]], text_length: int, text_dim: int) -> GraphSpec:
    """Every cross-attention module's K and V of the unique texts, in name order."""
    return GraphSpec("cross_kv", (TensorSpec("text", ("n_text", text_length, text_dim)),),
                     tuple(_cache_tensor(name, traced[name]) for name in sorted(traced)))
