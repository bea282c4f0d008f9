"""The graph runtime (runtime/): one session opener, one ONNX reader, one latent_shape, components
that check what they are fed, and one device loop."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import obclip
from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.geometry import LatentGeometry
from obclip.runtime.sessions import SessionConfig, open_session

PACKAGE = Path(obclip.__file__).resolve().parent


def _calls(name: str) -> set[str]:
    """The package files that call ``name`` (as a function or an attribute)."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                    found.add(str(path.relative_to(PACKAGE)))
    return found


def test_one_session_opener_and_one_device_loop():
    assert _calls("InferenceSession") == {"runtime/sessions.py"}
    assert _calls("SessionOptions") == {"runtime/sessions.py"}
    # The solver is stepped by the device's loop and by the cloud's numpy solver, nowhere else.
    assert _calls("solver_step") == {"runtime/denoise.py", "cloud/numpy_solver.py"}


def test_the_onnx_reader_agrees_with_onnx(engines_dir, tmp_path):
    import onnx

    from obclip.runtime.onnx_file import external_initializers, external_locations, onnx_tensors

    path = engines_dir / "unet" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    assert [t.name for t in onnx_tensors(path) if t.initializer] == [i.name for i in model.graph.initializer]
    # The same graph with its weights outside: every initializer named with its location.
    onnx.save_model(onnx.load(str(path)), str(tmp_path / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="m.data", size_threshold=0)
    outside = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    want = {i.name for i in outside.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    assert want and external_initializers(tmp_path / "m.onnx", "m.data") == want
    assert external_locations(tmp_path / "m.onnx") == ("m.data",)
    (tmp_path / "bad.onnx").write_bytes(b"\x3a\xff\xff")
    with pytest.raises(ArtifactError, match="not a readable ONNX file"):
        onnx_tensors(tmp_path / "bad.onnx")


def test_latent_shape_names_the_sizes_it_runs():
    g = LatentGeometry(4, 8, latent_multiple=2, size_range=(32, 128, 16), default_size=64, source="these engines")
    assert g.latent_shape(64, 96) == (4, 8, 12)
    with pytest.raises(InputError, match="positive multiple of 8"):
        g.latent_shape(60, 64)
    with pytest.raises(InputError, match="need multiples of 16 px"):
        g.latent_shape(72, 64)
    with pytest.raises(InputError, match="from 32 to 128 pixels in steps of 16"):
        g.latent_shape(160, 64)
    with pytest.raises(InputError, match="fixed size of 64x64 pixels"):
        LatentGeometry(4, 8, fixed=(8, 8)).latent_shape(48, 48)


def test_components_check_what_they_are_fed(device_pipeline):
    engines = device_pipeline.engines
    unet = engines.unet
    with pytest.raises(InputError, match="sample has shape"):
        unet(np.zeros((2, 3, 8, 8), np.float32), 500.0, np.zeros((2, 77, 64), np.float32))
    with pytest.raises(InputError, match="encoder_hidden_states has shape"):
        unet(np.zeros((2, 4, 8, 8), np.float32), 500.0, np.zeros((1, 77, 64), np.float32))
    with pytest.raises(InputError, match="takes"):
        unet(np.zeros((2, 4, 8, 8), np.float32), 500.0, np.zeros((2, 77, 64), np.float32),
             text_embeds=np.zeros((2, 64), np.float32))
    outs = engines.text_encoder(engines.tokenizer(["a red circle"]), ("last_hidden_state", "pooler_output"))
    assert outs["last_hidden_state"].shape[:2] == (1, 77) and outs["pooler_output"].shape[0] == 1
    image = engines.vae_decoder(np.zeros((1, 4, 8, 8), np.float32))
    f = engines.manifest.vae_scale_factor
    assert image.dtype == np.uint8 and image.shape == (1, 8 * f, 8 * f, 3)


def test_one_options_object(engines_dir):
    config = SessionConfig(threads=1, optimization="basic", memory_arena=False, prepacking=False)
    session = open_session(engines_dir / "vae_decoder" / "model.onnx", config)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and not options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(InputError, match="optimization"):
        SessionConfig(optimization="max")
    with pytest.raises(ArtifactError, match="not found"):
        open_session(engines_dir / "missing.onnx")


def test_one_shared_arena_for_every_session_that_asks(engines_dir):
    """SessionConfig(shared_arena=True): sessions allocate from the process's one registered arena
    (onnxruntime's environment allocator) and give the same results as without it."""
    feed = {"latent_sample": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    path = engines_dir / "vae_decoder" / "model.onnx"
    plain = open_session(path, SessionConfig(memory_arena=False)).run(None, feed)[0]
    shared = [open_session(path, SessionConfig(shared_arena=True)) for _ in range(2)]
    for session in shared:
        assert session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
        np.testing.assert_array_equal(session.run(None, feed)[0], plain)
    with pytest.raises(InputError, match="shared_arena"):
        SessionConfig(shared_arena=True, memory_arena=False)
