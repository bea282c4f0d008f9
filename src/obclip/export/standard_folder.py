"""The device engines folder in the diffusers/optimum ONNX layout, beside obclip's own manifest.

    OUT/device/
      model_index.json                 OnnxStableDiffusionPipeline's components
      scheduler/scheduler_config.json  the model's scheduler
      tokenizer/                       tokenizer.json, tokenizer_config.json (transformers' files)
      text_encoder/model.onnx, config.json
      unet/model.onnx, config.json
      vae_decoder/model.onnx, config.json
      vae_encoder/model.onnx, config.json  not run by the device; the pipeline needs one (img2img)
      manifest.json                    obclip's: every file's hash, sizes, verification (the source of truth)
      text_encoder_2/, tokenizer_2/    SDXL family only; model_index.json then names optimum's
                                       ORTStableDiffusionXLPipeline layout (not opened by optimum here:
                                       not installed; its text graphs also output every hidden state)

so ``diffusers.OnnxStableDiffusionPipeline.from_pretrained("OUT/device")`` (and optimum's and
onnxruntime's tools that read this layout) open the same graphs the device runs. What
that pipeline assumes and obclip's graphs do not fix (docs/engines.md): latents at 1/8 of the
image with 4 channels, and SD's VAE scaling factor 0.18215; a model with another VAE (the embedded
ObCLIP-Mini's) loads and generates there, at its own scale, but only obclip's runtime reads its
scaling factor from the manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# Files of the layout besides the graphs and tokenizer.json, relative to the folder.
STANDARD_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/tokenizer_config.json",
                  "text_encoder/config.json", "unet/config.json", "vae_decoder/config.json",
                  "vae_encoder/config.json")
# ... and an SDXL-family folder's besides
SDXL_FILES = ("text_encoder_2/config.json", "tokenizer_2/tokenizer_config.json", "tokenizer_2/tokenizer.json")
ONNX_COMPONENT = ["diffusers", "OnnxRuntimeModel"]


def model_index(scheduler_class: str) -> dict[str, Any]:
    """diffusers' model_index.json for the device folder."""
    import diffusers

    return {"_class_name": "OnnxStableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
            "scheduler": ["diffusers", scheduler_class], "text_encoder": ONNX_COMPONENT,
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ONNX_COMPONENT, "vae_decoder": ONNX_COMPONENT,
            "vae_encoder": ONNX_COMPONENT}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_standard_files(folder: Path, lm: Any, vae: Any) -> None:
    """The layout's files for a device model (``lm``: cloud.models' TextToLatentModel, ``vae``: its
    AutoencoderKL) into ``folder``, beside graphs already exported there."""
    scheduler = dict(lm.scheduler_config)
    index = model_index(str(scheduler.get("_class_name", "PNDMScheduler")))
    if lm.text_encoder_2 is not None:
        index.update(_class_name="ORTStableDiffusionXLPipeline", text_encoder_2=ONNX_COMPONENT,
                     tokenizer_2=["transformers", "CLIPTokenizer"])
        for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
            index.pop(key)
    _write_json(folder / "model_index.json", index)
    _write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    _write_json(folder / "text_encoder" / "config.json", lm.text_encoder.config.to_dict())
    _write_json(folder / "unet" / "config.json", dict(lm.unet.config))
    _write_json(folder / "vae_decoder" / "config.json", dict(vae.config))
    _write_json(folder / "vae_encoder" / "config.json", dict(vae.config))
    lm.tokenizer.save_pretrained(str(folder / "tokenizer"))
    if lm.text_encoder_2 is not None:   # SDXL family: optimum's ORTStableDiffusionXLPipeline's extra parts
        _write_json(folder / "text_encoder_2" / "config.json", lm.text_encoder_2.config.to_dict())
        lm.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))


def copy_standard_files(src: Path, dst: Path) -> None:
    """The layout's files of one engines folder into another (a precision variant of it)."""
    for rel in (*STANDARD_FILES, *SDXL_FILES):
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
