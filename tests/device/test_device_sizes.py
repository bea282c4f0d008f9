"""Any image size in the engines' stated range runs without re-export; others are refused before sending."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from obclip.device.pipeline import GenerationConfig, Method


def test_the_manifest_states_the_size_range(device_pipeline):
    m = device_pipeline.engines.manifest
    assert m.image_size == {"min": 32, "max": 128, "multiple": 16}  # mini: 2 downsamples x VAE 4, 64 px trained
    assert m.precision == "fp32"


def test_another_size_runs_through_the_pipeline(device_pipeline):
    # Non-square and not the export size (64x64): the graphs' height and width are dynamic.
    config = GenerationConfig(method=Method.DEVICE_ONLY, num_inference_steps=3, seed=0, height=48, width=96)
    result = device_pipeline.generate("a red circle", None, config)
    assert result.image.shape == (48, 96, 3)
    assert result.latent.shape == (1, 4, 12, 24)
    assert np.isfinite(result.latent).all()


@pytest.mark.parametrize("height,width", [(144, 64), (64, 16), (72, 64)])
def test_a_size_outside_the_range_is_refused_before_sending(device_pipeline, height, width):
    sent = []

    def transport(request_bytes: bytes) -> bytes:
        sent.append(request_bytes)
        raise AssertionError("nothing may be sent")

    with pytest.raises(ValueError, match="from 32 to 128 pixels in steps of 16"):
        device_pipeline.generate("a photo of an old man", transport, GenerationConfig(height=height, width=width))
    assert sent == []


def test_the_main_job_runs_another_size(tmp_path, model_dirs, engines_dir, capsys):
    from PIL import Image

    from obclip.app.demo import main

    out = tmp_path / "x.png"
    rc = main(["a red circle", "--cloud-model", str(model_dirs[0]), "--engines", str(engines_dir), "--in-process",
               "--size", "96", "--steps", "4", "-k", "2", "--seed", "0", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    assert Image.open(out).size == (96, 96)


def test_the_main_job_refuses_the_size_before_starting_a_service(model_dirs, engines_dir, capsys):
    from obclip.app.demo import main

    code = main(["a photo of an old man", "--cloud-model", str(model_dirs[0]), "--engines", str(engines_dir),
                 "--size", "144", "--seed", "0"])
    assert code == 2
    assert "from 32 to 128 pixels" in capsys.readouterr().err


def test_generate_refuses_the_size_and_the_server_sees_nothing(engines_dir, capsys):
    from obclip.device.generate import main

    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            connections.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        code = main(["a red circle", "--server", url, "--engines", str(engines_dir), "--size", "200"])
    finally:
        server.close()
    assert code == 2
    assert "from 32 to 128 pixels" in capsys.readouterr().err
    assert connections == []
