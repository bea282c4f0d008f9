"""A tiny device decoder: diffusers' ``AutoencoderTiny`` (the TAESD architecture) beside the VAE decoder.

    tiny = load_tiny_decoder(folder, latent_channels=4, vae_scale_factor=8)   # a local AutoencoderTiny
    module, spec = TinyDecoderModule(tiny), tiny_decoder_spec(4)             # exported like the VAE decoder

Its graph (``vae_decoder_tiny`` in the device manifest) takes the denoiser's latents as the UNet leaves
them and returns the image in [-1, 1]: diffusers' pipelines call ``vae.decode(latents /
vae.config.scaling_factor)`` whatever the VAE, and an ``AutoencoderTiny`` has ``scaling_factor`` 1.0
(TAESD decodes the UNet's latents directly), so the division is kept inside the graph and the
runtime feeds the tiny graph the latents unscaled (``runtime.graphs.DECODERS``).

Weights come from a local folder only (``AutoencoderTiny.from_pretrained(folder)``: config.json and
diffusion_pytorch_model.safetensors, e.g. a download of madebyollin/taesd); the embedded pair ships
one distilled from its own VAE decoder (``scripts/distil_tiny_decoder.py``, ``SHIPPED_FOLDER``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderTiny

from obclip.runtime.errors import InputError
from obclip.runtime.graphs import DECODERS

from .specs import GraphSpec, TensorSpec

TINY_COMPONENT = DECODERS["tiny"]
TINY_CONFIG = f"{TINY_COMPONENT}/config.json"   # the AutoencoderTiny's config, beside its graph
SHIPPED_SUBFOLDER = "vae_tiny"   # beside vae/ in the embedded device model, with PROVENANCE.json


def tiny_decoder_spec(channels: int) -> GraphSpec:
    """The tiny decoder's graph: the denoiser's latents -> the image in [-1, 1]."""
    return GraphSpec(TINY_COMPONENT, (TensorSpec("latents", ("batch", channels, "height", "width")),),
                     (TensorSpec("sample", ("batch", 3, "image_height", "image_width")),))


def tiny_upscale(config: Any) -> int:
    """How many pixels one latent becomes along each side: DecoderTiny upsamples between its blocks."""
    return int(config.upsampling_scaling_factor) ** (len(config.num_decoder_blocks) - 1)


def check_tiny_decoder(tiny: AutoencoderTiny, latent_channels: int, vae_scale_factor: int, source: str) -> None:
    """Refuse a tiny decoder that cannot stand in for this model's VAE decoder."""
    c = tiny.config
    if int(c.latent_channels) != latent_channels:
        raise InputError(f"the tiny decoder {source} takes {c.latent_channels} latent channels, the device VAE "
                         f"has {latent_channels}; use a TAESD made for this VAE (TAESD for SD 1.x/2.x: 4 channels, "
                         "TAESDXL for SDXL, TAESD3 for SD3: 16)")
    if tiny_upscale(c) != vae_scale_factor:
        raise InputError(f"the tiny decoder {source} upsamples latents by {tiny_upscale(c)}, the device VAE by "
                         f"{vae_scale_factor}; use a tiny decoder made for this VAE")
    if int(c.out_channels) != 3:
        raise InputError(f"the tiny decoder {source} returns {c.out_channels} channels, not an RGB image")


def load_tiny_decoder(folder: str | Path, latent_channels: int, vae_scale_factor: int) -> AutoencoderTiny:
    """A local diffusers ``AutoencoderTiny`` folder, checked against the device VAE; never the hub."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise InputError(f"--tiny-decoder {folder}: not a diffusers AutoencoderTiny folder (no config.json); pass "
                         "a local folder such as a download of madebyollin/taesd (config.json and "
                         "diffusion_pytorch_model.safetensors)")
    config = AutoencoderTiny.load_config(str(path), local_files_only=True)
    if config.get("_class_name") != "AutoencoderTiny":
        raise InputError(f"--tiny-decoder {folder}: config.json is a {config.get('_class_name')}, not an "
                         "AutoencoderTiny (TAESD)")
    try:
        tiny = AutoencoderTiny.from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError) as e:   # missing or mismatched weights
        raise InputError(f"--tiny-decoder {folder}: could not load its weights: {e}") from e
    check_tiny_decoder(tiny, latent_channels, vae_scale_factor, str(folder))
    return tiny


class TinyDecoderModule(torch.nn.Module):
    """``AutoencoderTiny.decode`` as diffusers' pipelines call it: latents / scaling_factor -> sample."""

    def __init__(self, tiny: AutoencoderTiny):
        super().__init__()
        self.tiny = tiny

    def forward(self, latents: torch.Tensor) -> Any:
        return self.tiny.decode(latents / self.tiny.config.scaling_factor, return_dict=False)[0]
