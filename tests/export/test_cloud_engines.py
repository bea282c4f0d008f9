"""Cloud engines: the step modes exported to ONNX and served by onnxruntime without torch
(export/cloud_engines.py, cloud/engine_backend.py), and the verified manifest (runtime/manifest.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from obclip.cloud.modes import ModeSpec, mode_spec, plan_specs
from obclip.runtime.errors import InputError
from obclip.runtime.manifest import (
    Manifest,
    ManifestError,
    ManifestFormatError,
    ManifestHashError,
    ManifestMismatchError,
    ManifestPathError,
)
from obclip.runtime.plan import AccelerationConfig, StepMode, preset
from obclip.runtime.protocol import RequestLimits, StepsRequest

from helpers import BENCHMARKS

EXTRAS = preset("paper-k5").replace(cross_kv_once=True, merge_step0_uncond=True)
CONFIGS = {"none-k5": None, "paper-k5": preset("paper-k5"), "paper-k5+extras": EXTRAS,
           "deepcache": preset("paper-k5").replace(skip_variant="deepcache"),
           # step 4 is a refresh in reuse mode (modes R R R X R)
           "refresh-reuse": preset("paper-k5").replace(refresh_every=1, refresh_mode="reuse"),
           # frozen guidance on every cached step (R R C X X: the C step writes the skip cache from
           # its conditional rows), and on DeepCache's skip steps
           "frozen-cached": AccelerationConfig(5, 2, 3, frozen_guidance="cached"),
           "frozen-skip-deepcache": preset("paper-k5").replace(skip_variant="deepcache", frozen_guidance="skip"),
           # step 0 on the pivot only, step 1 merged (P R C X X)
           "pivot-merged": AccelerationConfig(5, 2, 3, pivot_only_steps=1, merge_step0_uncond=True,
                                              frozen_guidance="cached"),
           "deepcache-shallow": preset("paper-k5").replace(skip_variant="deepcache-shallow"),
           # the lean-k10 preset's switches at k = 5 (P X C F F: pivot-only step 0, merged full step 1,
           # frozen-guidance cache step, DeepCache skips with frozen guidance, no batch reuse)
           "lean": preset("lean-k10").replace(switch_step=5, cache_step=2, skip_step=3)}


def _specs() -> list[ModeSpec]:
    out: list[ModeSpec] = []
    for c in CONFIGS.values():
        for s in plan_specs(c, 5):
            if s not in out:
                out.append(s)
    return out


@pytest.fixture(scope="session")
def cloud_engines(model_dirs, tmp_path_factory):
    """The mini cloud model's engines for none-k5, paper-k5 and paper-k5 with the exact extras."""
    from obclip.export.cloud_engines import build_cloud_engines

    out = tmp_path_factory.mktemp("cloud-engines")
    build_cloud_engines(str(model_dirs[0]), out, modes=_specs())
    return out / "cloud"


@pytest.fixture(scope="session")
def ort_runner(cloud_engines):
    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.steps import CloudStepRunner

    return CloudStepRunner(engine=OrtEngine(cloud_engines))


def _request(acceleration, seed=7, candidates=("a photo of an old man", "a photo of a middle-aged man",
                                                "a photo of a young man")):
    return StepsRequest(candidates, seed, 10, 5, 7.5, 64, 64, acceleration=acceleration)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(1.0, float(np.abs(b).max())))


# --- the specs ------------------------------------------------------------------------------


def test_each_step_of_a_preset_has_one_spec_named_for_its_graph():
    names = [s.name for s in plan_specs(preset("paper-k10"), 10)]
    assert names == ["reuse.wa.ws.fd", "cache.ws.fd", "cache-skip.fd"]
    assert [s.name for s in plan_specs(EXTRAS, 5)] == ["reuse.wa.ws.fd.kv.m", "reuse.wa.ws.fd.kv", "cache-skip.fd"]
    assert plan_specs(None, 5) == [ModeSpec(StepMode.FULL)] == plan_specs(AccelerationConfig.none(5), 5)
    # a step whose attention is all cached projects no text: cross_kv_once does not change its graph
    assert mode_spec(EXTRAS, 4) == mode_spec(preset("paper-k5"), 4)
    assert [s.name for s in plan_specs(CONFIGS["frozen-cached"], 5)] == ["reuse.wa.ws.fd.wr", "cache.ws.fd.fg",
                                                                         "cache-skip.fd.fg"]


# --- onnxruntime vs torch -------------------------------------------------------------------


