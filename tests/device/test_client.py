"""The device's HTTP client (device/client.py) and CLI (device/generate.py): wire obliviousness
end to end against the real service (one uvicorn server for the module), and every fault
against small standard-library socket servers that misbehave on purpose."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import obclip

from helpers import REPO, serve_in_thread

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from obclip.device.client import (  # noqa: E402
    BadResponse,
    ClientConfig,
    ServiceClient,
    ServiceFailed,
    ServiceRejected,
    ServiceTimeout,
    ServiceUnavailable,
    check_handoff,
    generate_image,
)
from obclip.device.pipeline import GenerationConfig  # noqa: E402
from obclip.device.verify import VerificationError  # noqa: E402
from obclip.runtime.errors import ArtifactError, InputError, ServiceError, UntrustedAnswerError  # noqa: E402
from obclip.runtime.protocol import HandoffError, ProtocolError, StepsRequest, encode_handoff  # noqa: E402

pytestmark = pytest.mark.service

PROMPT = "a photo of an old woman"


# -- helpers: a real service, and raw socket servers ----------------------------------------------
@pytest.fixture(scope="module")
def service_url(model_dirs):
    from obclip.cloud.service import Service
    from obclip.cloud.service_config import ServiceConfig

    service = Service(ServiceConfig(model=str(model_dirs[0])))
    server, thread, port = serve_in_thread(service)
    url = f"http://127.0.0.1:{port}"
    client = ServiceClient(ClientConfig(url, retries=0))
    deadline = time.monotonic() + 60
    while not client.ready():
        assert service.state != "failed", service.load_error
        assert time.monotonic() < deadline, "service did not become ready"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(15)


def read_http_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def body_of(raw_request: bytes) -> bytes:
    return raw_request.partition(b"\r\n\r\n")[2]


def http_response(status: int, body: bytes = b"", content_type: str = "application/octet-stream",
                  headers: dict | None = None, content_length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", "Connection: close"]
    if content_length != -1:
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return http_response(status, body, "application/json", headers)


class RawServer:
    """Records the raw bytes of every request; ``respond(raw, i)`` gives the raw answer
    (None: close without answering). One thread per connection."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            raw = read_http_request(conn)
            i = len(self.requests)
            self.requests.append(raw)
            out = self.respond(raw, i)
            if out:
                try:
                    conn.sendall(out)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def steps_request(**kw) -> StepsRequest:
    fields = dict(candidates=("a photo of a man", "a photo of a woman"), seed=1, num_inference_steps=4,
                  switch_step=2, guidance_scale=7.5, height=64, width=64)
    fields.update(kw)
    return StepsRequest(**fields)


def fake_handoff(request_bytes: bytes, value: float = 0.0, **kw) -> bytes:
    req = StepsRequest.from_bytes(request_bytes)
    lat = np.full((req.n, 4, 16, 16), value, dtype=np.float32)
    return encode_handoff(req, lat, lat.copy(), lower_order_nums=1, step_index=req.switch_step,
                          timesteps=list(range(req.num_inference_steps, 0, -1)), cloud_model="fake", **kw)


def client_for(url: str, **kw) -> ServiceClient:
    kw.setdefault("timeout_s", 10.0)
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("max_backoff_s", 0.2)
    return ServiceClient(ClientConfig(url, **kw))


def refused_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


# -- against the real service --------------------------------------------------------------------
def test_generate_image_against_the_service(service_url, device_pipeline, cloud_runner):
    client = ServiceClient(ClientConfig(service_url))
    config = GenerationConfig(num_inference_steps=4, switch_step=2, seed=3)
    result = generate_image(PROMPT, client, device_pipeline, config)
    assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
    call = client.last_call
    assert call.attempts == 1 and call.bytes_sent == result.bytes_sent and call.bytes_received == result.bytes_received
    assert call.server_run_s is not None and call.transfer_s is not None
    # the same request answered in process gives the same image: HTTP changes nothing
    local = device_pipeline.generate(PROMPT, cloud_runner.handle, config)
    assert np.abs(local.image.astype(int) - result.image).max() <= 1


