"""The device's models, run through onnxruntime from an export manifest.

Text encoder, UNet and VAE decoder, as exported by export/build_engines.py.
numpy in, numpy out; no torch anywhere on this side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from obclip.runtime.errors import InputError
from obclip.runtime.manifest import Manifest
from obclip.runtime.sessions import open_session, ort, run

from .tokenizer import ClipTokenizer

# "auto" tries these in order, keeping those this onnxruntime build offers; CPU always comes last,
# so nodes an accelerator cannot run fall back to it (onnxruntime assigns each node to the first
# listed provider that runs it).
PROVIDER_FALLBACK_ORDER = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
                           "NnapiExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider")
PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "directml": "DmlExecutionProvider", "dml": "DmlExecutionProvider",
                    "coreml": "CoreMLExecutionProvider", "nnapi": "NnapiExecutionProvider",
                    "xnnpack": "XnnpackExecutionProvider"}


def resolve_providers(requested: tuple[str, ...] | str, available: list[str] | None = None) -> tuple[str, ...]:
    """Provider names (full or short: "coreml", "cpu"...), or "auto", -> the list handed to onnxruntime,
    CPU appended as the fallback. A provider this onnxruntime build lacks is a ValueError naming the fix."""
    available = list(ort.get_available_providers()) if available is None else available
    names = (requested,) if isinstance(requested, str) else tuple(requested)
    if names == ("auto",):
        return tuple(p for p in PROVIDER_FALLBACK_ORDER if p in available)
    full = tuple(PROVIDER_ALIASES.get(n.lower(), n) for n in names)
    missing = [n for n, f in zip(names, full) if f not in available]
    if missing or not full:
        raise InputError(f"onnxruntime providers {missing or list(names)} are not available in this onnxruntime "
                         f"build; it offers {available}. Install the build that has them instead of this one "
                         "(obclip[gpu], i.e. onnxruntime-gpu: CUDA, "
                         "onnxruntime-directml: DirectML, onnxruntime-mobile/the iOS and Android packages: CoreML, "
                         "NNAPI, XNNPACK) or use providers=\"auto\"")
    return full if "CPUExecutionProvider" in full else (*full, "CPUExecutionProvider")


@dataclass(frozen=True)
class EngineConfig:
    """Which engines folder (one precision variant: device, device-fp16, device-int8) and how to run it."""

    engines_dir: str = "engines/device"           # folder holding manifest.json
    providers: tuple[str, ...] | str = ("CPUExecutionProvider",)   # names, short names, or "auto"
    threads: int | None = None                    # onnxruntime intra-op threads (None = its default)

    def __post_init__(self) -> None:
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise InputError(f"threads={self.threads!r} must be a positive integer or None (onnxruntime's default)")


class DeviceEngines:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.manifest = Manifest.load(config.engines_dir)
        m = self.manifest
        self.tokenizer = ClipTokenizer(m.root / m.tokenizer, m.text_max_length, m.pad_token_id)
        self.providers = resolve_providers(config.providers)
        self._text = open_session(m.path_of("text_encoder"), self.providers, config.threads)
        self._unet = open_session(m.path_of("unet"), self.providers, config.threads)
        self._vae = open_session(m.path_of("vae_decoder"), self.providers, config.threads)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent shape for an image size, or a ValueError naming the sizes these engines run.
        Called before anything is sent, so a size the device cannot finish never reaches the cloud."""
        f = self.manifest.vae_scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise InputError(f"image size {height}x{width} must be a positive multiple of {f} "
                             "(the VAE's downscale factor)")
        # Dynamic graphs: the range their manifest states (the size must fit the UNet's skip connections).
        r = self.manifest.image_size
        if r is not None:
            lo, hi, mult = int(r["min"]), int(r["max"]), int(r["multiple"])
            for side in (height, width):
                if not lo <= side <= hi or side % mult:
                    raise InputError(f"image size {height}x{width}: these device engines ({self.config.engines_dir}) "
                                     f"run heights and widths from {lo} to {hi} pixels in steps of {mult}; "
                                     f"choose --size in that range (e.g. {self.manifest.default_image_size})")
        # A graph exported with fixed height/width runs only that size: read it from the graph itself.
        for session, what in ((self._unet, "UNet"), (self._vae, "VAE decoder")):
            dims = session.get_inputs()[0].shape[2:]
            fixed = [d for d in dims if isinstance(d, int)]
            if len(fixed) == 2 and (fixed[0] * f, fixed[1] * f) != (height, width):
                raise InputError(f"image size {height}x{width}: these device engines ({self.config.engines_dir}) "
                                 f"were exported with a fixed {what} size of {fixed[0] * f}x{fixed[1] * f} "
                                 f"pixels; use --size {fixed[0] * f} or export engines with dynamic sizes")
        return (self.manifest.latent_channels, height // f, width // f)

    def encode_text(self, prompts: list[str]) -> np.ndarray:
        """[B, 77, D] hidden states, the UNet's conditioning."""
        ids = self.tokenizer(prompts)
        return run(self._text, "last_hidden_state", input_ids=ids)

    def unet(self, sample: np.ndarray, timestep: float, encoder_hidden_states: np.ndarray) -> np.ndarray:
        t = np.full((sample.shape[0],), timestep, dtype=np.float32)
        return run(self._unet, "out_sample", sample=sample.astype(np.float32, copy=False), timestep=t,
                   encoder_hidden_states=encoder_hidden_states.astype(np.float32, copy=False))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents [B, C, h, w] -> uint8 images [B, H, W, 3]."""
        scaled = (latents / self.manifest.vae_scaling_factor).astype(np.float32)
        image = run(self._vae, "sample", latent_sample=scaled)
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        return np.asarray((image.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8))
