"""fp16 and int8 device engines: built from the fp32 folder, checked, run by the same pipeline."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest

from obclip.runtime.errors import ArtifactError
from obclip.runtime.manifest import Manifest

SMALL = dict(prompts=("a red circle",), calibration_prompts=("a blue square",), seeds=(0,), steps=3)


@pytest.fixture(scope="module")
def variants(engines_dir, tmp_path_factory):
    from obclip.export.device_variants import VariantCheck, build_device_variants

    out = tmp_path_factory.mktemp("variants")
    shutil.copytree(engines_dir, out / "device")
    built = build_device_variants(out / "device", ["fp16", "int8", "int8-qdq"], out, VariantCheck(**SMALL))
    return out, built


def test_each_variant_is_a_self_contained_folder(variants):
    out, built = variants
    assert sorted(p.name for p in out.iterdir()) == ["device", "device-fp16", "device-int8", "device-int8-qdq"]
    fp32 = Manifest.load(out / "device")
    for precision, m in built.items():
        assert m.root == out / f"device-{precision}" and m.precision == precision
        assert m.image_size == fp32.image_size
        check = m.variant_check
        assert check["enforced"] is False  # random weights: recorded only
        assert np.isfinite(check["final_latent_max_abs_diff"])
        assert set(check["component_max_abs_diff"]) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
        assert check["passed"] is True
        # every file the app ships is inside the folder and hashed
        listed = {m.tokenizer, *(c.path for c in m.components.values()), *m.files}
        on_disk = {str(f.relative_to(m.root)) for f in m.root.rglob("*") if f.is_file()} - {"manifest.json"}
        assert on_disk == listed
    assert built["int8"].variant_check["quantised_ops"]["unet"]


def test_variants_are_smaller(variants):
    out, _ = variants

    def size(name: str) -> int:
        return sum(f.stat().st_size for f in (out / name / "unet").rglob("*"))

    assert size("device-fp16") < 0.6 * size("device")
    assert size("device-int8") < size("device")  # int8 MatMul/Gemm weights; convs stay float32
    assert size("device-int8-qdq") < 0.6 * size("device")


def test_int8_unet_holds_quantised_ops(variants):
    import onnx

    out, _ = variants

    def ops(folder: str) -> set[str]:
        return {n.op_type for n in onnx.load(str(out / folder / "unet" / "model.onnx")).graph.node}

    int8 = ops("device-int8")
    assert "Conv" in int8 and not int8 & {"QLinearConv", "ConvInteger", "QuantizeLinear"}  # convs stay float32
    assert int8 & {"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"}  # dynamic MatMul
    fp16 = onnx.load(str(out / "device-fp16" / "unet" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)


def test_the_qdq_variant_holds_only_quantize_dequantize_pairs(variants):
    """What TensorRT's parser and NPU delegates take: Q/DQ around float ops, symmetric int8 (zero points
    0), no integer-arithmetic ops (as saved: onnxruntime fuses Q/DQ at session start, not in the file)."""
    import onnx
    from onnx import numpy_helper

    out, _ = variants
    graph = onnx.load(str(out / "device-int8-qdq" / "unet" / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "MatMul"} <= ops
    assert not ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "QLinearConv",
                      "QLinearMatMul", "ConvInteger"}
    weights = {t.name: t for t in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    zero_points = [numpy_helper.to_array(weights[n.input[2]]) for n in qdq
                   if len(n.input) > 2 and n.input[2] in weights]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


def test_a_variant_below_its_floor_is_written_only_on_request_and_opened_only_on_request(engines_dir, tmp_path,
                                                                                        monkeypatch):
    import obclip.export.device_variants as dv
    from obclip.device.engines import DeviceEngines, EngineConfig

    shutil.copytree(engines_dir, tmp_path / "device")
    monkeypatch.setitem(dv.PSNR_FLOOR, "int8-qdq", 1000.0)
    check = dv.VariantCheck(**SMALL, enforce=True)
    with pytest.raises(ArtifactError, match="--allow-below-floor"):
        dv.build_device_variant(tmp_path / "device", "int8-qdq", tmp_path, check)
    m = dv.build_device_variant(tmp_path / "device", "int8-qdq", tmp_path, replace(check, allow_below_floor=True))
    assert m.variant_check["passed"] is False and m.variant_check["image_psnr_min_db"] < 1000.0
    with pytest.raises(ArtifactError, match="failed their export check"):
        DeviceEngines(EngineConfig(engines_dir=str(m.root)))
    assert DeviceEngines(EngineConfig(engines_dir=str(m.root), allow_below_floor=True)).manifest.precision == "int8-qdq"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_the_same_pipeline_runs_every_variant(variants, precision):
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline, GenerationConfig, Method

    out, _ = variants
    pipe = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(out / f"device-{precision}"))))
    config = GenerationConfig(method=Method.DEVICE_ONLY, num_inference_steps=3, seed=0, height=80, width=48)
    result = pipe.generate("a red circle", None, config)
    assert result.image.shape == (80, 48, 3) and np.isfinite(result.latent).all()


def test_a_trained_model_below_the_floor_is_refused(engines_dir, tmp_path, monkeypatch):
    import obclip.export.device_variants as dv

    shutil.copytree(engines_dir, tmp_path / "device")
    monkeypatch.setitem(dv.PSNR_FLOOR, "fp16", 1000.0)
    with pytest.raises(ArtifactError, match=r"fp16 device engines reach only .* worst check prompt .*floor 1000.0 dB"):
        dv.build_device_variant(tmp_path / "device", "fp16", tmp_path, dv.VariantCheck(**SMALL, enforce=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["device"]  # nothing half-written


def test_large_graphs_keep_weights_in_external_data(engines_dir, tmp_path, monkeypatch):
    import obclip.export.device_variants as dv

    shutil.copytree(engines_dir, tmp_path / "device")
    monkeypatch.setattr(dv, "EXTERNAL_DATA_ABOVE", 1 << 20)  # the mini UNet (~5 MB) counts as large here
    m = dv.build_device_variant(tmp_path / "device", "fp16", tmp_path, dv.VariantCheck(**SMALL))
    assert "unet/model.onnx.data" in m.files and "text_encoder/model.onnx.data" in m.files
    unet = tmp_path / "device-fp16" / "unet"
    assert (unet / "model.onnx").stat().st_size < (unet / "model.onnx.data").stat().st_size
    from obclip.device.engines import DeviceEngines, EngineConfig

    engines = DeviceEngines(EngineConfig(engines_dir=str(m.root)))
    out = engines.unet(np.zeros((2, 4, 16, 16), np.float32), 500.0, np.zeros((2, 77, 64), np.float32))
    assert out.shape == (2, 4, 16, 16)


def test_precision_flag():
    from obclip.export.device_variants import parse_precisions

    assert parse_precisions("fp16,int8") == ["fp32", "fp16", "int8"]
    assert parse_precisions("int8-qdq,fp16") == ["fp32", "fp16", "int8-qdq"]
    assert parse_precisions("int8") == ["fp32", "int8"]
    with pytest.raises(ValueError, match="fp32, fp16, int8, int8-qdq"):
        parse_precisions("fp8")


def test_providers_are_configuration(engines_dir):
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.runtime.sessions import resolve_providers

    assert resolve_providers(("cpu",)) == ("CPUExecutionProvider",)
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers("cuda", gpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert resolve_providers("tensorrt", gpu) == tuple(gpu)  # what TensorRT cannot take runs on CUDA, then CPU
    assert resolve_providers("coreml,cpu", ["CoreMLExecutionProvider", "CPUExecutionProvider"]) == \
        ("CoreMLExecutionProvider", "CPUExecutionProvider")
    assert resolve_providers("auto", ["CoreMLExecutionProvider", "CPUExecutionProvider"]) == \
        ("CoreMLExecutionProvider", "CPUExecutionProvider")
    assert resolve_providers(("coreml",), ["CoreMLExecutionProvider", "CPUExecutionProvider"]) == \
        ("CoreMLExecutionProvider", "CPUExecutionProvider")  # CPU appended: the fallback for other nodes
    with pytest.raises(ValueError, match="not available in this onnxruntime build"):
        resolve_providers(("nnapi",), ["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="threads"):
        EngineConfig(threads=0)
    engines = DeviceEngines(EngineConfig(engines_dir=str(engines_dir), providers="auto", threads=1))
    assert engines.providers[-1] == "CPUExecutionProvider"


def test_the_export_check_runs_the_pipelines_trajectory(engines_dir, device_pipeline):
    from obclip.device.pipeline import GenerationConfig, Method
    from obclip.export.device_variants import VariantCheck, device_only_run
    from obclip.runtime.graphs import DeviceGraphs

    check = VariantCheck(steps=3)
    feeds = []
    latent, image = device_only_run(DeviceGraphs(engines_dir), "a red circle", 5, check, feeds)
    assert len(feeds) == 3 and set(feeds[0]) == {"sample", "timestep", "encoder_hidden_states"}
    result = device_pipeline.generate("a red circle", None, GenerationConfig(
        method=Method.DEVICE_ONLY, num_inference_steps=3, seed=5, guidance_scale=check.guidance_scale))
    np.testing.assert_array_equal(latent, result.latent)
    np.testing.assert_array_equal(image, result.image)


def test_generate_takes_providers_threads_and_a_variant_folder(variants, tmp_path, capsys):
    from PIL import Image

    from obclip.device.generate import main

    out, _ = variants
    png = tmp_path / "x.png"
    assert main(["a red circle", "--method", "device-only", "--engines", str(out / "device-int8"), "--steps", "2",
                 "--size", "48", "--seed", "0", "--providers", "cpu", "--threads", "1", "--out", str(png)]) == 0
    assert Image.open(png).size == (48, 48)
    assert main(["a red circle", "--method", "device-only", "--engines", str(out / "device-fp16"),
                 "--providers", "nnapi", "--out", str(png)]) == 2
    assert "not available in this onnxruntime build" in capsys.readouterr().err