def test_wire_is_oblivious_end_to_end(service_url, device_pipeline):
    """For every member of a candidate set as the real prompt: the bytes the client puts on the
    socket (request line, headers, body) are identical, and so is the answer's size."""
    port = int(service_url.rsplit(":", 1)[1])
    responses: list[bytes] = []

    def forward(raw, i):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as up:
            up.sendall(raw)
            data = b""
            while chunk := up.recv(65536):
                data += chunk
        responses.append(data)
        return data

    config = GenerationConfig(num_inference_steps=4, switch_step=2, seed=11)
    members = device_pipeline.prepare(PROMPT, config).candidate_set.candidates
    assert len(members) >= 4
    images = []
    with RawServer(forward) as proxy:
        for member in members:
            result = generate_image(member, proxy.url, device_pipeline, config)
            assert result.prepared.candidate_set.candidates == members
            images.append(result.image)
        sent = proxy.requests
    assert len(sent) == len(members)
    assert len(set(sent)) == 1, "the request bytes depend on which candidate is real"
    head = sent[0].partition(b"\r\n\r\n")[0].decode().split("\r\n")
    assert head[0] == "POST /v1/steps HTTP/1.1"
    names = sorted(line.split(":", 1)[0].lower() for line in head[1:])
    assert names == ["accept", "accept-encoding", "connection", "content-length", "content-type", "host",
                     "user-agent"]
    # The answers: same size, headers included (their Date/Server-Timing values vary), same body bytes.
    assert all(r.startswith(b"HTTP/1.1 200") for r in responses)
    assert len({len(r) for r in responses}) == 1
    assert len({body_of(r) for r in responses}) == 1
    request = StepsRequest.from_bytes(body_of(sent[0]))
    decoded = [check_handoff(body_of(r), request, (4, 16, 16)) for r in responses]
    for d in decoded[1:]:
        assert np.array_equal(d.latents, decoded[0].latents) and np.array_equal(d.prev_x0, decoded[0].prev_x0)
        assert d.metadata == decoded[0].metadata
    # ...while each device kept its own candidate's latent
    assert not np.array_equal(images[0], images[-1])


def test_the_service_cap_is_a_clear_error(service_url):
    many = steps_request(candidates=tuple(f"a photo of person {i}" for i in range(33)))
    with pytest.raises(ServiceRejected) as info:
        client_for(service_url)(many.to_bytes())
    e = info.value
    assert e.status == 422 and e.code == "too_many_candidates" and "max_candidates=32" in str(e)


def test_float16_halves_the_tensor_bytes(service_url):
    client = client_for(service_url)
    full = client(steps_request().to_bytes())
    half = client(steps_request(wire_dtype="float16").to_bytes())
    assert full.wire_size - half.wire_size == 2 * 2 * 4 * 16 * 16 * 2


