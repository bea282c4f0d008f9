"""The cloud service (cloud/service.py) over real HTTP: one uvicorn server for the module,
on 127.0.0.1 with an ephemeral port and the small random cloud model."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from helpers import Running, serve_in_thread, steps_request_bytes

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from obclip.cloud.answers import describe_request  # noqa: E402
from obclip.cloud.http_app import create_app  # noqa: E402
from obclip.cloud.service import Service  # noqa: E402
from obclip.cloud.service_config import ServiceConfig  # noqa: E402
from obclip.runtime.protocol import RequestLimits, StepsRequest, decode_handoff  # noqa: E402

pytestmark = pytest.mark.service

QUEUE = 2


@pytest.fixture(scope="module")
def running(model_dirs):
    service = Service(ServiceConfig(model=str(model_dirs[0]), queue_size=QUEUE, request_timeout_s=30.0))
    server, thread, port = serve_in_thread(service)
    r = Running(service, port)
    deadline = time.monotonic() + 60
    while True:
        try:
            if r.http("GET", "/readyz", timeout=5)[0] == 200:
                break
        except OSError:
            pass
        assert service.state != "failed", service.load_error
        assert time.monotonic() < deadline, "service did not become ready"
        time.sleep(0.05)
    yield r
    server.should_exit = True
    thread.join(15)


request_bytes = steps_request_bytes


def raw(**overrides) -> bytes:
    """A request as a JSON object with fields replaced verbatim (no validation on our side)."""
    obj = json.loads(request_bytes())
    obj.update(overrides)
    return json.dumps(obj).encode()


def error_of(body: bytes) -> dict:
    err = json.loads(body)["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    return err


# ---------------------------------------------------------------------------------------------
def test_a_request_is_parsed_hashed_and_planned_once(running, monkeypatch):
    import obclip.runtime.protocol as protocol
    from obclip.runtime.plan import StepPlan

    counts = {"parse": 0, "sha256": 0, "plan": 0}
    real_parse, real_plan, real_hashlib = StepsRequest.from_bytes.__func__, StepPlan.__init__, protocol.hashlib

    def parse(cls, data):
        counts["parse"] += 1
        return real_parse(cls, data)

    def plan(*args, **kw):
        counts["plan"] += 1
        return real_plan(*args, **kw)

    class Hashlib:
        @staticmethod
        def sha256(data):
            counts["sha256"] += 1
            return real_hashlib.sha256(data)

    body = request_bytes(seed=41)
    monkeypatch.setattr(StepsRequest, "from_bytes", classmethod(parse))
    monkeypatch.setattr(StepPlan, "__init__", plan)   # every plan, whoever builds it
    monkeypatch.setattr(protocol, "hashlib", Hashlib)
    status, _, data = running.post(body)
    monkeypatch.undo()
    assert status == 200, data[:300]
    assert counts == {"parse": 1, "sha256": 1, "plan": 1}, counts


def test_health_ready_metrics(running):
    status, _, body = running.http("GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    status, _, body = running.http("GET", "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    status, headers, body = running.http("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    for name in ("obclip_requests_total", "obclip_errors_total", "obclip_queue_depth", "obclip_batch_size",
                 "obclip_step_latency_seconds", "obclip_request_seconds", "obclip_ready 1.0"):
        assert name in text, name
    # the warm-up ran through the model: one batch of 1, one step
    assert running.sample("obclip_batch_size_count") >= 1
    assert running.sample("obclip_step_latency_seconds_count") >= 1


def test_steps_answers_the_handoff_bytes(running, cloud_runner):
    body = request_bytes()
    status, headers, data = running.post(body)
    assert status == 200
    assert headers["content-type"] == "application/octet-stream"
    assert "run;dur=" in headers["server-timing"]
    req = StepsRequest.from_bytes(body)
    got = decode_handoff(data, req, (4, 16, 16))
    want = decode_handoff(cloud_runner.handle(body), req, (4, 16, 16))  # the same model, in-process
    np.testing.assert_allclose(got.latents, want.latents, atol=1e-5)
    np.testing.assert_allclose(got.prev_x0, want.prev_x0, atol=1e-5)
    assert got.lower_order_nums == want.lower_order_nums and got.timesteps == want.timesteps

    # fp16 on the wire: half the tensor bytes
    status, _, half = running.post(request_bytes(wire_dtype="float16"))
    assert status == 200
    tensors = 2 * 2 * 4 * 16 * 16  # latents + prev_x0, N=2, 4x16x16 (the mini VAE downscales by 4)
    assert len(data) - len(half) == tensors * 2
    assert decode_handoff(half, StepsRequest.from_bytes(request_bytes(wire_dtype="float16")), (4, 16, 16))


def test_steps_with_a_negative_prompt(running, cloud_runner):
    """The service conditions the unconditional rows on the request's negative prompt."""
    body = request_bytes(negative_prompt="blurry, low quality")
    status, _, data = running.post(body)
    assert status == 200, data
    req = StepsRequest.from_bytes(body)
    got = decode_handoff(data, req, (4, 16, 16))
    want = decode_handoff(cloud_runner.handle(body), req, (4, 16, 16))
    np.testing.assert_allclose(got.latents, want.latents, atol=1e-5)
    plain = decode_handoff(running.post(request_bytes())[2], StepsRequest.from_bytes(request_bytes()), (4, 16, 16))
    assert float(np.abs(got.latents - plain.latents).max()) > 1e-3


