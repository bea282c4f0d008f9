"""Cloud fp16 engines (export/cloud_fp16.py): OUT/cloud-fp16 converted from the checked fp32 folder,
checked against it graph by graph and end to end, and served by the onnxruntime backend."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from obclip.cloud.modes import ModeSpec, plan_specs
from obclip.runtime.errors import ArtifactError
from obclip.runtime.manifest import Manifest, ManifestHashError, ManifestMissingError
from obclip.runtime.plan import preset
from obclip.runtime.protocol import StepsRequest

PRESETS = ("none-k5", "paper-k5")   # full; reuse.wa.ws.fd and cache-skip.fd


def _specs() -> list[ModeSpec]:
    out: list[ModeSpec] = []
    for name in PRESETS:
        for s in plan_specs(preset(name), 5):
            if s not in out:
                out.append(s)
    return out


@pytest.fixture(scope="module")
def check():
    from obclip.export.cloud_fp16 import CloudFp16Check

    return CloudFp16Check(prompts=("a red circle", "a large blue square"), presets=PRESETS, steps=8)


@pytest.fixture(scope="module")
def folders(model_dirs, tmp_path_factory, check):
    """(OUT/cloud, OUT/cloud-fp16) of the random mini cloud model, three step modes."""
    from obclip.export.cloud_engines import build_cloud_engines
    from obclip.export.cloud_fp16 import build_cloud_fp16

    out = tmp_path_factory.mktemp("cloud-fp16")
    build_cloud_engines(str(model_dirs[0]), out, modes=_specs())
    build_cloud_fp16(out / "cloud", out, check)
    return out / "cloud", out / "cloud-fp16"


def test_the_fp16_folder_is_complete_with_one_shared_fp16_weights_file(folders):
    import onnx

    fp32, fp16 = folders
    a, b = Manifest.load(fp32), Manifest.load(fp16)   # every hash verified
    assert b.side == "cloud" and b.precision == "fp16" and b.source["precision"] == "fp16"
    assert a.precision == "fp32" and b.source["fp16"]["fp32_manifest_sha256"]
    assert {n: {k: v for k, v in i.items() if k != "check_rel_diff"} for n, i in b.modes.items()} == \
        {n: {k: v for k, v in i.items() if k != "check_rel_diff"} for n, i in a.modes.items()}
    assert set(b.components) == set(a.components) and set(b.modes) == {s.name for s in _specs()}
    # every file is hashed: a component, or listed in files (the tokenizer too)
    on_disk = {str(p.relative_to(fp16)) for p in fp16.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == {c.path for c in b.components.values()} | set(b.files)
    assert {"unet/weights.bin", "unet/weights.json", "tokenizer/tokenizer.json"} <= set(b.files)
    # one weights file, float16, about half the fp32 one, referenced by every mode graph
    index = json.loads((fp16 / "unet" / "weights.json").read_text())
    assert {dtype for _, dtype, _ in index.values()} == {"<f2"}
    size32, size16 = ((f / "unet" / "weights.bin").stat().st_size for f in folders)
    assert 0.4 * size32 < size16 < 0.6 * size32
    assert [p.name for p in fp16.rglob("*.bin")] == ["weights.bin"]
    for info in b.modes.values():
        model = onnx.load(str(b.path_of(info["component"])), load_external_data=False)
        locations = {e.value for i in model.graph.initializer for e in i.external_data if e.key == "location"}
        assert locations == {"weights.bin"}
        # inputs and outputs stay float32 (or int64): the service and the caches are unchanged
        assert {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)} <= {
            onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)


def test_the_range_sums_of_batch_reuse_stay_float32(folders):
    """softmax -> cast -> CumSum -> Pad -> Gather at starts/stops -> Sub, all float32 (no float16 cast between)."""
    import onnx

    _, fp16 = folders
    model = onnx.load(str(fp16 / "unet" / "reuse.wa.ws.fd.onnx"), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    cumsums = [n for n in model.graph.node if n.op_type == "CumSum"]
    assert cumsums
    for n in cumsums:
        feed = producer[n.input[0]]
        assert feed.op_type == "Cast" and feed.attribute[0].i == onnx.TensorProto.FLOAT
        assert producer[feed.input[0]].op_type == "Softmax"
        (pad,) = consumers[n.output[0]]
        assert pad.op_type == "Pad"
        gathers = consumers[pad.output[0]]
        assert {g.op_type for g in gathers} == {"Gather"} and len(gathers) == 2
        subs = {c.name: c for g in gathers for c in consumers[g.output[0]]}
        (sub,) = subs.values()
        assert sub.op_type == "Sub" and {producer[i].name for i in sub.input} == {g.name for g in gathers}


def test_the_check_is_recorded_and_within_tolerance(folders, check):
    from obclip.export.cloud_fp16 import CLOUD_FP16_KEEP_FP32

    _, fp16 = folders
    m = Manifest.load(fp16)
    vc = m.variant_check
    assert "CumSum" in vc["fp16_keep_fp32"] == list(CLOUD_FP16_KEEP_FP32)
    diffs = vc["graph_rel_diff"]
    assert set(diffs) == set(m.components)
    # really converted (not zero), within the per-graph tolerance
    assert all(0 < d <= check.graph_tolerance for d in diffs.values()), diffs
    assert all(m.modes[n]["check_rel_diff"] == diffs[i["component"]] for n, i in m.modes.items())
    for name in PRESETS:
        run = vc["runs"][name]
        assert run["cloud_steps"] == 5
        assert 0 < run["latent_mean_abs_diff"] <= run["latent_max_abs_diff"]
        assert 0 < run["latent_rel_diff"] <= check.latent_tolerance, run


def test_a_rerun_skips_an_up_to_date_fp16_folder(folders, check, capsys):
    from obclip.export.cloud_fp16 import build_cloud_fp16

    fp32, fp16 = folders
    before = (fp16 / "manifest.json").stat().st_mtime_ns
    build_cloud_fp16(fp32, fp32.parent, check)
    assert "up to date" in capsys.readouterr().out
    assert (fp16 / "manifest.json").stat().st_mtime_ns == before


def test_a_failed_check_leaves_nothing(folders, check, tmp_path):
    from obclip.export.cloud_fp16 import build_cloud_fp16

    fp32, _ = folders
    strict = replace(check, presets=(), graph_tolerance=0.0)
    with pytest.raises(ArtifactError, match="differ from fp32 by more than"):
        build_cloud_fp16(fp32, tmp_path, strict)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ManifestMissingError, match=f"build the engines first: .* --out {tmp_path}$"):
        Manifest.load(tmp_path / "cloud-fp16")


def test_a_tampered_fp16_folder_is_refused_at_start(folders, tmp_path):
    from obclip.cloud.engine_backend import OrtEngine

    copy = tmp_path / "cloud-fp16"
    shutil.copytree(folders[1], copy)
    weights = copy / "unet" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestHashError, match="weights.bin"):
        OrtEngine(copy)


def test_the_service_serves_cloud_fp16(folders, check):
    """obclip-serve --backend onnxruntime --engines OUT/cloud-fp16: the weights mapped once, float16,
    and a request answered close to the fp32 folder's answer."""
    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.serve import build_parser, checked_config
    from obclip.cloud.service import Service
    from obclip.cloud.steps import CloudStepRunner
    from obclip.runtime.protocol import decode_handoff

    fp32, fp16 = folders
    config = checked_config(build_parser().parse_args(["--backend", "onnxruntime", "--engines", str(fp16)]))
    service = Service(config)
    try:
        service.start().result()
        assert service.state == "ready", service.load_error
        engine = service.runner.engine
        assert engine.manifest.precision == "fp16" and engine._weights.path == fp16 / "unet" / "weights.bin"
        assert {v.data_type() for v in engine._weights.values.values()} == {"tensor(float16)"}
        request = StepsRequest(("a photo of a cat", "a photo of a dog"), 1, 10, 5, 7.5, 64, 64,
                               acceleration=preset("paper-k5"))
        got = decode_handoff(service.runner.handle(request.to_bytes()), request, (4, 16, 16))
    finally:
        service.close()
    want = CloudStepRunner(engine=OrtEngine(fp32)).run(request)
    rel = float(np.abs(got.latents - want.latents).max() / max(1.0, float(np.abs(want.latents).max())))
    assert 0 < rel <= check.latent_tolerance


