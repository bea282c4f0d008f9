"""What a UNet is conditioned on besides (sample, timestep, encoder_hidden_states): one definition.

    cond = Conditioning.from_unet_config(unet_config, zero_uncond=...)   # a model family, from its config
    cond.added_inputs                 # ("text_embeds", "time_ids") for SDXL-family UNets, () for SD
    cond.request_added(n, h, w, guidance_scale, micro)   # time_ids / timestep_cond, one row per text

SD-v1.x and BK-SDM UNets take the text encoder's hidden states only. SDXL-family UNets (SDXL,
Koala-700m/1B, LCM-SDXL; diffusers' ``addition_embed_type="text_time"``) also take, per row,
``text_embeds`` (the pooled, projected output of the second text encoder) and ``time_ids`` (the
micro-conditioning: original size, crop top-left, target size, six numbers). LCM-SDXL
(``time_cond_proj_dim``) takes the guidance scale as an embedding, ``timestep_cond``, and is not
run with classifier-free guidance: its rows are the conditional ones only (``guided`` is False).

Every added input is laid out like the text: one row per text ([unconditional, candidates...]; the
unconditional row is the request's negative prompt, the empty prompt when it has none, and its
pooled ``text_embeds`` come from that text like the hidden states),
so the cloud's row layouts (``cloud/layouts.py``) and the device loop (``runtime/denoise.py``) map
it to UNet rows the same way as the hidden states. The cloud steps, the reference run, the device
loop and both exports read the family from here, and the numbers that are not text (``time_ids``,
``timestep_cond``) are computed by these functions on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError

TEXT_EMBEDS = "text_embeds"       # [rows, pooled_dim]: text_encoder_2's projected pooled output
TIME_IDS = "time_ids"             # [rows, 6]: original (h, w), crop top-left (y, x), target (h, w)
TIMESTEP_COND = "timestep_cond"   # [rows, guidance_embed_dim]: LCM's guidance-scale embedding
FAMILIES = ("sd", "sdxl")


@dataclass(frozen=True)
class MicroConditioning:
    """SDXL's size conditioning; None: diffusers' defaults (the image size, crop (0, 0))."""

    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None

    def time_ids(self, height: int, width: int) -> np.ndarray:
        """diffusers' ``_get_add_time_ids``: [original h, w, crop y, x, target h, w] as float32 [6]."""
        original = self.original_size or (height, width)
        crop = self.crop_top_left or (0, 0)
        target = self.target_size or (height, width)
        return np.array([*original, *crop, *target], dtype=np.float32)

    @property
    def is_default(self) -> bool:
        return self.original_size is None and self.crop_top_left is None and self.target_size is None


def guidance_embedding(guidance_scale: float, dim: int) -> np.ndarray:
    """LCM's guidance embedding of w = guidance_scale - 1 (diffusers' ``get_guidance_scale_embedding``,
    as its SDXL pipeline calls it): float32 [dim]."""
    if dim < 2:
        raise InputError(f"a guidance embedding needs at least 2 channels, got {dim}")
    # float64, then float32: the arguments reach ~1e4 rad, where a float32 sin is off by ~1e-3 and
    # numpy's and torch's float32 kernels differ; the cloud and the device both read these numbers.
    w = (guidance_scale - 1.0) * 1000.0
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float64) * -(math.log(10000.0) / (half - 1)))
    out = np.concatenate([np.sin(w * freqs), np.cos(w * freqs)]).astype(np.float32)
    if dim % 2:
        out = np.pad(out, (0, 1))
    return out


