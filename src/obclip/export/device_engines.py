"""Export the device side to ONNX: text encoder, UNet, VAE decoder (+ tokenizer, VAE encoder, and a
tiny decoder when given one: ``export/tiny_decoder.py``).

Writes ``<out>/device/``: one ``model.onnx`` per component, ``tokenizer/tokenizer.json`` and
``manifest.json`` (what ``runtime/graphs.py`` opens), in diffusers' ONNX layout
(``export/standard_folder.py``: ``OnnxStableDiffusionPipeline.from_pretrained`` opens it too).
Each graph is declared once (``export/specs.py``), traced, run once through onnxruntime on another
batch and size and compared with torch; the max abs difference is printed and recorded, and an
export that disagrees fails.
The folder is built beside the target and moved into place at the end, so a failed export never
leaves a half-written engine folder.

Tensor names and types follow optimum's ONNX export, so tools that read those work:
text encoder ``input_ids`` (int32) -> ``last_hidden_state``, ``pooler_output``;
UNet ``sample``, ``timestep``, ``encoder_hidden_states`` -> ``out_sample``;
VAE decoder ``latent_sample`` -> ``sample``; the tiny decoder ``vae_decoder_tiny``: ``latents`` (the
denoiser's, unscaled) -> ``sample``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from diffusers import AutoencoderKL

from obclip.cloud.models import from_pretrained, load_text_to_latent, model_schema, resolve_model_dir
from obclip.runtime.errors import InputError
from obclip.runtime.locations import default_engines_root
from obclip.runtime.manifest import Manifest, ManifestError, sha256_file

from .onnx_export import UNetModule, VaeDecoderModule, VaeEncoderModule, export_component, text_encoder_exports
from .specs import unet_spec, vae_decoder_spec, vae_encoder_spec
from .staging import family_fields, model_fingerprint, model_label, model_weights, staged_folder, verification_settings
from .standard_folder import write_standard_files
from .tiny_decoder import SHIPPED_SUBFOLDER, TINY_CONFIG, TinyDecoderModule, load_tiny_decoder, tiny_decoder_spec


def image_size_range(unet: Any, vae_scale: int, default: int) -> dict[str, int]:
    """Pixels the dynamic device graphs accept: multiples of the UNet's overall downsampling (its
    skip connections must line up) times the VAE's, from half to twice the trained size."""
    multiple = 2 ** (len(unet.config.block_out_channels) - 1) * vae_scale
    lo = max(multiple, (default // 2) // multiple * multiple)
    hi = max(lo, (2 * default) // multiple * multiple)
    return {"min": lo, "max": hi, "multiple": multiple}


def build_device_engines(model: str, out: Path, tolerance: float = 1e-3,
                         tiny_decoder: str | Path | None = None) -> Manifest:
    """Export the device model at ``model`` into ``out``/device, atomically; ``tiny_decoder``: a local
    diffusers AutoencoderTiny folder exported beside the VAE decoder as ``vae_decoder_tiny``."""
    lm = load_text_to_latent(model)
    vae = from_pretrained(AutoencoderKL, model, "vae").eval()
    c = lm.latent_channels
    tiny = None if tiny_decoder is None else load_tiny_decoder(tiny_decoder, c, lm.vae_scale_factor)
    target = out / "device"
    out.mkdir(parents=True, exist_ok=True)
    with staged_folder(target) as work:
        print(f"exporting device model {model} -> {target}")
        max_len = int(lm.tokenizer.model_max_length)
        _, h, w = lm.latent_shape(lm.default_image_size, lm.default_image_size)
        rng = np.random.default_rng(0)
        # Dynamic height/width: the check runs another (non-square) size and batch than the trace.
        size_range = image_size_range(lm.unet, lm.vae_scale_factor, lm.default_image_size)
        m = size_range["multiple"] // lm.vae_scale_factor
        traced, checked = {"height": h, "width": w}, {"height": h + m, "width": w + 2 * m}

        def pixels(latent: dict[str, int]) -> dict[str, int]:
            return {"image_height": latent["height"] * lm.vae_scale_factor,
                    "image_width": latent["width"] * lm.vae_scale_factor}
        cond = lm.conditioning
        texts = [(module, spec, {"batch": 1}, {"batch": 2}) for module, spec in text_encoder_exports(lm)]
        unet = unet_spec(c, max_len, int(lm.unet.config.cross_attention_dim), cond.added_widths(),
                         lm.default_image_size)
        exports = (
            *texts,
            (UNetModule(lm.unet, cond.added_inputs), unet, {"batch": 2, **traced}, {"batch": 4, **checked}),
            (VaeDecoderModule(vae), vae_decoder_spec(c), {"batch": 1, **traced}, {"batch": 2, **checked}),
            (VaeEncoderModule(vae), vae_encoder_spec(c), {"batch": 1, **pixels(traced)},
             {"batch": 2, **pixels(checked)}),
        )
        if tiny is not None:
            exports += ((TinyDecoderModule(tiny), tiny_decoder_spec(c), {"batch": 1, **traced},
                         {"batch": 2, **checked}),)
        comps = {spec.name: export_component(module, spec, work, spec.sample(trace, rng), spec.sample(check, rng),
                                             tolerance, resave=True)
                 for module, spec, trace, check in exports}
        write_standard_files(work, lm, vae)  # diffusers' layout: model_index.json, configs, tokenizer
        if tiny is not None:   # its config beside its graph (hashed with the other files below)
            (work / TINY_CONFIG).write_text(json.dumps(dict(tiny.config), indent=2, sort_keys=True))
        # Every other file (external data of large graphs, the layout's files) is hashed too.
        files = {str(f.relative_to(work)): sha256_file(f) for f in sorted(work.rglob("*"))
                 if f.is_file() and f.name != "model.onnx"}
        manifest = Manifest(
            side="device", model_id=model_label(model), components=comps, tokenizer="tokenizer/tokenizer.json",
            text_max_length=max_len, pad_token_id=int(lm.tokenizer.pad_token_id),
            latent_channels=c, vae_scale_factor=lm.vae_scale_factor, vae_scaling_factor=lm.vae_scaling_factor,
            default_image_size=lm.default_image_size, scheduler_config=dict(lm.scheduler_config),
            schema=model_schema(model), files=files, precision="fp32", image_size=size_range,
            verification=verification_settings(model_weights(model)),
            **family_fields(lm),
        )
        manifest.save(work)
    print(f"wrote {target / 'manifest.json'}")
    return Manifest.load(target)


def ensure_engines(device_model: str, out: Path, tiny_decoder: str | Path | None = None) -> Path:
    """``<out>/device`` exported from a local device model dir (and a tiny decoder folder, if given),
    reused while their files are unchanged (fingerprints in ``source.json`` beside the manifest; no
    path, so a moved model with the same files reuses it)."""
    target = out / "device"
    model = Path(device_model).resolve()
    tiny = None if tiny_decoder is None else model_fingerprint(Path(tiny_decoder).resolve())
    want = {"fingerprint": model_fingerprint(model), "tiny_decoder": tiny}
    try:
        Manifest.load(target)
        current = json.loads((target / "source.json").read_text()) == want
    except (ManifestError, OSError, ValueError):
        current = False
    if not current:  # missing, stale, or exported from another model or other weights
        build_device_engines(str(model), out, tiny_decoder=tiny_decoder)
        (target / "source.json").write_text(json.dumps(want, indent=1))
    return target


def shipped_tiny_decoder(device_model: str | Path) -> Path | None:
    """The tiny decoder a device model folder ships beside its VAE (the embedded pair's), or None."""
    folder = Path(device_model) / SHIPPED_SUBFOLDER
    return folder if (folder / "config.json").is_file() else None


def ensure_default_engines() -> Path:
    """``$OBCLIP_HOME/engines/device`` for the embedded default model with its tiny decoder, exported
    on first use."""
    model = resolve_model_dir(None, "device")
    return ensure_engines(model, default_engines_root(), shipped_tiny_decoder(model))


def ensure_model_engines(device_model: str) -> Path:
    """``$OBCLIP_HOME/engines/models/<folder name>/device`` for a local device model dir, exported on
    first use and whenever the model's files change (``ensure_engines``)."""
    model = Path(device_model).expanduser()
    if not (model / "model_index.json").is_file():
        raise InputError(f"device model {device_model!r} is not a diffusers model folder (no model_index.json); "
                         "pass a local folder such as a download of etri-vilab/koala-700m")
    return ensure_engines(str(model), default_engines_root() / "models" / model_label(model))