def test_steps_with_a_server_side_acceleration(running):
    from obclip.runtime.plan import preset

    body = request_bytes(num_inference_steps=8, switch_step=5, acceleration=preset("paper-k5"))
    status, _, data = running.post(body)
    assert status == 200
    assert decode_handoff(data, StepsRequest.from_bytes(body), (4, 16, 16)).step_index == 5


LONG_TOKENS = "a photo of " + " ".join(["zebra"] * 100)  # < 1024 characters, > 77 tokens

FAULTS = [
    # (id, body, content type, status, code, limit name)
    ("malformed", b'{"candidates": [', "application/json", 400, "malformed_json", None),
    ("not-utf8", b"\xff\xfe{}", "application/json", 400, "malformed_json", None),
    ("not-object", b"[1, 2]", "application/json", 400, "malformed_json", None),
    ("deep-nesting", b"[" * 100_000, "application/json", 400, "malformed_json", None),
    ("huge-int", b'{"seed": ' + b"9" * 5000 + b"}", "application/json", 400, "malformed_json", None),
    ("candidates-not-list", raw(candidates="a photo of a man"), "application/json", 422, "invalid_request", None),
    ("candidate-not-str", raw(candidates=["a photo", 3]), "application/json", 422, "invalid_request", None),
    ("seed-str", raw(seed="1"), "application/json", 422, "invalid_request", None),
    ("height-float", raw(height=64.5), "application/json", 422, "invalid_request", None),
    ("guidance-str", raw(guidance_scale="high"), "application/json", 422, "invalid_request", None),
    ("dtype-list", raw(wire_dtype=["float32"]), "application/json", 422, "invalid_request", None),
    ("dtype-unknown", raw(wire_dtype="int8"), "application/json", 422, "invalid_request", None),
    ("acceleration-int", raw(acceleration=5), "application/json", 422, "invalid_request", None),
    ("acceleration-bad", raw(acceleration={"switch_step": 2, "cache_step": 9}), "application/json", 422,
     "invalid_request", None),
    ("unknown-field", raw(prompt="x"), "application/json", 422, "invalid_request", None),
    ("k-zero", raw(switch_step=0), "application/json", 422, "invalid_request", None),
    ("duplicates", raw(candidates=["a", "a"]), "application/json", 422, "invalid_request", None),
    ("n-over-cap", raw(candidates=[f"a photo of person {i}" for i in range(33)]), "application/json", 422,
     "too_many_candidates", "max_candidates"),
    ("steps-over", raw(num_inference_steps=1001), "application/json", 422, "too_many_steps", "max_steps"),
    ("k-over", raw(num_inference_steps=200, switch_step=101), "application/json", 422, "too_many_cloud_steps",
     "max_switch_step"),
    ("image-over", raw(height=2048, width=2048), "application/json", 422, "image_too_large", "max_image_size"),
    ("image-not-multiple", raw(height=65), "application/json", 422, "invalid_image_size", None),
    ("prompt-chars", raw(candidates=["x" * 1025]), "application/json", 422, "prompt_too_long", "max_prompt_chars"),
    ("prompt-tokens", raw(candidates=[LONG_TOKENS]), "application/json", 422, "prompt_too_long",
     "max_prompt_tokens"),
    ("negative-not-str", raw(negative_prompt=5), "application/json", 422, "invalid_request", None),
    ("negative-blank", raw(negative_prompt="   "), "application/json", 422, "invalid_request", None),
    ("negative-chars", raw(negative_prompt="x" * 1025), "application/json", 422, "prompt_too_long",
     "max_prompt_chars"),
    ("negative-tokens", raw(negative_prompt=LONG_TOKENS), "application/json", 422, "prompt_too_long",
     "max_prompt_tokens"),
    ("body-over", b"x" * (256 * 1024 + 1), "application/json", 413, "body_too_large", "max_body_bytes"),
    ("content-type", request_bytes(), "text/plain", 415, "unsupported_media_type", None),
]


