"""Whether a cloud model folder and a device engines folder can split one generation.

    check_pair(cloud_dir, device_manifest, solver)    # an InputError naming every mismatch, or None

The cloud runs the first k steps and the device resumes from its latents and solver state, so the two
must share the latent space (the latent channels, and the VAE's downscaling and scaling factor: one
VAE), the model family (SD latents are not SDXL latents: the SDXL family retrained its VAE), the
noise schedule the solver steps on, and the tokenizer (the device checks that every candidate fits
the cloud's text encoder with its own). Read from the files alone (configs, tokenizer.json): no model
is loaded, so a mismatched pair is refused before the cloud service starts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from obclip.runtime.conditioning import Conditioning
from obclip.runtime.errors import InputError
from obclip.runtime.manifest import Manifest
from obclip.runtime.solver import solver_config


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {path}: {e}; the cloud model must be a local diffusers folder") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object")
    return data


def _vocab(path: Path) -> dict[str, int] | None:
    """A tokenizer.json's vocabulary, or None where the folder has none (a slow tokenizer's files only)."""
    if not path.is_file():
        return None
    vocab = _json(path).get("model", {}).get("vocab")
    return vocab if isinstance(vocab, dict) else None


def pair_mismatches(cloud_dir: str | Path, device: Manifest, solver: str) -> list[str]:
    """What keeps the cloud model at ``cloud_dir`` and the device engines ``device`` from one split run."""
    cloud = Path(cloud_dir).expanduser()
    unet = _json(cloud / "unet" / "config.json")
    vae = _json(cloud / "vae" / "config.json")
    scheduler = _json(cloud / "scheduler" / "scheduler_config.json")
    out = []
    cloud_family, device_family = Conditioning.from_unet_config(unet), device.unet_conditioning()
    if cloud_family.family != device_family.family:
        out.append(f"model family: the cloud model is {cloud_family.family}, the device model "
                   f"{device_family.family} (their VAEs' latent spaces differ)")
    if int(unet.get("in_channels", 4)) != device.latent_channels:
        out.append(f"latent channels: cloud {unet.get('in_channels')}, device {device.latent_channels}")
    scale = 2 ** (len(vae.get("block_out_channels", ())) - 1)
    scaling = float(vae.get("scaling_factor", 0.18215))
    if (scale, scaling) != (device.vae_scale_factor, device.vae_scaling_factor):
        out.append(f"VAE: cloud downscales by {scale} with scaling factor {scaling}, device by "
                   f"{device.vae_scale_factor} with {device.vae_scaling_factor}")
    ours, theirs = asdict(solver_config(solver, scheduler)), asdict(solver_config(solver, device.scheduler_config))
    differ = [f"{key} {ours[key]!r} vs {theirs[key]!r}" for key in ours if ours[key] != theirs[key]]
    if differ:
        out.append(f"scheduler ({solver}, cloud vs device): {', '.join(differ)}")
    tokenizer_config = cloud / "tokenizer" / "tokenizer_config.json"
    length = int(_json(tokenizer_config).get("model_max_length", 77)) if tokenizer_config.is_file() else None
    cloud_vocab, device_vocab = _vocab(cloud / "tokenizer" / "tokenizer.json"), _vocab(device.root / device.tokenizer)
    if length is not None and length != device.text_max_length:
        out.append(f"tokenizer: cloud context {length} tokens, device {device.text_max_length}")
    if cloud_vocab is not None and device_vocab is not None and cloud_vocab != device_vocab:
        out.append(f"tokenizer: the vocabularies differ ({len(cloud_vocab)} vs {len(device_vocab)} tokens)")
    return out


def check_pair(cloud_dir: str | Path, device: Manifest, solver: str) -> None:
    """Refuse a cloud model and device engines that cannot split one generation, naming every mismatch."""
    problems = pair_mismatches(cloud_dir, device, solver)
    if problems:
        raise InputError(f"the cloud model {cloud_dir} and the device engines {device.root} ({device.model_id}) "
                         "are not a pair: " + "; ".join(problems) + ". Pick a cloud and a device model of one "
                         "family with the same VAE, scheduler and tokenizer (e.g. SDXL + Koala-700m, SD-v1.4 + "
                         "BK-SDM)")