def test_manifest_lists_every_mode_with_what_it_reads_and_writes(cloud_engines):
    m = Manifest.load(cloud_engines)
    assert m.side == "cloud" and set(m.modes) == {s.name for s in _specs()}
    skip = m.modes["cache-skip.fd"]
    assert "skip/mid" in skip["reads"] and not skip["writes"]
    assert any(r.startswith("attn/up_blocks") for r in skip["reads"])
    assert not any(r.startswith("attn/down_blocks") for r in skip["reads"])   # the encoder does not run
    assert all(info["check_rel_diff"] <= 1e-4 for info in m.modes.values())
    # one weights file for every mode graph, each graph small
    weights = (cloud_engines / "unet" / "weights.bin").stat().st_size
    assert all((cloud_engines / m.components[info["component"]].path).stat().st_size < weights / 2
               for info in m.modes.values())


def test_a_rerun_with_more_modes_traces_only_the_new_ones_and_stores_each_weight_once(model_dirs, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from obclip.export.cloud_engines import build_cloud_engines

    specs = _specs()[:3]
    build_cloud_engines(str(model_dirs[0]), tmp_path, modes=specs[:2])
    capsys.readouterr()
    build_cloud_engines(str(model_dirs[0]), tmp_path, modes=specs)
    out = capsys.readouterr().out
    assert out.count("up to date, reused") == 2 and out.count("traced in") == 1, out
    folder = tmp_path / "cloud"
    assert set(Manifest.load(folder).modes) == {s.name for s in specs}
    assert not (folder / ".raw").exists() and [p.name for p in tmp_path.iterdir()] == ["cloud"]
    # Three graphs over one weights file: its payload is at most the UNet's parameters, not three copies.
    index = json.loads((folder / "unet" / "weights.json").read_text())
    payload = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for _, dtype, shape in index.values())
    size = (folder / "unet" / "weights.bin").stat().st_size
    assert payload <= size < payload + 4096 * len(index)
    unet = UNet2DConditionModel.from_pretrained(Path(model_dirs[0]) / "unet")
    assert payload <= sum(p.numel() * 4 for p in unet.parameters())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_onnxruntime_backend_matches_torch(cloud_runner, ort_runner, name):
    """The whole cloud run (text encoder, every step mode, the numpy solver) against torch + diffusers."""
    request = _request(CONFIGS[name])
    want, got = cloud_runner.run(request), ort_runner.run(request)
    assert (got.lower_order_nums, got.step_index, got.timesteps) == (want.lower_order_nums, want.step_index,
                                                                     want.timesteps)
    assert _rel(got.latents, want.latents) <= 1e-4 and _rel(got.prev_x0, want.prev_x0) <= 1e-4


@pytest.mark.parametrize("acceleration", [None, preset("paper-lcm-k4")], ids=["none-k4", "paper-lcm-k4"])
def test_onnxruntime_lcm_matches_torch(cloud_runner, ort_runner, acceleration):
    """LCM on the cloud: the numpy solver in both backends, the step noise from the request's seed."""
    request = StepsRequest(("a photo of an old man", "a photo of a young man"), 7, 8, 4, 7.5, 64, 64,
                           acceleration=acceleration, solver="lcm")
    want, got = cloud_runner.run(request), ort_runner.run(request)
    assert (got.lower_order_nums, got.step_index, got.timesteps) == (0, 4, (999, 879, 759, 639, 499, 379, 259, 139))
    assert want.timesteps == got.timesteps and want.lower_order_nums == 0
    assert _rel(got.latents, want.latents) <= 1e-4 and _rel(got.prev_x0, want.prev_x0) <= 1e-4


def test_onnxruntime_batch_equals_each_request_alone(ort_runner):
    requests = [_request(EXTRAS, seed=3), _request(EXTRAS, seed=5, candidates=("a red square", "a blue circle"))]
    alone = [ort_runner.run(r) for r in requests]
    for a, b in zip(ort_runner.run_batch(requests), alone):
        assert _rel(a.latents, b.latents) <= 1e-6


@pytest.mark.parametrize("name", ["none-k5", "paper-k5+extras", "frozen-cached"])
def test_onnxruntime_negative_prompt_matches_torch(cloud_runner, ort_runner, name):
    """The negative prompt is the text of the unconditional rows in the graphs as in torch; a batch of
    requests with different negative prompts gives each what it gets alone."""
    base = _request(CONFIGS[name])
    request = StepsRequest(base.candidates, base.seed, 10, 5, 7.5, 64, 64, acceleration=CONFIGS[name],
                           negative_prompt="blurry, low quality")
    want, got = cloud_runner.run(request), ort_runner.run(request)
    assert _rel(got.latents, want.latents) <= 1e-4 and _rel(got.prev_x0, want.prev_x0) <= 1e-4
    assert _rel(ort_runner.run(base).latents, got.latents) > 1e-3   # it changes the result
    for a, b in zip(ort_runner.run_batch([request, base]), [got, ort_runner.run(base)]):
        assert _rel(a.latents, b.latents) <= 1e-6