def test_tensorrt_refuses_a_precision_the_folder_does_not_hold(folders):
    from obclip.export.tensorrt import build_cloud_tensorrt

    _, fp16 = folders
    with pytest.raises(ValueError, match="holds fp16 graphs, not fp32"):
        build_cloud_tensorrt(fp16, precision="fp32")


@pytest.mark.gpu
def test_tensorrt_takes_the_folders_precision(folders):
    from obclip.export.tensorrt import TensorRTUnavailable, build_cloud_tensorrt

    _, fp16 = folders
    try:
        build_cloud_tensorrt(fp16)
    except TensorRTUnavailable as e:
        pytest.skip(f"TensorRT cannot be used here: {e}")
    assert (fp16 / "tensorrt" / "engines.json").is_file()


def test_the_cloud_precision_flag_says_what_it_builds():
    import argparse

    from obclip.export.build_engines import add_cloud_arguments

    p = argparse.ArgumentParser()
    add_cloud_arguments(p)
    text = p.format_help()
    assert "OUT/cloud-fp16" in text and "not built" not in text
    assert p.parse_args(["--cloud-precision", "fp16"]).cloud_precision == "fp16"


def test_fp16_is_built_from_the_fp32_folder_only(folders, tmp_path):
    from obclip.export.cloud_fp16 import build_cloud_fp16

    with pytest.raises(ValueError, match="built from the fp32 cloud folder"):
        build_cloud_fp16(folders[1], tmp_path)
    assert not (tmp_path / "cloud-fp16").exists()


def test_the_cli_builds_cloud_fp16_from_cloud_and_hands_it_to_tensorrt(folders, model_dirs, tmp_path, monkeypatch,
                                                                       capsys):
    """build_engines.py --cloud-model M --out OUT --cloud-precision fp16 --tensorrt: OUT/cloud, then
    OUT/cloud-fp16 from it (default check), then TensorRT from OUT/cloud-fp16."""
    import obclip.export.cloud_engines as ce
    import obclip.export.tensorrt as trt
    from obclip.export.build_engines import main

    shutil.copytree(folders[0], tmp_path / "cloud")   # the fp32 export itself is test_cloud_engines' subject
    monkeypatch.setattr(ce, "build_cloud_engines", lambda model, out, **kw: Manifest.load(out / "cloud"))
    handed: list[Path] = []
    monkeypatch.setattr(trt, "build_cloud_tensorrt", lambda engines: handed.append(engines) or {})
    rc = main(["--cloud-model", str(model_dirs[0]), "--out", str(tmp_path), "--cloud-precision", "fp16",
               "--tensorrt"])
    out = capsys.readouterr().out
    assert rc == 0 and handed == [tmp_path / "cloud-fp16"]
    m = Manifest.load(tmp_path / "cloud-fp16")
    assert m.precision == "fp16" and m.variant_check["runs"]["none-k10"]["cloud_steps"] == 10
    assert "skipped" in m.variant_check["runs"]["paper-k10"]   # the folder has no cache.ws.fd graph
    assert "none-k10: 10 cloud steps" in out