@pytest.mark.parametrize("name,body,ctype,status,code,limit", FAULTS, ids=[f[0] for f in FAULTS])
def test_bad_requests_get_a_json_4xx(running, name, body, ctype, status, code, limit):
    got_status, headers, data = running.post(body, content_type=ctype)
    assert got_status == status, data
    assert headers["content-type"] == "application/json"
    err = error_of(data)
    assert err["code"] == code
    if limit is not None:
        assert err["limit"]["name"] == limit and limit in err["message"]
        assert err["limit"]["got"] > err["limit"]["max"]
    assert "zebra" not in err["message"] and "person 1" not in err["message"]  # never quotes a candidate


def test_chunked_body_over_the_limit_is_413(running):
    # No Content-Length: the limit is enforced on the bytes as they arrive.
    chunks = (b"x" * 4096 for _ in range(100))
    status, _, data = running.http("POST", "/v1/steps", chunks, {"Content-Type": "application/json"},
                                   encode_chunked=True)
    assert status == 413 and error_of(data)["code"] == "body_too_large"


def test_unknown_paths_and_methods_are_json(running):
    status, _, data = running.http("GET", "/v1/steps")
    assert status == 405 and error_of(data)["code"] == "method_not_allowed"
    status, _, data = running.http("GET", "/nope")
    assert status == 404 and error_of(data)["code"] == "not_found"


def test_server_keeps_serving_after_faults(running):
    assert running.sample("obclip_errors_total", code="internal") == 0
    assert running.http("GET", "/readyz")[0] == 200
    assert running.post(request_bytes())[0] == 200


def test_worker_bug_is_a_generic_500_and_the_server_survives(running, monkeypatch):
    def broken(request):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(running.service.runner, "run", broken)
    status, _, data = running.post(request_bytes())
    err = error_of(data)
    assert status == 500 and err["code"] == "internal" and "secret" not in err["message"]
    monkeypatch.undo()
    assert running.post(request_bytes())[0] == 200


def _gate_runner(monkeypatch, service):
    """Make the worker wait on an event before each real run."""
    gate = threading.Event()
    real = service.runner.run

    def gated(request, before_step=None):
        gate.wait(30)
        return real(request, before_step=before_step)

    monkeypatch.setattr(service.runner, "run", gated)
    return gate


def _in_threads(fn, n):
    out = [None] * n

    def go(i):
        out[i] = fn()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # arrival order
    return threads, out


