"""Cross-request batching: several requests with the same options through the UNet as one batch
(cloud/acceleration.py, cloud/steps.py run_batch) and through the service (cloud/service.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from obclip.cloud.steps import CloudStepRunner
from obclip.runtime.plan import CLOUD, AccelerationConfig, PlannedStep, StepMode, preset
from obclip.runtime.protocol import StepsRequest, decode_handoff

from helpers import ModeSteps

CANDS = [
    ("a photo of an old man", "a photo of a middle-aged man", "a photo of a young man"),
    ("a photo of a woman", "a photo of a man"),
    ("a red square", "a blue circle", "a green square", "a red circle"),
]


def _requests(acceleration=None, k=5, **kw):
    return [StepsRequest(c, seed, 10, k, 7.5, 64, 64, acceleration=acceleration, **kw)
            for seed, c in zip((3, 11, 7), CANDS)]


def _assert_same(batched, alone, tol):
    """Equal to float rounding: max |difference| <= tol x max |value| (a GEMM over a different number of
    rows may round differently; latents here reach |x| ~ 50, where float32's spacing is ~4e-6)."""
    assert len(batched) == len(alone)
    for b, a in zip(batched, alone):
        assert b.latents.shape == a.latents.shape
        for got, want in ((b.latents, a.latents), (b.prev_x0, a.prev_x0)):
            err = float(np.abs(got - want).max() / np.abs(want).max())
            assert err <= tol, err
        assert (b.lower_order_nums, b.step_index, b.timesteps) == (a.lower_order_nums, a.step_index, a.timesteps)


@pytest.mark.parametrize("acceleration", [
    None,
    AccelerationConfig.none(5).replace(cross_kv_once=True, merge_step0_uncond=True),
    preset("paper-k5"),
    AccelerationConfig(5, 2, 3, cross_kv_once=True, merge_step0_uncond=True),
    AccelerationConfig(5, 2, 3, skip_variant="deepcache", cross_kv_once=True),
    AccelerationConfig(5, 2, 3, frozen_guidance="cached", cross_kv_once=True, merge_step0_uncond=True),
    AccelerationConfig(5, 2, 3, pivot_only_steps=1, cross_kv_once=True, merge_step0_uncond=True),
    AccelerationConfig(5, 2, 3, skip_variant="deepcache-shallow", frozen_guidance="cached"),
], ids=["exact", "exact-extras", "paper-k5", "reuse-extras", "deepcache", "frozen-cached", "pivot-merged",
        "shallow-frozen"])
def test_run_batch_equals_each_request_alone(cloud_runner, acceleration):
    requests = _requests(acceleration)
    alone = [cloud_runner.run(r) for r in requests]
    _assert_same(cloud_runner.run_batch(requests), alone, tol=1e-5)
    # order within the batch does not matter either
    _assert_same(cloud_runner.run_batch(requests[::-1]), alone[::-1], tol=1e-5)


@pytest.mark.parametrize("acceleration", [None, AccelerationConfig(4, 2, 2, pivot_only_steps=1, cross_kv_once=True,
                                                                     merge_step0_uncond=True)],
                         ids=["exact", "pivot-merged"])
def test_lcm_batch_equals_each_request_alone(cloud_runner, acceleration):
    """Each request of an LCM batch gets its own seed's step noise, repeated over its candidates."""
    requests = _requests(acceleration, k=4, solver="lcm")
    alone = [cloud_runner.run(r) for r in requests]
    assert all(a.lower_order_nums == 0 for a in alone)
    _assert_same(cloud_runner.run_batch(requests), alone, tol=1e-5)


def test_lcm_keeps_the_exact_extras_exact(cloud_runner):
    """Merging the unconditional rows at step p = 1 assumes every candidate's latent is still the same
    after the pivot-only step 0: it is, because LCM's injected noise is one draw for all candidates."""
    base = AccelerationConfig(4, 2, 2, pivot_only_steps=1)
    for plain, merged in zip(_requests(base, k=4, solver="lcm"),
                             _requests(base.replace(merge_step0_uncond=True, cross_kv_once=True), k=4, solver="lcm")):
        a, b = cloud_runner.run(plain), cloud_runner.run(merged)
        assert float(np.abs(a.latents - b.latents).max() / np.abs(a.latents).max()) <= 1e-5


def test_run_is_the_batch_of_one(cloud_runner):
    r = _requests()[0]
    a, (b,) = cloud_runner.run(r), cloud_runner.run_batch([r])
    assert (a.latents == b.latents).all() and (a.prev_x0 == b.prev_x0).all()


def test_unbatchable_requests_are_refused_naming_the_field(cloud_runner):
    a, b, _ = _requests()
    for field, value in (("num_inference_steps", 12), ("switch_step", 4), ("height", 32), ("width", 32),
                         ("guidance_scale", 5.0), ("acceleration", preset("paper-k5")), ("solver", "lcm")):
        other = replace(b, **{field: value})
        with pytest.raises(ValueError, match=f"their {field} differ"):
            cloud_runner.run_batch([a, other])
    # wire_dtype only changes the encoding, the device timestep shift only the device's steps: batchable
    assert CloudStepRunner.batch_key(a) == CloudStepRunner.batch_key(replace(a, wire_dtype="float16"))
    assert CloudStepRunner.batch_key(a) == CloudStepRunner.batch_key(replace(a, device_timestep_shift=8))
    with pytest.raises(ValueError, match="at least one"):
        cloud_runner.run_batch([])


def test_caches_stay_per_request(cloud_model):
    """Changing one request's inputs changes none of the other's rows, in every step mode
    (so no cache entry of one request is read by another)."""
    torch.manual_seed(0)
    unet = cloud_model.unet
    d = cloud_model.encode_prompts(["a"]).shape[-1]
    g = torch.Generator().manual_seed(2)
    cond_a, cond_b = torch.randn(3, 77, d, generator=g), torch.randn(2, 77, d, generator=g)
    cond_b2 = torch.randn(2, 77, d, generator=g)
    uncond = torch.randn(1, 77, d, generator=g)
    x_a, x_b, x_b2 = (torch.randn(n, 4, 8, 8, generator=g) for n in (3, 2, 2))
    config = AccelerationConfig(5, 2, 3, cross_kv_once=True, merge_step0_uncond=True)
    modes = [StepMode.REUSE, StepMode.REUSE, StepMode.CACHE, StepMode.CACHE_SKIP, StepMode.CACHE_SKIP]

    def go(cond_second, x_second):
        outs = []
        with ModeSteps(unet, config, cond=[cond_a, cond_second], uncond=[uncond, uncond],
                             guidance_scale=7.5) as acc:
            x = torch.cat([x_a, x_second])
            for i, m in enumerate(modes):
                eps = acc.guided_eps(x, torch.tensor(900 - 100 * i), PlannedStep(i, CLOUD, m))
                outs.append(acc.split(eps))
                x = x - 0.1 * eps
            # the caches are in the batch's full layout: [uncond x (3 + 2), cond x (3 + 2)]
            attention = [v for k, v in acc.caches.items() if k.startswith("attn/")]
            assert attention and all(v.shape[0] == 10 for v in attention)
        return outs

    one, two = go(cond_b, x_b), go(cond_b2, x_b2)
    for (a1, b1), (a2, b2) in zip(one, two):
        assert torch.equal(a1, a2)        # request 0: untouched by request 1's inputs
        assert not torch.equal(b1, b2)


# --- through the service ------------------------------------------------------------------------

uvicorn = pytest.importorskip("uvicorn")
from obclip.cloud.service import Service  # noqa: E402
from obclip.cloud.service_config import ServiceConfig  # noqa: E402

from helpers import Running, serve_in_thread  # noqa: E402


@pytest.fixture(scope="module")
def batching(model_dirs):
    # A long window, so threads started a few ms apart surely land in one batch.
    service = Service(ServiceConfig(model=str(model_dirs[0]), queue_size=8, request_timeout_s=30.0,
                                    batch_window_ms=400))
    batches = []
    service.worker.on_batch = lambda requests: batches.append([r.to_bytes() for r in requests])
    server, thread, port = serve_in_thread(service)
    r = Running(service, port)
    deadline = time.monotonic() + 60
    while not (_up(r) and r.http("GET", "/readyz", timeout=5)[0] == 200):
        assert service.state != "failed", service.load_error
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield r, batches
    server.should_exit = True
    thread.join(15)


def _up(r) -> bool:
    try:
        r.http("GET", "/healthz", timeout=5)
        return True
    except OSError:
        return False


def _body(i, **kw) -> bytes:
    fields = dict(candidates=CANDS[i % len(CANDS)], seed=i, num_inference_steps=4, switch_step=2,
                  guidance_scale=7.5, height=64, width=64)
    fields.update(kw)
    return StepsRequest(**fields).to_bytes()


def _concurrently(running, bodies, **kw):
    out = [None] * len(bodies)

    def go(i):
        out[i] = running.post(bodies[i], **kw)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


@pytest.mark.service
def test_concurrent_requests_are_batched_and_answer_what_they_would_alone(batching, cloud_runner):
    running, batches = batching
    bodies = [_body(i, wire_dtype="float16" if i == 1 else "float32") for i in range(3)]
    n0 = running.sample("obclip_batch_size_count")
    batches.clear()
    results = _concurrently(running, bodies)
    assert [r[0] for r in results] == [200] * 3
    assert len(batches) == 1 and sorted(batches[0]) == sorted(bodies)    # one batch, wire dtypes mixed
    assert running.sample("obclip_batch_size_count") == n0 + 1
    assert running.sample("obclip_batch_rows_sum") >= 2 * (3 + 2 + 4)
    # the answers are the bytes of the same requests one at a time
    for body, (_, _, data) in zip(bodies, results):
        alone = cloud_runner.handle(body)
        assert len(data) == len(alone)
        got = decode_handoff(data, StepsRequest.from_bytes(body), (4, 16, 16))
        want = decode_handoff(alone, StepsRequest.from_bytes(body), (4, 16, 16))
        # float rounding of a bigger GEMM (1e-5 of the largest value), or one float16 step on the wire
        tol = 1e-5 if StepsRequest.from_bytes(body).wire_dtype == "float32" else 2.0 ** -10
        for a, b in ((got.latents, want.latents), (got.prev_x0, want.prev_x0)):
            assert np.abs(a.astype(np.float64) - b).max() <= tol * np.abs(b).max()
    # and through the service alone, one at a time: identical bytes when nothing runs beside it
    batches.clear()
    status, _, single = running.post(bodies[0])
    assert status == 200 and len(batches) == 1 and len(batches[0]) == 1


@pytest.mark.service
def test_different_options_are_not_batched_together(batching):
    running, batches = batching
    bodies = [_body(0), _body(1, num_inference_steps=5), _body(2, guidance_scale=5.0), _body(3)]
    batches.clear()
    results = _concurrently(running, bodies)
    assert [r[0] for r in results] == [200] * 4
    keys = [{StepsRequest.from_bytes(b).num_inference_steps for b in batch} for batch in batches]
    assert all(len(k) == 1 for k in keys)
    for batch in batches:
        reqs = [StepsRequest.from_bytes(b) for b in batch]
        assert len({CloudStepRunner.batch_key(r) for r in reqs}) == 1
    assert sum(len(b) for b in batches) == 4 and len(batches) <= 3   # bodies 0 and 3 could batch


@pytest.mark.service
def test_a_timed_out_request_does_not_break_its_batch(batching, monkeypatch):

    running, batches = batching
    service = running.service
    monkeypatch.setattr(service, "config", replace(service.config, request_timeout_s=3.0))
    real = service.runner.run_batch

    def slow(requests, before_step=None):   # the batch outlives the first request's deadline
        def step(s):
            before_step(s)
            time.sleep(1.2)
        return real(requests, before_step=step)

    monkeypatch.setattr(service.runner, "run_batch", slow)
    cancelled0 = running.sample("obclip_jobs_cancelled_total", stage="running")
    results = [None, None]

    def early():
        results[0] = running.post(_body(0, num_inference_steps=6, switch_step=4))

    t = threading.Thread(target=early)
    t.start()
    time.sleep(0.1)
    # the second arrives later (same window), with a deadline it meets: reset the timeout for it
    monkeypatch.setattr(service, "config", replace(service.config, request_timeout_s=30.0))
    results[1] = running.post(_body(1, num_inference_steps=6, switch_step=4))
    t.join(30)
    assert results[0][0] == 504 and results[1][0] == 200
    assert running.sample("obclip_jobs_cancelled_total", stage="running") == cancelled0 + 1
    got = decode_handoff(results[1][2], StepsRequest.from_bytes(_body(1, num_inference_steps=6, switch_step=4)),
                         (4, 16, 16))
    assert got.latents.shape[0] == len(CANDS[1])


@pytest.mark.service
def test_window_zero_runs_one_at_a_time(model_dirs):
    service = Service(ServiceConfig(model=str(model_dirs[0]), batch_window_ms=0, warmup=False))
    batches = []
    service.worker.on_batch = lambda requests: batches.append(len(requests))
    server, thread, port = serve_in_thread(service)
    r = Running(service, port)
    try:
        deadline = time.monotonic() + 60
        while not (_up(r) and r.http("GET", "/readyz", timeout=5)[0] == 200):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        results = _concurrently(r, [_body(i) for i in range(3)])
        assert [x[0] for x in results] == [200] * 3 and batches == [1, 1, 1]
    finally:
        server.should_exit = True
        thread.join(15)
    with pytest.raises(ValueError, match="batch_window_ms"):
        ServiceConfig(batch_window_ms=-1)
    with pytest.raises(ValueError, match="max_batch_rows"):
        ServiceConfig(max_batch_rows=0)