def test_a_mode_without_a_graph_is_a_clear_error(ort_runner):
    with pytest.raises(ManifestError, match="no graph for step mode 'reuse.wa'"):
        ort_runner.run(_request(AccelerationConfig(5, 2, 3, block_skip=False)))


def test_onnxruntime_serving_needs_no_torch(cloud_engines):
    """The service on the onnxruntime backend, in a process where importing torch fails."""
    script = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "diffusers", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from obclip.cloud.service import Service, ServiceConfig
        from obclip.runtime.protocol import StepsRequest, decode_handoff
        service = Service(ServiceConfig(backend="onnxruntime", engines={str(cloud_engines)!r}))
        service.start().result()
        assert service.state == "ready", service.load_error
        request = StepsRequest(("a photo of a cat", "a photo of a dog"), 1, 10, 5, 7.5, 64, 64)
        handoff = decode_handoff(service.runner.handle(request.to_bytes()), request, (4, 16, 16))
        assert not any(m.split(".")[0] in ("torch", "diffusers", "transformers") for m in sys.modules)
        print("OK", handoff.latents.shape)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK (2, 4, 16, 16)" in out.stdout


def test_warm_up_calls_every_graph_once_and_changes_no_output(cloud_engines):
    """OrtEngine.warm: the text encoder, cross_kv and every step-mode graph run once on dummy inputs
    (each mode's caches from the modes warmed before it); a request afterwards is bit for bit the
    one a cold engine computes."""
    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.steps import CloudStepRunner

    request = _request(EXTRAS)
    cold = CloudStepRunner(engine=OrtEngine(cloud_engines)).run(request)
    engine = OrtEngine(cloud_engines)
    assert engine.warmed == {}
    warmed = engine.warm(2, 64, 64)
    assert set(warmed) == set(engine._graphs) | {"text_encoder", "unet/cross_kv"}
    assert warmed is engine.warmed and all(s > 0 for s in warmed.values())
    after = CloudStepRunner(engine=engine).run(request)
    np.testing.assert_array_equal(after.latents, cold.latents)
    np.testing.assert_array_equal(after.prev_x0, cold.prev_x0)


@pytest.mark.parametrize("memory", ["shared", "shared+prepack", "arena", "arena+shrink", "shared+shrink",
                                    "shared+no-pattern"])
def test_every_memory_mode_computes_what_no_arena_computes(cloud_engines, ort_runner, memory):
    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.steps import CloudStepRunner

    engine = OrtEngine(cloud_engines, memory=memory)
    sessions = [g.session for g in engine._graphs.values()]
    assert all(s.get_session_options().enable_cpu_mem_arena for s in sessions)
    request = _request(EXTRAS)
    want = CloudStepRunner(engine=OrtEngine(cloud_engines, memory="none")).run(request)
    got = CloudStepRunner(engine=engine).run(request)
    assert _rel(got.latents, want.latents) <= 1e-6 and _rel(got.prev_x0, want.prev_x0) <= 1e-6
    with pytest.raises(InputError, match="memory='pooled' must be one of"):
        OrtEngine(cloud_engines, memory="pooled")


@pytest.mark.parametrize("warm_graphs", [True, False])
def test_the_service_warms_every_graph_before_it_is_ready(cloud_engines, warm_graphs, caplog):
    """No session's first run is left to a request: by ready, every graph has its warm-up record
    (and with warm_graphs=False none has)."""
    from obclip.cloud.service import Service, ServiceConfig

    service = Service(ServiceConfig(backend="onnxruntime", engines=str(cloud_engines), warm_graphs=warm_graphs,
                                    warmup=False, warm_candidates=3))
    with caplog.at_level("INFO", logger="obclip"):
        service.start().result()
    try:
        assert service.state == "ready", service.load_error
        engine = service.model
        if warm_graphs:
            assert set(engine.warmed) == set(engine._graphs) | {"text_encoder", "unet/cross_kv"}
            assert any("warmed" in r.getMessage() and "N=3" in r.getMessage() for r in caplog.records)
        else:
            assert engine.warmed == {}
    finally:
        service.close()


# --- verified engine files ------------------------------------------------------------------


@pytest.fixture
def engines_copy(cloud_engines, tmp_path):
    dst = tmp_path / "cloud"
    shutil.copytree(cloud_engines, dst)
    return dst


