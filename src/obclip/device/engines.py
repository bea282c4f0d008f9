"""The device's models, run through onnxruntime from an export manifest.

Text encoder, UNet and VAE decoder, as exported by export/build_engines.py.
numpy in, numpy out; no torch anywhere on this side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from obclip.runtime.manifest import Manifest
from obclip.runtime.sessions import open_session, run

from .tokenizer import ClipTokenizer


@dataclass(frozen=True)
class EngineConfig:
    engines_dir: str = "engines/device"           # folder holding manifest.json
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int | None = None                    # onnxruntime intra-op threads (None = its default)


class DeviceEngines:
    def __init__(self, config: EngineConfig = EngineConfig()):
        self.config = config
        self.manifest = Manifest.load(config.engines_dir)
        m = self.manifest
        self.tokenizer = ClipTokenizer(m.root / m.tokenizer, m.text_max_length, m.pad_token_id)
        self._text = open_session(m.path_of("text_encoder"), config.providers, config.threads)
        self._unet = open_session(m.path_of("unet"), config.providers, config.threads)
        self._vae = open_session(m.path_of("vae_decoder"), config.providers, config.threads)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent shape for an image size, or a ValueError naming the sizes these engines run.
        Called before anything is sent, so a size the device cannot finish never reaches the cloud."""
        f = self.manifest.vae_scale_factor
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"image size {height}x{width} must be a positive multiple of {f} "
                             "(the VAE's downscale factor)")
        # A graph exported with fixed height/width runs only that size: read it from the graph itself.
        for session, what in ((self._unet, "UNet"), (self._vae, "VAE decoder")):
            dims = session.get_inputs()[0].shape[2:]
            fixed = [d for d in dims if isinstance(d, int)]
            if len(fixed) == 2 and (fixed[0] * f, fixed[1] * f) != (height, width):
                raise ValueError(f"image size {height}x{width}: these device engines ({self.config.engines_dir}) "
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
