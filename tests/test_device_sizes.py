"""A size the device engines cannot run is refused before anything is sent."""

from __future__ import annotations

import pytest

from obclip.device.pipeline import GenerationConfig


def test_a_size_the_engines_cannot_run_is_refused_before_sending(device_pipeline):
    sent = []

    def transport(request_bytes: bytes) -> bytes:
        sent.append(request_bytes)
        raise AssertionError("nothing may be sent")

    size = device_pipeline.engines.manifest.default_image_size
    other = size + 4 * device_pipeline.engines.manifest.vae_scale_factor
    with pytest.raises(ValueError, match=f"fixed UNet size of {size}x{size}"):
        device_pipeline.generate("a photo of an old man", transport, GenerationConfig(height=other, width=other))
    assert sent == []
    # The size the engines were exported at still works (prepare only: nothing is sent here either).
    assert device_pipeline.prepare("a photo of an old man", GenerationConfig(height=size, width=size)).request


def test_the_main_job_refuses_the_size_before_starting_a_service(engines_dir, capsys):
    from obclip.app.demo import main

    code = main(["a photo of an old man", "--engines", str(engines_dir), "--size", "96", "--seed", "0"])
    assert code == 2
    assert "fixed UNet size" in capsys.readouterr().err