def _edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    d = json.loads(path.read_text())
    d = change(d)
    path.write_text(json.dumps(d))


def _open(folder: Path):
    from obclip.cloud.engine_backend import OrtEngine

    return OrtEngine(folder)


def test_a_tampered_graph_is_refused_before_any_inference(engines_copy):
    graph = engines_copy / "unet" / "cache-skip.fd.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(ManifestHashError, match=r"cache-skip\.fd\.onnx .*changed after the export; rerun export"):
        _open(engines_copy)
    (engines_copy / "unet" / "weights.bin").write_bytes(b"\0" * 8)   # the shared weights are hashed too
    with pytest.raises(ManifestHashError):
        Manifest.load(engines_copy)


def test_paths_that_leave_the_engines_folder_are_refused(engines_copy, tmp_path):
    def escape(d):
        d["components"]["text_encoder"]["path"] = "../outside.onnx"
        return d
    (tmp_path / "outside.onnx").write_bytes(b"x")
    _edit_manifest(engines_copy, escape)
    with pytest.raises(ManifestPathError, match="leaves the engines folder"):
        _open(engines_copy)


def test_external_data_paths_inside_an_onnx_file_are_confined(engines_copy):
    import onnx

    from obclip.runtime.manifest import sha256_file

    path = engines_copy / "unet" / "cache-skip.fd.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../../secret.bin"
    onnx.save(model, str(path))
    digest = sha256_file(path)   # an attacker who rewrites the manifest too: the hash matches

    def rehash(d):
        d["components"]["unet/cache-skip.fd"]["sha256"] = digest
        return d
    _edit_manifest(engines_copy, rehash)
    with pytest.raises(ManifestPathError, match="external data path '../../secret.bin' leaves"):
        _open(engines_copy)


@pytest.mark.parametrize("change, message", [
    (lambda d: None, "must be a JSON object"),
    (lambda d: {**d, "vae_scale_factor": 0}, "vae_scale_factor must be an integer"),
    (lambda d: {**d, "text_max_length": 10**9}, "text_max_length must be an integer"),
    (lambda d: {**d, "side": "both"}, "side must be one of"),
    (lambda d: {**d, "pad_token_id": True}, "pad_token_id must be an integer"),
    (lambda d: {**d, "surprise": 1}, "unknown fields"),
])
def test_a_malformed_manifest_is_a_named_error(engines_copy, change, message):
    _edit_manifest(engines_copy, change)
    with pytest.raises(ManifestFormatError, match=message):
        _open(engines_copy)


def test_an_older_export_version_is_refused_not_rebuilt(engines_copy):
    def old(d):
        d["source"]["export_version"] = 0
        return d
    _edit_manifest(engines_copy, old)
    with pytest.raises(ManifestMismatchError, match="export version 0"):
        _open(engines_copy)
    assert json.loads((engines_copy / "manifest.json").read_text())["source"]["export_version"] == 0


_json = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=True)
                     | st.text(max_size=8), lambda kids: st.lists(kids, max_size=3)
                     | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["side", "model_id", "components", "tokenizer", "text_max_length", "pad_token_id",
                            "latent_channels", "vae_scale_factor", "vae_scaling_factor", "default_image_size",
                            "scheduler_config", "schema", "modes", "files", "source", "format"]),
       value=_json)
def test_fuzzed_manifest_fields_load_or_fail_with_a_manifest_error(engines_dir, tmp_path_factory, key, value):
    folder = tmp_path_factory.mktemp("fuzz")
    d = json.loads((engines_dir / "manifest.json").read_text())
    d[key] = value
    (folder / "manifest.json").write_text(json.dumps(d))
    for rel in (d.get("tokenizer"),):
        if isinstance(rel, str) and (engines_dir / rel).is_file():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(engines_dir / rel, folder / rel)
    try:
        Manifest.load(folder, verify=False)
    except ManifestError:
        pass


# --- TensorRT: what needs neither the library nor a GPU ---------------------------------------