def _wait_for(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_full_queue_is_503_with_retry_after(running, monkeypatch):
    service = running.service
    gate = _gate_runner(monkeypatch, service)
    # one running (held at the gate) + QUEUE waiting
    threads, results = _in_threads(lambda: running.post(request_bytes()), 1 + QUEUE)
    _wait_for(lambda: service.worker.running_batch is not None and service.worker.waiting == QUEUE)
    assert running.sample("obclip_queue_depth") == QUEUE
    status, headers, data = running.post(request_bytes())
    assert status == 503 and headers["retry-after"] == "1"
    err = error_of(data)
    assert err["code"] == "overloaded" and "queue_size" in err["message"]
    gate.set()
    for t in threads:
        t.join(30)
    assert [r[0] for r in results] == [200] * (1 + QUEUE)


def test_timeout_is_504_and_the_work_is_cancelled(running, monkeypatch):
    service = running.service
    monkeypatch.setattr(service, "config", replace(service.config, request_timeout_s=1.0))
    gate = _gate_runner(monkeypatch, service)
    passes = []
    hook = service.model.unet.conv_out.register_forward_pre_hook(lambda m, a: passes.append(1))
    queued0 = running.sample("obclip_jobs_cancelled_total", stage="queued")
    running0 = running.sample("obclip_jobs_cancelled_total", stage="running")
    try:
        t0 = time.monotonic()
        # A starts (held at the gate), B waits in the queue; both time out.
        threads, results = _in_threads(lambda: running.post(request_bytes(num_inference_steps=8, switch_step=6)), 2)
        for t in threads:
            t.join(30)
        assert time.monotonic() - t0 < 10
        for status, _, data in results:
            assert status == 504 and error_of(data)["code"] == "timeout"
        # B never started: dropped from the queue
        assert running.sample("obclip_jobs_cancelled_total", stage="queued") == queued0 + 1
        # A is released after its deadline: it stops at its first UNet pass, none of its 6 steps runs
        gate.set()
        _wait_for(lambda: running.sample("obclip_jobs_cancelled_total", stage="running") == running0 + 1)
        _wait_for(lambda: service.worker.running_batch is None)
        assert passes == []
        assert running.sample("obclip_queue_depth") == 0
    finally:
        hook.remove()
        monkeypatch.undo()
    assert running.post(request_bytes())[0] == 200


def test_candidates_are_not_logged(running, caplog):
    caplog.set_level(logging.DEBUG)
    marker = "zebracorn"
    ok = request_bytes(candidates=(f"a photo of a {marker} man", f"a photo of a {marker} woman"))
    assert running.post(ok)[0] == 200
    assert running.post(raw(candidates=[f"{marker} " + LONG_TOKENS]))[0] == 422
    assert running.post(raw(candidates=[marker, 5]))[0] == 422
    records = [r for r in caplog.records if r.name.startswith("obclip")]
    assert any("N=2" in r.getMessage() for r in records)  # the requests were logged, shape only
    assert marker not in caplog.text
    assert all(marker not in r.getMessage() for r in caplog.records)


def test_log_prompts_flag_is_the_only_way_to_log_candidates():
    req = StepsRequest.from_bytes(request_bytes())
    assert "a photo of a man" not in describe_request(req)
    assert "a photo of a man" in describe_request(req, log_prompts=True)
    negative = StepsRequest.from_bytes(request_bytes(negative_prompt="blurry, a bearded man"))
    assert "bearded" not in describe_request(negative)
    assert "blurry, a bearded man" in describe_request(negative, log_prompts=True)
    assert ServiceConfig().log_prompts is False


# -- without the HTTP server ------------------------------------------------------------------
def asgi(app, method: str, path: str, body: bytes = b""):
    """Call the ASGI app directly (no lifespan: the model is not started by it)."""
    async def go():
        sent, messages = [], [{"type": "http.request", "body": body, "more_body": False}]
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
                 "server": ("127.0.0.1", 80)}

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)
        headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
        return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])

    return asyncio.run(go())