def test_cli_generates_a_png(service_url, engines_dir, tmp_path, capsys):
    from obclip.device.generate import main

    out = tmp_path / "image.png"
    code = main([PROMPT, "--server", service_url, "--out", str(out), "--engines", str(engines_dir),
                 "--steps", "4", "-k", "2", "--seed", "1", "--wire-dtype", "float16"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "the server received 6 candidate(s)" in captured.out and "a photo of a young man" in captured.out
    assert "cloud compute" in captured.out and "device steps" in captured.out
    assert "device steps [" in captured.err and "2/2" in captured.err  # the progress bar


def test_cli_runs_lcm_with_the_device_timestep_shift_over_http(service_url, engines_dir, tmp_path, capsys):
    from obclip.device.generate import main

    out = tmp_path / "lcm.png"
    code = main([PROMPT, "--server", service_url, "--out", str(out), "--engines", str(engines_dir),
                 "--solver", "lcm", "-k", "4", "--acceleration", "paper-lcm-k4", "--device-timestep-shift", "8",
                 "--seed", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "solver: lcm dt=8  T=8  k=4" in captured.out   # T defaults to LCM's 8
    assert "4/4" in captured.err


def test_cli_errors_are_clear(engines_dir, tmp_path, capsys):
    from obclip.device.generate import main

    assert main([PROMPT, "--out", str(tmp_path / "x.png"), "--engines", str(engines_dir)]) == 2
    assert "--server" in capsys.readouterr().err
    code = main([PROMPT, "--server", refused_url(), "--out", str(tmp_path / "x.png"),
                 "--engines", str(engines_dir), "--retries", "0", "--steps", "4", "-k", "2"])
    assert code == 3 and "could not connect" in capsys.readouterr().err
    assert main([PROMPT, "--server", "http://x", "--engines", str(tmp_path / "none")]) == ArtifactError.exit_code
    assert "no device engines" in capsys.readouterr().err


# -- faults, against misbehaving socket servers ---------------------------------------------------
def test_503_is_retried_with_identical_bytes_and_retry_after_capped():
    def respond(raw, i):
        if i < 2:
            return error_response(503, "overloaded", "busy", {"Retry-After": "3600"})
        return http_response(200, fake_handoff(body_of(raw)))

    body = steps_request().to_bytes()
    with RawServer(respond) as server:
        client = client_for(server.url, retries=3, max_backoff_s=0.1)
        t0 = time.monotonic()
        data = client(body)
        assert time.monotonic() - t0 < 3  # Retry-After: 3600 capped at max_backoff_s
        assert len(server.requests) == 3 and len(set(server.requests)) == 1
    assert np.array_equal(data.latents, np.zeros((2, 4, 16, 16)))
    assert client.last_call.attempts == 3


def test_503_until_retries_run_out():
    with RawServer(lambda raw, i: error_response(503, "overloaded", "busy", {"Retry-After": "0"})) as server:
        with pytest.raises(ServiceUnavailable) as info:
            client_for(server.url, retries=2)(steps_request().to_bytes())
        assert len(server.requests) == 3
    assert info.value.code == "overloaded" and "gave up after 3 attempt(s)" in str(info.value)


@pytest.mark.parametrize("status,code", [(400, "malformed_json"), (413, "body_too_large"),
                                         (422, "too_many_candidates")])
def test_4xx_is_a_clear_error_and_not_retried(status, code):
    with RawServer(lambda raw, i: error_response(status, code, f"limit {code} hit")) as server:
        with pytest.raises(ServiceRejected) as info:
            client_for(server.url, retries=3)(steps_request().to_bytes())
        assert len(server.requests) == 1
    e = info.value
    assert e.status == status and e.code == code and e.message == f"limit {code} hit" and code in str(e)


def test_4xx_without_a_json_body():
    with RawServer(lambda raw, i: http_response(400, b"Bad Request", "text/plain")) as server:
        with pytest.raises(ServiceRejected) as info:
            client_for(server.url)(steps_request().to_bytes())
    assert info.value.code == "http_400" and "Bad Request" in str(info.value)


@pytest.mark.parametrize("status,error", [(504, ServiceTimeout), (500, ServiceFailed)])
def test_5xx(status, error):
    with RawServer(lambda raw, i: error_response(status, "x", "server side")) as server:
        with pytest.raises(error):
            client_for(server.url)(steps_request().to_bytes())
        assert len(server.requests) == 1


def test_connection_refused_is_retried_then_a_clear_error():
    t0 = time.monotonic()
    client = client_for(refused_url(), retries=2)
    with pytest.raises(ServiceUnavailable, match="could not connect.*gave up after 3 attempt"):
        client(steps_request().to_bytes())
    assert client.last_call.attempts == 3 and time.monotonic() - t0 < 5


KILLED_SERVER = textwrap.dedent("""
    import os, signal, socket, sys
    s = socket.create_server(("127.0.0.1", 0))
    print(s.getsockname()[1], flush=True)
    conn, _ = s.accept()
    data = b""
    while b"\\r\\n\\r\\n" not in data:
        data += conn.recv(65536)
    conn.send(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/octet-stream\\r\\nContent-Length: 5000\\r\\n\\r\\nabc")
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-request: no answer, nothing listens any more
""")


def test_server_killed_mid_request_is_a_clear_error_not_a_hang():
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        client = client_for(f"http://127.0.0.1:{port}", retries=2, timeout_s=20)
        t0 = time.monotonic()
        with pytest.raises((ServiceUnavailable, BadResponse)) as info:
            client(steps_request().to_bytes())
        assert time.monotonic() - t0 < 5
        assert proc.wait(10) == -9
    finally:
        proc.kill()
    # the first attempt saw the connection die; the retries found nothing listening
    assert client.last_call.attempts == 3
    assert "could not connect" in str(info.value) and "gave up after 3 attempt(s)" in str(info.value)


def test_a_server_that_never_answers_times_out():
    release = threading.Event()

    def hang(raw, i):
        release.wait(10)

    with RawServer(hang) as server:
        client = client_for(server.url, timeout_s=0.5, retries=3)
        t0 = time.monotonic()
        with pytest.raises(ServiceTimeout, match="timeout_s=0.5"):
            client(steps_request().to_bytes())
        assert time.monotonic() - t0 < 3 and len(server.requests) == 1  # timeouts are not retried
        release.set()


def test_a_server_that_stalls_mid_body_times_out():
    release = threading.Event()

    def stall(raw, i):
        return None

    class Stalling(RawServer):
        def _handle(self, conn):
            with conn:
                self.requests.append(read_http_request(conn))
                conn.sendall(http_response(200, b"x" * 100, content_length=10_000))
                release.wait(10)

    with Stalling(stall) as server:
        t0 = time.monotonic()
        with pytest.raises(ServiceTimeout):
            client_for(server.url, timeout_s=0.5)(steps_request().to_bytes())
        assert time.monotonic() - t0 < 3
        release.set()


def test_truncated_response_is_detected():
    def truncate(raw, i):
        data = fake_handoff(body_of(raw))
        return http_response(200, data[: len(data) // 2], content_length=len(data))

    with RawServer(truncate) as server:
        with pytest.raises(ServiceUnavailable, match="truncated") as info:
            client_for(server.url, retries=1)(steps_request().to_bytes())
        assert len(server.requests) == 2  # a dropped connection is retried once, then reported
    # a transport failure (retryable), not a verdict on the answer: none of its bytes was read as one
    assert info.value.code == "truncated" and isinstance(info.value, ServiceError)
    assert not isinstance(info.value, UntrustedAnswerError)


def test_truncated_response_without_content_length():
    def truncate(raw, i):
        data = fake_handoff(body_of(raw))
        return http_response(200, data[: len(data) // 2], content_length=-1)  # read to close

    with RawServer(truncate) as server:
        with pytest.raises(BadResponse, match="truncated") as info:
            client_for(server.url)(steps_request().to_bytes())
    assert info.value.code == "invalid_handoff"


def test_nan_in_the_response_is_refused(device_pipeline):
    with RawServer(lambda raw, i: http_response(200, fake_handoff(body_of(raw), float("nan")))) as server:
        with pytest.raises(BadResponse, match="non-finite"):
            client_for(server.url)(steps_request().to_bytes())
        # through the app entry point: refused before any device step runs
        steps = []
        with pytest.raises(BadResponse, match="non-finite"):
            generate_image(PROMPT, client_for(server.url), device_pipeline,
                           GenerationConfig(num_inference_steps=4, switch_step=2, seed=1),
                           on_step=lambda i, n: steps.append(i))
        assert steps == []


@pytest.mark.parametrize("case", ["content-type", "other-request", "wrong-n", "garbage", "too-large", "not-http"])
def test_invalid_responses_are_refused(case):
    def respond(raw, i):
        body = body_of(raw)
        if case == "content-type":
            return http_response(200, fake_handoff(body), "text/html")
        if case == "other-request":
            return http_response(200, fake_handoff(steps_request(seed=2).to_bytes()))
        if case == "wrong-n":
            return http_response(200, fake_handoff(steps_request(candidates=("a", "b", "c")).to_bytes()))
        if case == "garbage":
            return http_response(200, b"\x00" * 64)
        if case == "too-large":
            return http_response(200, b"", content_length=10 ** 12)
        return b"hello there\r\n\r\n"

    with RawServer(respond) as server:
        with pytest.raises(BadResponse) as info:
            client_for(server.url, retries=0)(steps_request().to_bytes())
    code = {"content-type": "bad_content_type", "too-large": "response_too_large", "not-http": "bad_http"}
    assert info.value.code == code.get(case, "invalid_handoff")


# -- errors by what the caller must do (runtime/errors.py) ----------------------------------------
def handoff_for_device(request_bytes: bytes, pipeline, scale: float = 1.0) -> bytes:
    """An answer the device accepts up to verification: its schedule, its latent shape; member 0 x scale."""
    from obclip.runtime.solver import make_schedule

    req = StepsRequest.from_bytes(request_bytes)
    shape = pipeline.engines.latent_shape(req.height, req.width)
    lat = np.random.default_rng(0).standard_normal((req.n, *shape)).astype(np.float32)
    lat[0] *= scale
    timesteps = make_schedule(pipeline.solver_config, req.num_inference_steps).timesteps
    return encode_handoff(req, lat, np.zeros_like(lat), lower_order_nums=1, step_index=req.switch_step,
                          timesteps=timesteps, cloud_model="fake")


def app_retrying_service_errors(prompt, client, pipeline, config, attempts=3):
    """What an app may write: retry the retryable kind, a few times."""
    for attempt in range(attempts):
        try:
            return generate_image(prompt, client, pipeline, config)
        except ServiceError:
            if attempt == attempts - 1:
                raise


@pytest.mark.parametrize("poison", ["envelope", "garbage"])
def test_an_apps_retry_of_service_errors_does_not_catch_an_untrusted_answer(engines_dir, poison):
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline
    from obclip.device.verify import VerificationError, VerifyConfig

    pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir))))
    pipeline.verify_config = VerifyConfig()   # the envelope, as for a trained model
    config = GenerationConfig(num_inference_steps=4, switch_step=2, seed=1)

    def respond(raw, i):
        if poison == "garbage":
            return http_response(200, b"\x00" * 64)
        return http_response(200, handoff_for_device(body_of(raw), pipeline, scale=1e4))

    with RawServer(respond) as server:
        client = client_for(server.url, retries=3)
        with pytest.raises(UntrustedAnswerError) as info:
            app_retrying_service_errors(PROMPT, client, pipeline, config)
        assert len(server.requests) == 1, "an untrusted answer was retried"
    expected = VerificationError if poison == "envelope" else BadResponse
    assert type(info.value) is expected
    for kind in (ServiceError, InputError, ValueError):   # no handler for another kind catches it
        assert not isinstance(info.value, kind), kind


def test_an_honest_answer_passes_the_same_path(engines_dir):
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline

    pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines_dir))))
    with RawServer(lambda raw, i: http_response(200, handoff_for_device(body_of(raw), pipeline))) as server:
        result = app_retrying_service_errors(PROMPT, client_for(server.url), pipeline,
                                             GenerationConfig(num_inference_steps=4, switch_step=2, seed=1))
    assert result.image.ndim == 3