def test_tensorrt_profiles_span_what_the_service_admits(cloud_engines, cloud_model):
    """Profile shapes from the service limits equal the shapes the torch definition really produces."""
    import torch

    from obclip.cloud.step_modes import ModeInputs, run_mode
    from obclip.export.tensorrt import ProfileRange, profile_shapes
    from obclip.runtime.plan import SkipVariant

    m = Manifest.load(cloud_engines)
    rng = ProfileRange.from_limits(RequestLimits(max_candidates=6, max_image_size=128), m)
    mult = m.source["latent_multiple"]
    assert rng.n == (1, 4, 6) and rng.latent == (mult, 64 // m.vae_scale_factor, 128 // m.vae_scale_factor)
    shapes = profile_shapes(m, "cache-skip.fd", rng)
    assert shapes["sample"][2] == (6, 4, 32, 32) and shapes["text"][0] == (2, 77, 64)
    writer = ModeSpec(StepMode.FULL, SkipVariant.FASTER_DIFFUSION, write_attention=True, write_skip=True)
    for which, (n, side) in enumerate(zip(rng.n, rng.latent)):
        with torch.no_grad():
            _, caches = run_mode(cloud_model.unet, writer, ModeInputs(
                x=torch.randn(n, 4, side, side), timestep=torch.tensor([500]), text=torch.randn(n + 1, 77, 64),
                guidance_scale=7.5), {})
        for name in m.modes["cache-skip.fd"]["reads"]:
            assert shapes[name][which] == tuple(caches[name].shape), name


def test_tensorrt_engine_key_covers_graph_version_gpu_precision_and_profile():
    from obclip.export.tensorrt import engine_key, engine_path

    shapes = {"sample": ((1, 4, 8, 8), (4, 4, 64, 64), (6, 4, 128, 128))}
    base = engine_key("a" * 64, "10.3.0", "NVIDIA H100", "fp32", shapes)
    changed = [engine_key("b" * 64, "10.3.0", "NVIDIA H100", "fp32", shapes),
               engine_key("a" * 64, "10.4.0", "NVIDIA H100", "fp32", shapes),
               engine_key("a" * 64, "10.3.0", "NVIDIA A100", "fp32", shapes),
               engine_key("a" * 64, "10.3.0", "NVIDIA H100", "fp16", shapes),
               engine_key("a" * 64, "10.3.0", "NVIDIA H100", "fp32", {"sample": (*shapes["sample"][:2],
                                                                                  (8, 4, 128, 128))})]
    assert len({base, *changed}) == 6 and base == engine_key("a" * 64, "10.3.0", "NVIDIA H100", "fp32", shapes)
    assert engine_path(Path("/e"), "full", base) == Path(f"/e/tensorrt/full.{base[:16]}.plan")


def test_tensorrt_missing_is_one_clear_line(cloud_engines):
    from obclip.export.tensorrt import TensorRTUnavailable, build_cloud_tensorrt, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable as e:
        assert "\n" not in str(e) and ("TensorRT" in str(e) or "GPU" in str(e))
        with pytest.raises(TensorRTUnavailable):
            build_cloud_tensorrt(cloud_engines)
        return
    pytest.skip("TensorRT is installed here: test_tensorrt_builds_engines_and_a_timing_cache runs instead")


@pytest.mark.gpu
def test_tensorrt_builds_engines_and_a_timing_cache(cloud_engines):
    from obclip.export.tensorrt import TensorRTUnavailable, build_cloud_tensorrt, require_tensorrt

    try:
        require_tensorrt()
    except TensorRTUnavailable as e:
        pytest.skip(f"TensorRT cannot be used here: {e}")
    build_cloud_tensorrt(cloud_engines, RequestLimits(max_candidates=4, max_image_size=128))
    assert (cloud_engines / "tensorrt" / "timing.cache").is_file()


def test_mode_sessions_keep_no_arena_of_their_own(cloud_engines):
    """A CPU arena per mode session would keep each mode's largest activations for good (memory
    growing with every mode a server has run); the engine's sessions allocate without one."""
    from obclip.cloud.engine_backend import OrtEngine

    engine = OrtEngine(cloud_engines)
    sessions = [g.session for g in engine._graphs.values()] + [engine.text_encoder.session, engine._cross_kv]
    # the default: no arena of their own (none, or the process's one shared arena)
    assert all(not s.get_session_options().enable_cpu_mem_arena
               or s.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
               for s in sessions if s is not None)
    assert OrtEngine(cloud_engines, memory="arena").text_encoder.session.get_session_options().enable_cpu_mem_arena


def test_engine_memory_benchmark_serves_without_torch_and_reports_memory(cloud_engines):
    bench = BENCHMARKS / "engine_memory.py"
    out = subprocess.run([sys.executable, str(bench), "--engines", str(cloud_engines), "--n", "2", "--size", "64",
                          "--presets", "paper-k5,paper-k5+extras"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch imported by the onnxruntime backend: no" in out.stdout
    loaded = next(line for line in out.stdout.splitlines() if line.startswith("loaded:"))
    rss, file_mb, anon, peak = (float(v) for v in loaded.split()[-4:])
    assert rss > 0 and peak >= rss and abs(rss - file_mb - anon) <= 2
    assert "after paper-k5+extras" in out.stdout
