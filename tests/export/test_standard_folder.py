"""The device engines folder is also a diffusers ONNX folder: OnnxStableDiffusionPipeline opens it."""

from __future__ import annotations

import json

import numpy as np

from obclip.runtime.manifest import Manifest


def test_diffusers_onnx_pipeline_loads_the_device_folder_and_generates(engines_dir):
    from diffusers import OnnxStableDiffusionPipeline

    pipe = OnnxStableDiffusionPipeline.from_pretrained(str(engines_dir), provider="CPUExecutionProvider")
    m = Manifest.load(engines_dir)
    assert type(pipe.scheduler).__name__ == m.scheduler_config["_class_name"]
    # the pipeline puts latents at 1/8 of the image; the test model's VAE scales by m.vae_scale_factor
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=np.random.RandomState(0))
    side = 64 // 8 * m.vae_scale_factor
    image = out.images[0]
    assert image.shape == (side, side, 3) and np.isfinite(image).all() and image.std() > 0


def test_the_layout_files_are_hashed_by_obclips_manifest(engines_dir):
    from obclip.export.standard_folder import STANDARD_FILES

    m = Manifest.load(engines_dir)
    for rel in STANDARD_FILES:
        assert rel in m.files, rel
    index = json.loads((engines_dir / "model_index.json").read_text())
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert index[name] == ["diffusers", "OnnxRuntimeModel"]
        assert (engines_dir / name / "model.onnx").is_file()
    assert "vae_encoder" in m.components  # hashed like every graph, though the device never runs it


def test_the_text_encoder_takes_int32_ids_as_optimum_exports_it(engines_dir):
    from obclip.runtime.sessions import open_session

    session = open_session(Manifest.load(engines_dir).path_of("text_encoder"))
    assert session.get_inputs()[0].type == "tensor(int32)"