def test_each_kind_has_one_exit_code_and_one_http_status():
    kinds = [InputError, ServiceError, UntrustedAnswerError, ArtifactError]
    assert [k.exit_code for k in kinds] == [2, 3, 4, 5]
    assert [k.http_status for k in kinds] == [422, 503, 502, 500]
    assert [k.retryable for k in kinds] == [False, True, False, False]
    # the client's classes, each under exactly one kind
    for cls, kind in [(ServiceRejected, InputError), (ServiceUnavailable, ServiceError),
                      (ServiceTimeout, ServiceError), (ServiceFailed, ServiceError),
                      (BadResponse, UntrustedAnswerError), (ProtocolError, InputError),
                      (HandoffError, UntrustedAnswerError)]:
        assert [k for k in kinds if issubclass(cls, k)] == [kind], cls
        assert cls.exit_code == kind.exit_code and cls.http_status == kind.http_status
        assert getattr(obclip, cls.__name__) is cls   # exported


def test_the_service_answers_each_kind_with_its_status():
    from obclip.cloud.answers import ErrorAnswer
    from obclip.runtime.protocol import LimitExceeded

    cases = [(InputError("x"), 422, None), (ServiceError("x"), 503, "7"), (UntrustedAnswerError("x"), 502, None),
             (ArtifactError("x"), 500, None), (RuntimeError("a bug"), 500, None),
             (ProtocolError("not JSON", "malformed_json", 400), 400, None),
             (LimitExceeded("body_too_large", "max_body_bytes", 1, 2, "the body", status=413), 413, None)]
    for error, status, retry in cases:
        answer = ErrorAnswer.of(error, retry_after_s=7)
        assert answer.status == status and answer.headers.get("Retry-After") == retry, error
    assert ErrorAnswer.of(RuntimeError("secret detail"), 7).message.startswith("the service failed")


