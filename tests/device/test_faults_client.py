"""The device client against hostile servers (raw sockets on 127.0.0.1): every class of bad
answer ends in the client's own named error (runtime/errors.py kinds: ServiceUnavailable,
ServiceTimeout, ServiceFailed may be retried; ServiceRejected is the request's fault; BadResponse, an
untrusted answer, fails closed) within the call's one deadline, and a bad answer is never retried."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from obclip.device.client import (
    BadResponse,
    ClientConfig,
    ServiceClient,
    ServiceRejected,
    ServiceTimeout,
    ServiceUnavailable,
    response_cap,
)
from obclip.runtime.errors import ObclipError
from obclip.runtime.protocol import StepsRequest, encode_handoff

DEADLINE_S = 0.8
SLACK_S = 1.0
SHAPE = (4, 16, 16)


def steps_request(**kw) -> StepsRequest:
    fields = dict(candidates=("a photo of a man", "a photo of a woman"), seed=1, num_inference_steps=4,
                  switch_step=2, guidance_scale=7.5, height=64, width=64)
    fields.update(kw)
    return StepsRequest(**fields)


REQUEST = steps_request()


def handoff(request: StepsRequest = REQUEST, value: float = 0.0, **meta) -> bytes:
    lat = np.full((request.n, *SHAPE), value, dtype=np.float32)
    data = encode_handoff(request, lat, lat.copy(), lower_order_nums=1, step_index=request.switch_step,
                          timesteps=list(range(request.num_inference_steps, 0, -1)), cloud_model="fake")
    if not meta:
        return data
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    for key, value in meta.items():
        if value is None:
            header["__metadata__"].pop(key)
        else:
            header["__metadata__"][key] = value
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def with_raw_header(raw: bytes) -> bytes:
    data = handoff()
    (n,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def answer(status: int, body: bytes = b"", ctype: str = "application/octet-stream", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n{extra}\r\n").encode() + body


class Hostile:
    """A server that reads a request, then runs ``behave(conn)`` (one thread per connection)."""

    def __init__(self, behave):
        self.behave, self.count = behave, 0
        self.stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn):
        with conn:
            data = b""
            conn.settimeout(5)
            try:
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                # Read the body too: closing a socket with unread bytes sends RST, and the client
                # would see a reset connection instead of the answer this server means to give.
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    body += chunk
                self.behave(conn, self.stop)
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.sock.close()


def drip(parts, pause: float = 0.1, forever: bytes | None = None):
    """Send ``parts`` with a pause between them, then ``forever`` every pause until stopped."""
    def behave(conn, stop):
        for part in parts:
            conn.sendall(part)
            if stop.wait(pause):
                return
        while forever is not None and not stop.wait(pause):
            conn.sendall(forever)
    return behave


def send(data: bytes):
    def behave(conn, stop):
        conn.sendall(data)
    return behave


def call(server: Hostile, retries: int = 3, **kw):
    client = ServiceClient(ClientConfig(server.url, timeout_s=DEADLINE_S, retries=retries, backoff_s=0.01,
                                        max_backoff_s=0.05, **kw))
    t0 = time.monotonic()
    try:
        client(REQUEST.to_bytes())
    except ObclipError as e:   # the root: nothing else may escape a call
        return e, time.monotonic() - t0
    raise AssertionError("the hostile answer was accepted")


# -- slow servers: one deadline for everything ---------------------------------------------------
@pytest.mark.parametrize("name, behave", [
    ("silent", lambda conn, stop: stop.wait(10)),
    ("headers dripped", drip([b"HTTP/1.1 200 OK\r\n"], forever=b"X-A: b\r\n")),
    ("status line dripped", drip([b"HTTP/1.1 "], pause=0.05, forever=b"2")),
    ("endless 100 Continue", drip([], pause=0.02, forever=b"HTTP/1.1 100 Continue\r\n\r\n")),
    ("body dripped", drip([answer(200, b"")[:-2].replace(b"Content-Length: 0", b"Content-Length: 99999")
                           + b"\r\n"], forever=b"x")),
    ("chunked body dripped", drip([b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n"], forever=b"1\r\nx\r\n")),
])
def test_a_slow_server_ends_in_a_timeout_at_the_deadline(name, behave):
    with Hostile(behave) as server:
        error, took = call(server)
    assert isinstance(error, ServiceTimeout) and error.code == "client_timeout", (name, error)
    assert took < DEADLINE_S + SLACK_S, (name, took)
    assert server.count == 1   # a timeout is not retried


def test_the_deadline_covers_retries_and_their_waits():
    busy = answer(503, json.dumps({"error": {"code": "overloaded", "message": "busy"}}).encode(),
                  "application/json", "Retry-After: 0\r\n")
    with Hostile(send(busy)) as server:
        client = ServiceClient(ClientConfig(server.url, timeout_s=DEADLINE_S, retries=1000, backoff_s=0.05,
                                            max_backoff_s=0.05))
        t0 = time.monotonic()
        with pytest.raises((ServiceUnavailable, ServiceTimeout)):
            client(REQUEST.to_bytes())
        assert time.monotonic() - t0 < DEADLINE_S + SLACK_S


# -- malformed answers: the client's named error, never retried ----------------------------------
DEEP = b"[" * 30_000 + b"]" * 30_000   # under the 64 KiB error-body cap


@pytest.mark.parametrize("name, raw, error, code", [
    ("not http", b"hello there\r\n\r\n", BadResponse, "bad_http"),
    ("bad status line", b"HTTP/1.1 abc OK\r\n\r\n", BadResponse, "bad_http"),
    ("header line too long", b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", BadResponse, "bad_http"),
    ("too many headers", b"HTTP/1.1 200 OK\r\n" + b"X: a\r\n" * 200 + b"\r\n", BadResponse, "bad_http"),
    ("bad chunk size", b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", ServiceUnavailable, "truncated"),
    ("deep json error body", answer(400, DEEP, "application/json"), ServiceRejected, "http_400"),
    ("error body too large", answer(400, b"x" * 200_000, "text/plain"), BadResponse, "response_too_large"),
    ("wrong content type", answer(200, handoff(), "text/html"), BadResponse, "bad_content_type"),
    ("content-length over the cap", answer(200, b"")[:-2].replace(b"Content-Length: 0", b"Content-Length: "
                                                                  + str(10**12).encode()) + b"\r\n",
     BadResponse, "response_too_large"),
    ("body over the cap", b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
                          + b"\0" * (response_cap(REQUEST) + 10), BadResponse, "response_too_large"),
    ("truncated", answer(200, handoff())[:-100], ServiceUnavailable, "truncated"),
    ("garbage", answer(200, b"\x00" * 64), BadResponse, "invalid_handoff"),
    ("deep json handoff header", answer(200, with_raw_header(b"[" * 20_000 + b"]" * 20_000)),
     BadResponse, "invalid_handoff"),
    ("deep json metadata", answer(200, handoff(timesteps="[" * 5000 + "]" * 5000)), BadResponse, "invalid_handoff"),
    ("metadata of the wrong type", answer(200, with_raw_header(json.dumps(
        {"__metadata__": {"format": ["x"], "n": {"a": 1}}, "latents": 3}).encode())), BadResponse,
     "invalid_handoff"),
    ("infinity in an integer field", answer(200, handoff(n="Infinity", step_index="1e999")), BadResponse,
     "invalid_handoff"),
    ("infinity in timesteps", answer(200, handoff(timesteps="[Infinity, 1e999, 3, 4]")), BadResponse,
     "invalid_handoff"),
    ("latent shape of the wrong type", answer(200, handoff(latent_shape='"abc"')), BadResponse, "invalid_handoff"),
    ("nan latents", answer(200, handoff(value=float("nan"))), BadResponse, "invalid_handoff"),
    ("another request's answer", answer(200, handoff(steps_request(seed=2))), BadResponse, "invalid_handoff"),
    ("unexpected status", answer(302, b"", extra="Location: http://elsewhere/\r\n"), BadResponse, "http_302"),
])
def test_a_malformed_answer_is_a_named_error_and_not_retried(name, raw, error, code):
    with Hostile(send(raw)) as server:
        e, took = call(server)
    assert type(e) is error and e.code == code, (name, type(e).__name__, e.code, str(e)[:300])
    assert len(str(e)) < 1000, name       # the message names the problem, it does not dump the answer
    # only an answer cut short by the connection closing is retried (a transport failure)
    assert took < DEADLINE_S + SLACK_S and server.count == (4 if code == "truncated" else 1), name


def test_the_response_cap_follows_the_request():
    small, big = response_cap(REQUEST), response_cap(steps_request(height=128, width=128))
    assert big > small and response_cap(steps_request(wire_dtype="float16")) < small
    exact = response_cap(REQUEST, lambda h, w: (4, h // 4, w // 4))
    assert exact == 2 * REQUEST.n * 4 * 16 * 16 * 4 + 8 + 64 * 1024
    assert len(handoff()) <= exact <= small


def test_a_valid_answer_still_passes():
    with Hostile(send(answer(200, handoff(value=0.5)))) as server:
        client = ServiceClient(ClientConfig(server.url, timeout_s=5, retries=0),
                               latent_shape=lambda h, w: (4, h // 4, w // 4))
        out = client(REQUEST.to_bytes())
    assert out.latents.shape == (2, *SHAPE) and float(out.latents[0, 0, 0, 0]) == 0.5
