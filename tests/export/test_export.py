"""The device export: manifest, checks against torch, atomic output; the demo CLI."""

import json
from pathlib import Path

import pytest

from obclip.runtime.manifest import Manifest, ManifestError


def test_manifest_describes_the_export(engines_dir):
    m = Manifest.load(engines_dir)
    assert m.side == "device"
    assert set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert m.components["unet"].inputs == ("sample", "timestep", "encoder_hidden_states")
    assert m.components["unet"].outputs == ("out_sample",)
    assert m.components["vae_decoder"].inputs == ("latent_sample",)
    for c in m.components.values():
        assert c.check_max_abs_diff < 1e-3
        assert len(c.sha256) == 64
    assert (m.latent_channels, m.vae_scale_factor, m.default_image_size) == (4, 4, 64)


def test_onnx_runs_any_batch(device_pipeline):
    import numpy as np

    e = device_pipeline.engines
    for b in (1, 3):
        out = e.unet(np.zeros((b, 4, 16, 16), np.float32), 500.0, np.zeros((b, 77, 64), np.float32))
        assert out.shape == (b, 4, 16, 16)


def test_missing_or_stale_manifest_is_clear(tmp_path, engines_dir):
    with pytest.raises(ManifestError, match="build the engines first"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "obclip.manifest.v0"}))
    with pytest.raises(ManifestError, match="rerun export"):
        Manifest.load(tmp_path)


def test_failed_export_leaves_nothing_behind(tmp_path, model_dirs, monkeypatch):
    import obclip.export.device_engines as de
    import obclip.export.onnx_export as ox

    monkeypatch.setattr(ox, "OPSET", 1)  # no exporter supports opset 1: the export fails midway
    with pytest.raises(Exception):  # noqa: B017 - whichever error the exporter raises for opset 1
        de.build_device_engines(str(model_dirs[1]), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_export_cli_reports_missing_model(tmp_path, capsys):
    from obclip.export.build_engines import main

    assert main(["--device-model", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_writes_a_png(tmp_path, model_dirs, engines_dir, capsys):
    from PIL import Image

    from obclip.app.demo import main

    out = tmp_path / "x.png"
    rc = main(["a portrait photo of an old woman wearing glasses", "--cloud-model", str(model_dirs[0]),
               "--engines", str(engines_dir), "--steps", "6", "-k", "3", "--seed", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert Image.open(out).size == (64, 64)
    assert "the server received 6 candidate(s)" in printed
    assert "a portrait photo of a young woman wearing glasses" in printed


def test_demo_refuses_bad_input_cleanly(tmp_path, model_dirs, engines_dir, capsys):
    from obclip.app.demo import main

    argv = ["", "--cloud-model", str(model_dirs[0]), "--engines", str(engines_dir), "--out", str(tmp_path / "x.png")]
    assert main(argv) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_engines_are_reexported_when_the_model_changes(tmp_path, model_dirs, engines_dir, monkeypatch):
    """ensure_engines exports once, reuses while the weights are unchanged, re-exports after a retrain."""
    import shutil

    import obclip.export.device_engines as be

    model = tmp_path / "device-model"
    shutil.copytree(model_dirs[1], model)
    exports = []

    def fake_build(device_model, out, tiny_decoder=None):  # the real export is tested above; here only when it runs
        exports.append(device_model)
        target = Path(out) / "device"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(engines_dir, target)

    monkeypatch.setattr(be, "build_device_engines", fake_build)
    out = tmp_path / "engines"
    be.ensure_engines(str(model), out)
    be.ensure_engines(str(model), out)
    assert len(exports) == 1
    weights = next(model.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # "retrained" in place
    weights.write_bytes(bytes(data))
    be.ensure_engines(str(model), out)
    assert len(exports) == 2


def test_device_graphs_are_saved_as_exported_not_optimised(engines_dir, tmp_path):
    """A graph saved after onnxruntime's optimisations is closed to later passes (the transformer
    optimizer found no attention to fuse in one); the export saves each graph as the exporter wrote
    it, so onnxruntime's BASIC level still has work to do on it at load."""
    import onnx

    from obclip.runtime.sessions import SessionConfig, open_session

    for name in ("unet", "vae_decoder"):
        saved = engines_dir / name / "model.onnx"
        optimised = tmp_path / f"{name}.onnx"
        open_session(saved, SessionConfig(optimization="basic"), save_optimized=optimised)
        saved_nodes = len(onnx.load(str(saved), load_external_data=False).graph.node)
        optimised_nodes = len(onnx.load(str(optimised), load_external_data=False).graph.node)
        assert saved_nodes > optimised_nodes, (name, saved_nodes, optimised_nodes)
