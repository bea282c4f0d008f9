"""The tiny decoder (diffusers' AutoencoderTiny, TAESD): export, the runtime's choice, the flag, the shipped one."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

# The shipped tiny decoder's PSNR against the full decoder on device-pipeline latents must not fall
# below this (its PROVENANCE.json records what the distillation measured; docs/engines.md the table).
SHIPPED_PSNR_FLOOR_DB = 20.0


def write_random_tiny(folder: Path, latent_channels: int = 4, blocks: tuple[int, ...] = (1, 1, 1)) -> Path:
    """A random-weight AutoencoderTiny folder (config.json + safetensors), as a TAESD download looks."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(latent_channels=latent_channels, encoder_block_out_channels=(8,) * len(blocks),
                           decoder_block_out_channels=(8,) * len(blocks), num_encoder_blocks=blocks,
                           num_decoder_blocks=blocks)
    tiny.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_engines(model_dirs, tmp_path_factory):
    """Device engines of the random test model with a random tiny decoder, through the export command."""
    from obclip.export.build_engines import main

    root = tmp_path_factory.mktemp("tiny")
    tiny = write_random_tiny(root / "taesd")
    assert main(["--device-model", str(model_dirs[1]), "--out", str(root / "out"), "--tiny-decoder", str(tiny)]) == 0
    return root / "out" / "device", tiny


@pytest.fixture(scope="module")
def no_tiny_engines(tiny_engines, tmp_path_factory):
    """The same engines without their tiny decoder (as exported before this option, or without the flag)."""
    from obclip.runtime.manifest import Manifest

    folder = tmp_path_factory.mktemp("no-tiny") / "device"
    shutil.copytree(tiny_engines[0], folder)
    m = Manifest.load(folder)
    components = {k: v for k, v in m.components.items() if k != "vae_decoder_tiny"}
    files = {k: v for k, v in m.files.items() if not k.startswith("vae_decoder_tiny/")}
    replace(m, components=components, files=files).save(folder)
    shutil.rmtree(folder / "vae_decoder_tiny")
    return folder


def test_the_tiny_decoder_is_exported_and_decodes_like_torch(tiny_engines):
    import torch
    from diffusers import AutoencoderTiny

    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.export.tiny_decoder import TinyDecoderModule
    from obclip.runtime.manifest import Manifest

    folder, tiny_dir = tiny_engines
    m = Manifest.load(folder)
    c = m.components["vae_decoder_tiny"]
    assert (c.inputs, c.outputs) == (("latents",), ("sample",))
    assert json.loads((folder / "vae_decoder_tiny" / "config.json").read_text())["_class_name"] == "AutoencoderTiny"
    engines = DeviceEngines(EngineConfig(engines_dir=str(folder), decoder="tiny"))
    latents = np.random.default_rng(1).standard_normal((2, 4, 12, 20)).astype(np.float32)  # not the traced size
    images = engines.decode(latents)
    assert images.dtype == np.uint8 and images.shape == (2, 12 * m.vae_scale_factor, 20 * m.vae_scale_factor, 3)
    graph = engines.vae_decoder.session.run(None, {"latents": latents})[0]
    with torch.no_grad():
        want = TinyDecoderModule(AutoencoderTiny.from_pretrained(str(tiny_dir)).eval())(torch.from_numpy(latents))
    assert graph.dtype == np.float32
    assert np.abs(graph - want.numpy()).max() <= 1e-4
    # the full decoder stays the default and is another graph
    full = DeviceEngines(EngineConfig(engines_dir=str(folder)))
    assert full.decoder == "full" and not np.array_equal(full.decode(latents), images)


def test_the_tiny_graph_takes_the_denoisers_latents(tiny_engines, tmp_path):
    """diffusers' pipelines decode with vae.decode(latents / vae.config.scaling_factor): a tiny decoder
    with another scaling factor divides inside its graph, so the runtime feeds it the latents as they are."""
    import torch
    from diffusers import AutoencoderTiny

    from obclip.export.tiny_decoder import TinyDecoderModule

    tiny = AutoencoderTiny.from_pretrained(str(tiny_engines[1])).eval()
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(TinyDecoderModule(tiny)(latents), tiny.decode(latents).sample)  # TAESD: factor 1.0
        tiny.register_to_config(scaling_factor=0.5)
        assert torch.allclose(TinyDecoderModule(tiny)(latents), tiny.decode(latents * 2).sample)