@pytest.mark.parametrize("error, code, first_line", [
    (lambda: VerificationError("member rms too large"), 4, UntrustedAnswerError.summary),
    (lambda: BadResponse("not a handoff", code="invalid_handoff"), 4, "the server's answer failed verification"),
    (lambda: ServiceUnavailable("could not connect"), 3, "could not connect"),
    (lambda: ServiceRejected("refused (422 too_many_candidates)"), 2, "refused"),
    (lambda: ArtifactError("no device engines"), 5, "no device engines"),
])
def test_run_reported_exits_by_kind(error, code, first_line, capsys):
    from obclip.device.cli import run_reported

    def work():
        raise error()

    assert run_reported(work) == code
    assert first_line in capsys.readouterr().err


def test_run_reported_does_not_treat_every_value_error_as_input():
    from obclip.device.cli import run_reported

    def buggy():
        raise ValueError("a bug, not the user's input")

    with pytest.raises(ValueError, match="a bug"):
        run_reported(buggy)


def test_cli_exits_4_on_an_untrusted_answer(engines_dir, tmp_path, capsys):
    from obclip.device.generate import main

    with RawServer(lambda raw, i: http_response(200, b"\x00" * 64)) as server:
        code = main([PROMPT, "--server", server.url, "--engines", str(engines_dir), "--steps", "4", "-k", "2",
                     "--out", str(tmp_path / "x.png")])
        assert len(server.requests) == 1
    err = capsys.readouterr().err
    assert code == UntrustedAnswerError.exit_code == 4
    assert "the server's answer failed verification; nothing was resent" in err
    assert not (tmp_path / "x.png").exists()


def test_client_config_is_validated():
    for url in ("localhost:8000", "ftp://host", "http://", "http://host/?q=1"):
        with pytest.raises(ValueError):
            ClientConfig(url)
    with pytest.raises(ValueError):
        ClientConfig("http://host", retries=-1)
    with pytest.raises(ValueError):
        ClientConfig("http://host", timeout_s=0)


def test_client_sends_only_standard_library_http():
    out = subprocess.run([sys.executable, "-c", "import obclip.device.client, obclip.device.generate, sys; "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                          "{'requests', 'httpx', 'urllib3', 'aiohttp', 'starlette', 'uvicorn', 'torch'}))"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