def test_readyz_is_503_until_loaded_and_warmed(model_dirs):
    service = Service(ServiceConfig(model=str(model_dirs[0])))
    app = create_app(service=service)
    gate = threading.Event()
    service.worker.call(lambda: gate.wait(30))  # hold the worker: the load queues behind it
    try:
        loading = service.start()
        assert asgi(app, "GET", "/healthz")[0] == 200
        status, headers, body = asgi(app, "GET", "/readyz")
        assert status == 503 and headers["retry-after"] == "1" and error_of(body)["code"] == "not_ready"
        status, _, body = asgi(app, "POST", "/v1/steps", request_bytes())
        assert status == 503 and error_of(body)["code"] == "not_ready"
        gate.set()
        loading.result(60)
        assert service.state == "ready"
        assert asgi(app, "GET", "/readyz")[0] == 200
        assert service.metrics.registry.get_sample_value("obclip_batch_size_count") == 1  # the warm-up ran
    finally:
        gate.set()
        service.close()


def test_load_failure_is_reported_on_readyz(tmp_path):
    service = Service(ServiceConfig(model=str(tmp_path / "missing")))
    failures = []
    service.on_load_failed = failures.append
    app = create_app(service=service)
    service.start().result(60)
    status, _, body = asgi(app, "GET", "/readyz")
    err = error_of(body)
    assert status == 503 and err["code"] == "load_failed" and "does not exist" in err["message"]
    assert len(failures) == 1
    service.close()


@pytest.mark.parametrize("error, code", [("artifact", 5), ("bug", 1)])
def test_serve_exits_by_the_kind_of_a_load_failure(tmp_path, monkeypatch, error, code):
    """A model that cannot be loaded stops obclip-serve with its kind's exit code; a bug exits 1."""
    from obclip.cloud.serve import main
    from obclip.runtime.errors import ArtifactError

    def fail(self):
        raise ArtifactError("the model folder is corrupt") if error == "artifact" else RuntimeError("a bug")

    monkeypatch.setattr(Service, "_load_model", fail)
    assert main(["--model", str(tmp_path), "--host", "127.0.0.1", "--port", "0", "--no-warmup"]) == code


def test_config_and_cli_errors(tmp_path):
    from obclip.cloud.serve import main

    with pytest.raises(ValueError, match="max_candidates"):
        RequestLimits(max_candidates=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        ServiceConfig(request_timeout_s=float("nan"))
    assert main(["--max-candidates", "0"]) == 2
    assert main(["--model", str(tmp_path / "missing")]) == 2


def test_every_option_is_declared_once_and_has_its_flag():
    """ServiceConfig, RequestLimits and HttpLimits fields make obclip-serve's flags (runtime/options.py):
    the defaults round-trip, every option field has a flag with its help, a flag sets its field."""
    import dataclasses

    from obclip.cloud.serve import build_parser, config_from_args
    from obclip.cloud.service_config import HttpLimits
    from obclip.runtime.options import flag_of, option_of

    parser = build_parser()
    assert config_from_args(parser.parse_args([])) == ServiceConfig()
    flags = {s: a for a in parser._actions for s in a.option_strings}
    for cls in (ServiceConfig, RequestLimits, HttpLimits):
        for f in dataclasses.fields(cls):
            opt = option_of(f)
            if opt is None or not opt.cli:
                continue
            action = flags[flag_of(f)]
            assert action.dest == f.name and action.help and opt.help in action.help
    config = config_from_args(parser.parse_args(
        ["--timeout", "9", "--no-warmup", "--max-candidates", "7", "--keep-alive", "2.5",
         "--compile", "--compile-warmup", "paper-k5:2", "--backend", "torch"]))
    assert (config.request_timeout_s, config.warmup, config.limits.max_candidates, config.http.keep_alive_s,
            config.compile_warmup) == (9.0, False, 7, 2.5, ("paper-k5:2",))


@pytest.mark.parametrize("cls, field", [(ServiceConfig, "queue_size"), (ServiceConfig, "retry_after_s"),
                                        (RequestLimits, "max_steps"), (ServiceConfig, "batch_window_ms")])
def test_one_validator_refuses_a_bool_where_a_number_belongs(cls, field):
    from obclip.runtime.errors import InputError

    with pytest.raises(InputError, match=f"{field} must be"):
        cls(**{field: True})