@pytest.mark.parametrize("channels, blocks, match", [(16, (1, 1, 1), "16 latent channels"),
                                                     (4, (1, 1, 1, 1), "upsamples latents by 8")])
def test_a_tiny_decoder_for_another_vae_is_refused(model_dirs, tmp_path, capsys, channels, blocks, match):
    from obclip.export.build_engines import main

    tiny = write_random_tiny(tmp_path / "taesd", channels, blocks)
    rc = main(["--device-model", str(model_dirs[1]), "--out", str(tmp_path / "out"), "--tiny-decoder", str(tiny)])
    assert rc == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out" / "device").exists()


def test_a_folder_that_is_no_autoencoder_tiny_is_refused(model_dirs, tmp_path, capsys):
    from obclip.export.build_engines import main

    rc = main(["--device-model", str(model_dirs[1]), "--out", str(tmp_path / "out"),
               "--tiny-decoder", str(model_dirs[1] / "vae")])
    assert rc == 2
    assert "not an AutoencoderTiny" in capsys.readouterr().err


def test_the_demo_decodes_with_the_tiny_decoder_by_flag(model_dirs, tiny_engines, no_tiny_engines, tmp_path, capsys):
    from PIL import Image

    from obclip.app.demo import main

    args = ["a large red circle on a white background", "--method", "device-only", "--cloud-model",
            str(model_dirs[0]), "--steps", "4", "--seed", "0"]
    images = {}
    for decoder in ("full", "tiny"):
        out = tmp_path / f"{decoder}.png"
        assert main([*args, "--engines", str(tiny_engines[0]), "--decoder", decoder, "--out", str(out)]) == 0
        images[decoder] = np.asarray(Image.open(out))
        assert images[decoder].shape == (64, 64, 3)
    assert not np.array_equal(images["full"], images["tiny"])  # another decoder ran
    capsys.readouterr()
    rc = main([*args, "--engines", str(no_tiny_engines), "--decoder", "tiny", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 5, err
    assert "no tiny decoder" in err and "--tiny-decoder DIR" in err
    assert not (tmp_path / "x.png").exists()


def test_engine_config_refuses_an_unknown_decoder():
    from obclip.device.engines import EngineConfig
    from obclip.runtime.errors import InputError

    with pytest.raises(InputError, match="choose one of"):
        EngineConfig(decoder="taesd")


def test_the_shipped_tiny_decoder_holds_its_psnr_floor(tmp_path):
    """The embedded device model's distilled tiny decoder against its full decoder, on latents its own
    device pipeline produces (the ONNX UNet of the shipped model, device-only runs)."""
    import torch

    from obclip.cloud.models import default_models
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.oblivious import TransformConfig
    from obclip.device.pipeline import DevicePipeline, GenerationConfig, Method
    from obclip.export.device_engines import ensure_engines, shipped_tiny_decoder
    from obclip.export.device_variants import psnr
    from obclip.export.tiny_decoder import TinyDecoderModule, load_tiny_decoder
    from obclip.runtime.graphs import to_uint8_images

    device_dir = default_models()[1]
    tiny_dir = shipped_tiny_decoder(device_dir)
    assert tiny_dir is not None, "the embedded device model ships no vae_tiny/"
    provenance = json.loads((tiny_dir / "PROVENANCE.json").read_text())
    assert provenance["command"].startswith("python scripts/distil_tiny_decoder.py")
    tiny = TinyDecoderModule(load_tiny_decoder(tiny_dir, 4, 4))
    engines = ensure_engines(str(device_dir), tmp_path / "engines")   # full decoder only: faster
    pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines))))
    scores = []
    for i, prompt in enumerate(("a large red circle on a white background", "a small blue square on a black "
                                "background", "a green triangle", "an orange triangle on a white background")):
        config = GenerationConfig(method=Method.DEVICE_ONLY, seed=100 + i,
                                  transform=TransformConfig(schema_path="shapes"))
        result = pipeline.generate(prompt, None, config)
        with torch.no_grad():
            image = to_uint8_images(tiny(torch.from_numpy(result.latent)).numpy())[0]
        scores.append(psnr(image, result.image))
    assert min(scores) >= SHIPPED_PSNR_FLOOR_DB, scores
