"""The torch backend with every step mode through torch.compile (cloud/torch_backend.py; obclip-serve --compile).

The tests compile with the "aot_eager" backend: dynamo's capture, the per-mode graph cache and the
copies out of each call are the code under test, and it compiles in seconds. Inductor (the default)
and CUDA graphs ("reduce-overhead" on CUDA) are timed by benchmarks/latency.py --backend torch-compiled.
"""

from __future__ import annotations

import numpy as np
import pytest

from obclip.runtime.plan import AccelerationConfig, preset
from obclip.runtime.protocol import StepsRequest

torch = pytest.importorskip("torch")


def _request(acceleration, seed=1, candidates=("a photo of an old man", "a photo of a young man")):
    return StepsRequest(candidates, seed, 10, acceleration.switch_step, 7.5, 64, 64, acceleration=acceleration)


@pytest.fixture(scope="module")
def compiled_runner(cloud_model):
    from obclip.cloud.steps import CloudStepRunner
    from obclip.cloud.torch_backend import TorchEngine

    return CloudStepRunner(engine=TorchEngine(cloud_model, compile_mode="reduce-overhead", compile_backend="aot_eager"))


@pytest.mark.slow
def test_compiled_modes_give_the_eager_handoff_and_compile_once_per_mode_and_shape(cloud_runner, compiled_runner):
    from torch._dynamo.utils import counters

    configs = [AccelerationConfig.none(5), preset("paper-k5"),
               preset("paper-k5").replace(cross_kv_once=True, merge_step0_uncond=True),
               preset("lean-k10").replace(switch_step=5, cache_step=2, skip_step=3)]
    for acc in configs:
        r = _request(acc)
        got, want = compiled_runner.run(r), cloud_runner.run(r)
        assert np.abs(got.latents - want.latents).max() <= 1e-5 and np.abs(got.prev_x0 - want.prev_x0).max() <= 1e-5
    graphs = counters["stats"]["unique_graphs"]
    compiled_runner.run(_request(preset("paper-k5"), seed=9))   # same modes and shapes: nothing new
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(compiled_runner.engine._compiled) >= 6              # one compiled function per step mode


@pytest.mark.slow
def test_compiled_batches_match_eager_batches(cloud_runner, compiled_runner):
    requests = [_request(preset("paper-k5"), seed=3),
                _request(preset("paper-k5"), seed=4, candidates=("a red square", "a blue circle", "a green star"))]
    for a, b in zip(compiled_runner.run_batch(requests), cloud_runner.run_batch(requests)):
        assert np.abs(a.latents - b.latents).max() <= 1e-5


def test_service_compile_config_is_checked():
    from obclip.cloud.service import ServiceConfig

    with pytest.raises(ValueError, match="torch backend"):
        ServiceConfig(backend="onnxruntime", engines="x", compile=True)
    with pytest.raises(ValueError, match="needs compile"):
        ServiceConfig(compile_warmup=("paper-k5:2",))
    for bad in ("paper-k5", "nonsense:2", "paper-k5:0", "paper-k5:x", "paper-k5:999"):
        with pytest.raises(ValueError, match="PRESET:N"):
            ServiceConfig(compile=True, compile_warmup=(bad,))


def test_serve_compile_flags_reach_the_config():
    from obclip.cloud.serve import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--compile", "--compile-warmup", "paper-k10:6", "lean-k10:2"]))
    assert config.compile and config.compile_warmup == ("paper-k10:6", "lean-k10:2")
    assert not config_from_args(build_parser().parse_args([])).compile


def test_a_compiling_service_warms_its_listed_modes_up_before_ready(model_dirs, monkeypatch):
    from obclip.cloud import torch_backend
    from obclip.cloud.service import Service, ServiceConfig

    monkeypatch.setattr(torch_backend, "COMPILE_BACKEND", "aot_eager")
    service = Service(ServiceConfig(model=str(model_dirs[0]), compile=True, compile_warmup=("paper-k5:2",)))
    try:
        service.start().result(300)
        assert service.state == "ready", service.load_error
        assert service.metrics.registry.get_sample_value("obclip_batch_size_count") == 2   # warm-up + paper-k5:2
        engine = service.runner.engine
        assert engine.compile_mode == "reduce-overhead" and engine.compile_backend == "aot_eager"
        modes = {spec.name for spec in engine._compiled}
        assert {"reuse.wa.ws.fd", "cache-skip.fd"} <= modes
    finally:
        service.close()