@dataclass(frozen=True)
class Conditioning:
    """A UNet's conditioning contract (its model family) and the text side that feeds it.

    ``family``: "sd" (hidden states only) or "sdxl" (two text encoders, penultimate hidden states
    concatenated, pooled ``text_embeds`` and ``time_ids``). ``pooled_dim``: the width of
    ``text_embeds``. ``guidance_embed_dim``: LCM's ``time_cond_proj_dim`` (None: classifier-free
    guided). ``zero_uncond``: the unconditional rows' text is zeros, not the empty prompt's encoding
    (diffusers' ``force_zeros_for_empty_prompt``, on for SDXL when no negative prompt is given); a
    negative prompt is encoded, hidden states and pooled embedding alike, as diffusers does."""

    family: str = "sd"
    pooled_dim: int | None = None
    guidance_embed_dim: int | None = None
    zero_uncond: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise InputError(f"unknown model family {self.family!r}; known: {', '.join(FAMILIES)}")
        if (self.family == "sdxl") != (self.pooled_dim is not None):
            raise InputError("an sdxl-family UNet takes pooled text embeddings (pooled_dim) and an sd one none; "
                             f"got family={self.family!r}, pooled_dim={self.pooled_dim!r}")
        for name in ("pooled_dim", "guidance_embed_dim"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise InputError(f"{name} must be a positive integer or None, got {v!r}")

    @property
    def text_encoders(self) -> int:
        return 2 if self.family == "sdxl" else 1

    @property
    def guided(self) -> bool:
        """Classifier-free guided ([uncond, cond] rows); False for a guidance-embedding UNet (LCM)."""
        return self.guidance_embed_dim is None

    @property
    def added_inputs(self) -> tuple[str, ...]:
        """The UNet's inputs besides sample, timestep and encoder_hidden_states, in graph order."""
        names: tuple[str, ...] = (TEXT_EMBEDS, TIME_IDS) if self.family == "sdxl" else ()
        return names + ((TIMESTEP_COND,) if self.guidance_embed_dim is not None else ())

    def added_widths(self) -> dict[str, int]:
        """Each added input's row width."""
        widths: dict[str, int] = {}
        if self.pooled_dim is not None:
            widths[TEXT_EMBEDS] = self.pooled_dim
            widths[TIME_IDS] = 6
        if self.guidance_embed_dim is not None:
            widths[TIMESTEP_COND] = self.guidance_embed_dim
        return widths

    def request_added(self, rows: int, height: int, width: int, guidance_scale: float,
                      micro: MicroConditioning | None = None) -> dict[str, np.ndarray]:
        """The added inputs that are not text (``time_ids``, ``timestep_cond``), ``rows`` equal rows each."""
        out: dict[str, np.ndarray] = {}
        if self.family == "sdxl":
            out[TIME_IDS] = np.tile((micro or MicroConditioning()).time_ids(height, width), (rows, 1))
        elif micro is not None and not micro.is_default:
            raise InputError("this model takes no micro-conditioning (original size, crop, target size): "
                             "it is not an SDXL-family model; leave those options unset")
        if self.guidance_embed_dim is not None:
            out[TIMESTEP_COND] = np.tile(guidance_embedding(guidance_scale, self.guidance_embed_dim), (rows, 1))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "pooled_dim": self.pooled_dim,
                "guidance_embed_dim": self.guidance_embed_dim, "zero_uncond": self.zero_uncond}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Conditioning:
        """From a manifest's ``conditioning`` (missing or empty: an SD model, as exported before families)."""
        if not d:
            return cls()
        try:
            return cls(family=d["family"], pooled_dim=d.get("pooled_dim"),
                       guidance_embed_dim=d.get("guidance_embed_dim"), zero_uncond=bool(d.get("zero_uncond", False)))
        except (KeyError, TypeError) as e:
            raise InputError(f"bad conditioning description {dict(d)!r}: {e}") from None

    @classmethod
    def from_unet_config(cls, config: Mapping[str, Any], zero_uncond: bool = False) -> Conditioning:
        """The family of a diffusers ``UNet2DConditionModel`` config; other added conditions are refused."""
        kind = config.get("addition_embed_type")
        proj = config.get("time_cond_proj_dim")
        for key in ("class_embed_type", "encoder_hid_dim_type"):
            if config.get(key) is not None:
                raise InputError(f"UNets with {key}={config.get(key)!r} are not supported (SD and SDXL families only)")
        if kind is None:
            return cls("sd", None, proj, zero_uncond)
        if kind != "text_time":
            raise InputError(f"UNets with addition_embed_type={kind!r} are not supported; SDXL's is 'text_time'")
        pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
        return cls("sdxl", pooled, proj, zero_uncond)
