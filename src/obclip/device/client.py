"""The device's HTTP client for the cloud service (standard library only).

``ServiceClient`` is a ``device.pipeline.CloudTransport``: request bytes in,
handoff bytes out, so the pipeline does not change:

    from obclip.device.client import ServiceClient, generate_image
    result = generate_image("a photo of an old woman", "http://127.0.0.1:8000", "engines/device")
    result.save_png("out.png")

What it sends does not depend on which candidate is real: the body is the
request bytes as given (identical for every member of a candidate set), and
the headers are fixed (method, path, Host, Content-Type, Accept, User-Agent,
Content-Length, Connection: close, Accept-Encoding: identity); no request
ids, no timestamps, no cookies. A retry sends the same bytes again.

Errors, by what the caller must do (runtime/errors.py); each carries ``status``, ``code`` and
``message``, and nothing else escapes a call, whatever the server sends:
  ServiceRejected     4xx: the server refused this request, with its error code and message.
                      An ``InputError``: change the request; the same bytes would be refused again,
                      so it is never retried.
  ServiceUnavailable  connection errors, 503, and an answer cut short by the connection closing
                      (code "truncated": a transport failure, before any byte of it is read as an
                      answer), after the retries. A ``ServiceError``: may be retried.
  ServiceTimeout      no complete answer within ``timeout_s``, or 504. A ``ServiceError``.
  ServiceFailed       other 5xx. A ``ServiceError``.
  BadResponse         an answer that is not a valid one for this request: not HTTP, over the
                      size cap, wrong content type or status, a handoff that does not decode
                      (wrong version, shapes, dtype, N, request hash, malformed header or
                      metadata, NaN/inf); the ``code`` says which. An ``UntrustedAnswerError``,
                      like a failed verification: it fails closed, is never retried and the
                      request must not be resent (a hostile server could answer one member's
                      guess with garbage and watch for the retry).

The retry rule is the kind's ``retryable``: this client retries connection errors, 503 and
truncation itself (same bytes, ``retries`` times); an app may retry a ``ServiceError`` later,
never an ``InputError`` or an ``UntrustedAnswerError``.

Hostile servers: ``timeout_s`` is one deadline for the whole call (connect,
send, status line, headers, body, every retry and every wait between them),
enforced by a watchdog that shuts the socket down when it passes, so a server
that drips its headers, its body or endless ``100 Continue`` lines cannot hold
the device. The answer may not be larger than a handoff for this request can
be (N, image size, wire dtype; exact when the latent shape is known, as in
``generate_image``) plus a small header allowance; error bodies are capped at
64 KiB.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import socket
import ssl
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from obclip.runtime.errors import InputError, ObclipError, ServiceError, UntrustedAnswerError
from obclip.runtime.options import check_fields, option
from obclip.runtime.protocol import (
    HANDOFF_MEDIA_TYPE,
    MAX_HANDOFF_HEADER_BYTES,
    REQUEST_MEDIA_TYPE,
    STEPS_PATH,
    WIRE_DTYPES,
    Handoff,
    HandoffError,
    StepsRequest,
    decode_handoff,
    parse_error_body,
)

from .engines import DeviceEngines, EngineConfig
from .pipeline import DevicePipeline, GenerationConfig, GenerationResult

USER_AGENT = "obclip-device/1"
ERROR_BODY_CAP = 64 * 1024            # an error answer is a short JSON object
# Without the model's latent shape, a bound on latent values per image pixel: C / f^2 <= 1
# (SD: 4 / 64; 16 channels at f = 4 still fit).
MAX_LATENT_VALUES_PER_PIXEL = 1
LatentShape = Callable[[int, int], tuple[int, int, int]]


class _FromService(ObclipError):
    """A client error: the HTTP ``status`` (None before one arrived), a stable ``code`` and the
    server's own ``message`` where it sent one."""

    def __init__(self, text: str, *, status: int | None = None, code: str | None = None,
                 message: str | None = None):
        super().__init__(text, code=code)
        self.status = status
        self.message = text if message is None else message


class ServiceRejected(_FromService, InputError):
    """4xx: the server refused this request; ``code`` and ``message`` are the server's. Not retried."""


class ServiceUnavailable(_FromService, ServiceError):
    """Could not reach the service, it stayed busy (503), or the answer was cut short, after all retries."""


class ServiceTimeout(_FromService, ServiceError):
    """No complete answer in time (client deadline or the server's 504)."""


class ServiceFailed(_FromService, ServiceError):
    """The server failed (5xx other than 503/504)."""


class BadResponse(_FromService, UntrustedAnswerError):
    """An answer that is not a valid one for our request; ``code`` names the defect. Never retried."""


@dataclass(frozen=True)
class ClientConfig:
    url: str = option(help="base URL of the service, e.g. http://127.0.0.1:8000", cli=False)
    timeout_s: float = option(300.0, "seconds for the whole call: connect, send, wait, download and retries",
                              gt=0, flag="--timeout")
    connect_timeout_s: float = option(10.0, "seconds for the TCP (and TLS) connect of one attempt", gt=0,
                                      flag="--connect-timeout")
    retries: int = option(3, "retries on connection errors, truncated answers and 503", ge=0)
    backoff_s: float = option(0.5, "seconds before the first retry; doubles each time", ge=0, flag="--backoff")
    max_backoff_s: float = option(10.0, "cap on a wait between retries, the server's Retry-After included", gt=0,
                                  flag="--max-backoff")
    # Cap on a 200 answer; None: derived from the request (response_cap). A set value caps it further.
    max_response_bytes: int | None = option(None, "cap on an answer's bytes (default: the most a valid answer "
                                            "to the request can take)", ge=1)
    ca_file: str | None = option(None, "https: CA bundle (default: the system's)")

    def __post_init__(self) -> None:
        check_fields(self)
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"server URL {self.url!r} must look like http://host:port or https://host")
        if parts.query or parts.fragment:
            raise InputError(f"server URL {self.url!r} must not carry a query or fragment")


def response_cap(request: StepsRequest, latent_shape: LatentShape | None = None) -> int:
    """The most bytes a valid handoff for ``request`` can take: two [N, C, h, w] tensors in the
    wire dtype plus the header allowance. Exact with the model's ``latent_shape``; otherwise
    bounded by MAX_LATENT_VALUES_PER_PIXEL."""
    if latent_shape is not None:
        c, h, w = latent_shape(request.height, request.width)
        values = c * h * w
    else:
        values = MAX_LATENT_VALUES_PER_PIXEL * request.height * request.width
    itemsize = np.dtype(WIRE_DTYPES[request.wire_dtype]).itemsize
    return 2 * request.n * values * itemsize + 8 + MAX_HANDOFF_HEADER_BYTES


@dataclass
class CallStats:
    """What the last call cost; seconds are wall clock on the device."""

    attempts: int = 0
    total_s: float = 0.0              # the whole call, waits between retries included
    server_queue_s: float | None = None  # from the server's Server-Timing header
    server_run_s: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def transfer_s(self) -> float | None:
        """Network and HTTP overhead: the call minus the server's queue and model time."""
        if self.server_run_s is None:
            return None
        return max(0.0, self.total_s - self.server_run_s - (self.server_queue_s or 0.0))


class _Retryable(Exception):
    """A failure the client retries itself (a ServiceError kind: connection, 503, truncation)."""

    def __init__(self, error: ServiceUnavailable, delay: float | None = None):
        self.error, self.delay = error, delay


class _Truncated(Exception):
    pass


class _Expired(Exception):
    """The call's deadline passed."""


def _claimed_latent_shape(data: bytes) -> tuple[int, int, int]:
    """The per-candidate latent shape the handoff says it holds (checked again by decode_handoff)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > min(len(data) - 8, MAX_HANDOFF_HEADER_BYTES):
            raise ValueError
        shape = json.loads(json.loads(data[8:8 + n].decode("utf-8"))["__metadata__"]["latent_shape"])
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(s) is int and 0 < s < 2**31 for s in shape)):
            raise ValueError
        return (shape[0], shape[1], shape[2])
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        return (0, 0, 0)  # decode_handoff names what is wrong


def check_handoff(data: bytes, request: StepsRequest,
                  expected_latent_shape: tuple[int, int, int] | None = None) -> Handoff:
    """Full validation of a handoff against our request: format version, request hash, N, T, k,
    timesteps, dtype, tensor shapes (against ``expected_latent_shape`` when given, else against
    the shape the handoff's metadata states) and finite values. Raises BadResponse."""
    shape = expected_latent_shape or _claimed_latent_shape(data)
    try:
        return decode_handoff(data, request, shape)
    except HandoffError as e:
        raise BadResponse(f"the service's answer is not a valid handoff: {e}", status=200,
                          code="invalid_handoff") from None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        delay = float(value)
        return max(0.0, delay) if math.isfinite(delay) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _server_timing(value: str | None) -> dict[str, float]:
    out = {}
    for part in (value or "").split(",")[:8]:
        name, _, rest = part.strip().partition(";")
        for param in rest.split(";"):
            k, _, v = param.strip().partition("=")
            if k == "dur":
                try:
                    seconds = float(v) / 1e3
                except ValueError:
                    continue
                if math.isfinite(seconds) and seconds >= 0:
                    out[name.strip()[:32]] = seconds
    return out


def _short(text: str, limit: int = 300) -> str:
    """Text from the server, cut to a readable length for an error message."""
    text = text.strip()
    return text if len(text) <= limit else text[:limit] + "..."


class _Connection(http.client.HTTPConnection):
    """http.client closes its socket once a ``Connection: close`` answer's head is read (the
    answer reads through its own file); the socket is kept so the deadline can act on it."""

    def close(self) -> None:
        pass

    def really_close(self) -> None:
        super().close()


class _TLSConnection(http.client.HTTPSConnection):
    def close(self) -> None:
        pass

    def really_close(self) -> None:
        super().close()


class ServiceClient:
    """``CloudTransport`` over HTTP: ``client(request_bytes) -> Handoff``, validated against the
    request (the pipeline uses it as is, without parsing the bytes again).

    ``latent_shape`` (the device model's ``(height, width) -> (C, h, w)``) makes the response
    cap and the shape check exact; without it they use the bound of ``response_cap``.
    Safe to share between threads for calls; ``last_call`` is the stats of the latest call made.
    """

    def __init__(self, config: ClientConfig | str, latent_shape: LatentShape | None = None):
        self.config = ClientConfig(config) if isinstance(config, str) else config
        parts = urllib.parse.urlsplit(self.config.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/")
        self.latent_shape = latent_shape
        self.last_call: CallStats | None = None

    # -- public ---------------------------------------------------------------------------------
    def __call__(self, request_bytes: bytes) -> Handoff:
        request = StepsRequest.from_bytes(request_bytes)  # our own bytes: a ProtocolError here is the caller's
        cfg = self.config
        stats = CallStats()
        t0 = time.monotonic()
        deadline = t0 + cfg.timeout_s
        cap = response_cap(request, self.latent_shape)
        if cfg.max_response_bytes is not None:
            cap = min(cap, cfg.max_response_bytes)
        expected = None
        if self.latent_shape is not None:
            expected = self.latent_shape(request.height, request.width)
        try:
            error: ServiceUnavailable | None = None
            for attempt in range(cfg.retries + 1):
                stats.attempts = attempt + 1
                try:
                    status, headers, body = self._exchange("POST", STEPS_PATH, request_bytes, stats, deadline,
                                                           cap)
                    return self._accept(status, headers, body, request, stats, expected)
                except _Retryable as r:
                    error = r.error
                    if attempt == cfg.retries:
                        break
                    delay = r.delay if r.delay is not None else cfg.backoff_s * 2 ** attempt
                    delay = min(delay, cfg.max_backoff_s)
                    if time.monotonic() + delay >= deadline:   # no time left for another attempt
                        break
                    time.sleep(delay)
            assert error is not None
            error.args = (f"{error.args[0]} (gave up after {stats.attempts} attempt(s))",)
            raise error
        finally:
            stats.total_s = time.monotonic() - t0
            self.last_call = stats

    def ready(self) -> bool:
        """True when GET /readyz answers 200 (one attempt, no retries, within timeout_s)."""
        try:
            status, _, _ = self._exchange("GET", "/readyz", None, CallStats(),
                                          time.monotonic() + self.config.timeout_s, ERROR_BODY_CAP)
        except (_Retryable, ObclipError):
            return False
        return status == 200

    # -- one attempt ----------------------------------------------------------------------------
    def _connection(self, timeout: float) -> _Connection | _TLSConnection:
        if self._https:
            ctx = ssl.create_default_context(cafile=self.config.ca_file)
            return _TLSConnection(self._host, self._port, timeout=timeout, context=ctx)
        return _Connection(self._host, self._port, timeout=timeout)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        # Fixed: nothing here may vary with the request beyond its length, which is the same
        # for every member of a candidate set (their bytes are identical).
        h = {"User-Agent": USER_AGENT, "Accept": HANDOFF_MEDIA_TYPE, "Connection": "close"}
        if body is not None:
            h["Content-Type"] = REQUEST_MEDIA_TYPE
            h["Content-Length"] = str(len(body))
        return h

    def _exchange(self, method: str, path: str, body: bytes | None, stats: CallStats, deadline: float,
                  cap: int) -> tuple[int, dict[str, str], bytes]:
        """One HTTP exchange before ``deadline`` -> (status, lower-cased headers, body). Connection
        trouble -> _Retryable; a malformed answer -> BadResponse; the deadline -> ServiceTimeout."""
        cfg = self.config
        url = cfg.url
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServiceTimeout(f"no complete answer from {url} within timeout_s={cfg.timeout_s:g} s",
                                 code="client_timeout")
        conn = self._connection(min(cfg.connect_timeout_s, left))
        expired = threading.Event()

        def watchdog() -> None:
            # The deadline, whatever the server does: a blocked read or write returns at once.
            expired.set()
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        timer = threading.Timer(left, watchdog)
        timer.daemon = True
        timer.start()
        try:
            return self._attempt(conn, method, path, body, stats, deadline, cap, expired)
        except (_FromService, _Retryable):
            if expired.is_set():
                raise self._timeout() from None
            raise
        except Exception as e:  # noqa: BLE001 - every failure of the exchange becomes a named error
            if expired.is_set() or isinstance(e, (TimeoutError, _Expired)):
                raise self._timeout() from None
            raise self._classify(e) from None
        finally:
            timer.cancel()
            conn.really_close()

    def _timeout(self) -> ServiceTimeout:
        return ServiceTimeout(f"no complete answer from {self.config.url} within timeout_s="
                              f"{self.config.timeout_s:g} s", code="client_timeout")

    def _attempt(self, conn: _Connection | _TLSConnection, method: str, path: str, body: bytes | None,
                 stats: CallStats, deadline: float, cap: int,
                 expired: threading.Event) -> tuple[int, dict[str, str], bytes]:
        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0 or expired.is_set():
                raise _Expired
            return left

        conn.connect()
        sock = conn.sock
        sock.settimeout(remaining())
        conn.request(method, self._base + path, body=body, headers=self._headers(body))
        stats.bytes_sent += len(body or b"")
        sock.settimeout(remaining())
        resp = conn.getresponse()   # http.client caps header lines (64 KiB) and their count (100)
        headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            data = self._read_body(resp, sock, remaining, cap if resp.status == 200 else ERROR_BODY_CAP)
        finally:
            resp.close()
        stats.bytes_received += len(data)
        return resp.status, headers, data

    def _classify(self, e: Exception) -> _FromService | _Retryable:
        """A failed exchange as the client's own error (retryable where the server may recover)."""
        url = self.config.url
        # A connection that closed mid-answer is a transport failure, not a verdict on the answer:
        # retried with the same bytes (a server killed mid-request, a restarting instance).
        if isinstance(e, _Truncated):
            return _Retryable(ServiceUnavailable(f"the answer from {url} was truncated: {e} (the connection "
                                                 "closed mid-response)", code="truncated"))
        if isinstance(e, http.client.IncompleteRead):
            return _Retryable(ServiceUnavailable(f"the answer from {url} was truncated: got {len(e.partial)} "
                                                 "bytes of a chunked body (the connection closed mid-response)",
                                                 code="truncated"))
        if isinstance(e, ConnectionRefusedError):
            return _Retryable(ServiceUnavailable(f"could not connect to {url}: connection refused "
                                                 "(is the service running?)", code="connection_refused"))
        if isinstance(e, (http.client.RemoteDisconnected, ConnectionError)):
            return _Retryable(ServiceUnavailable(
                f"the connection to {url} failed: {type(e).__name__}: {_short(str(e))}"
                " (server down, restarting or killed mid-request)", code="connection_error"))
        if isinstance(e, ssl.SSLError):
            return ServiceUnavailable(f"TLS with {url} failed: {_short(str(e))}", code="tls_error")
        if isinstance(e, OSError) and not isinstance(e, http.client.HTTPException):
            return _Retryable(ServiceUnavailable(f"could not connect to {url}: {type(e).__name__}: "
                                                 f"{_short(str(e))}", code="connection_error"))
        # http.client's own errors (bad status line, line too long, too many headers, bad chunk
        # sizes raise ValueError) and anything else the bytes provoke.
        return BadResponse(f"{url} did not answer valid HTTP: {type(e).__name__}: {_short(str(e))}",
                           code="bad_http")

    def _read_body(self, resp: http.client.HTTPResponse, sock: socket.socket, remaining: Callable[[], float],
                   limit: int) -> bytes:
        length = resp.length  # Content-Length, or None for chunked / read-to-close
        if length is not None and length > limit:
            raise BadResponse(f"the answer is {length} bytes, over the {limit} an answer to this request "
                              "can take", code="response_too_large")
        chunks, got = [], 0
        while True:
            sock.settimeout(remaining())
            want = 1 << 16 if length is None else min(1 << 16, length - got)
            if want == 0:
                break
            chunk = resp.read(want)
            if not chunk:
                if length is not None and got < length:
                    raise _Truncated(f"got {got} of the {length} bytes of Content-Length")
                break
            got += len(chunk)
            if got > limit:
                raise BadResponse(f"the answer exceeds the {limit} bytes an answer to this request can take",
                                  code="response_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- interpreting the answer ----------------------------------------------------------------
    def _accept(self, status: int, headers: dict[str, str], body: bytes, request: StepsRequest,
                stats: CallStats, expected: tuple[int, int, int] | None = None) -> Handoff:
        url = self.config.url
        if status == 200:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != HANDOFF_MEDIA_TYPE:
                raise BadResponse(f"{url} answered 200 with Content-Type {_short(ctype or 'none', 80)!r}, not "
                                  f"{HANDOFF_MEDIA_TYPE}: is this an obclip service?", status=200,
                                  code="bad_content_type")
            handoff = check_handoff(body, request, expected)
            timing = _server_timing(headers.get("server-timing"))
            stats.server_queue_s, stats.server_run_s = timing.get("queue"), timing.get("run")
            return handoff
        code, message = self._error_body(status, body)
        where = f"{url} answered {status} {code}: {message}"
        if status == 503:
            raise _Retryable(ServiceUnavailable(where, status=status, code=code, message=message),
                             delay=_retry_after(headers.get("retry-after")))
        if status == 504:
            raise ServiceTimeout(where, status=status, code=code, message=message)
        if 400 <= status < 500:
            raise ServiceRejected(f"the service refused the request ({status} {code}): {message}",
                                  status=status, code=code, message=message)
        if status >= 500:
            raise ServiceFailed(where, status=status, code=code, message=message)
        raise BadResponse(f"{url} answered an unexpected status {status}", status=status, code=f"http_{status}")

    @staticmethod
    def _error_body(status: int, body: bytes) -> tuple[str, str]:
        """The server's {"error": {"code", "message"}}, or a stand-in for a body without one."""
        parsed = parse_error_body(body)
        if parsed is not None:
            return _short(parsed[0], 64), _short(parsed[1])
        text = _short(body[:300].decode("utf-8", "replace"))
        return f"http_{status}", text or "(no error body)"


def generate_image(prompt: str, server: str | ClientConfig | ServiceClient,
                   engines: DevicePipeline | DeviceEngines | str | Path,
                   config: GenerationConfig = GenerationConfig(),
                   on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
    """The one entry point for apps: a prompt, the service, the device engines -> the image.

    ``server``: the service's URL, a ClientConfig or a ServiceClient. ``engines``: a folder with
    the exported manifest.json, loaded DeviceEngines, or a DevicePipeline (reuse one of the last
    two across calls: loading the ONNX sessions is the slow part). The result's ``image`` is an
    [H, W, 3] uint8 array; ``save_png(path)`` writes it. The prompt as typed never leaves the device.
    """
    if isinstance(engines, DevicePipeline):
        pipeline = engines
    elif isinstance(engines, DeviceEngines):
        pipeline = DevicePipeline(engines)
    else:
        pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=str(engines))))
    # The device model's latent shape makes the client's response cap and shape check exact.
    client = server if isinstance(server, ServiceClient) \
        else ServiceClient(server, latent_shape=pipeline.engines.latent_shape)
    return pipeline.generate(prompt, client, config, on_step=on_step)
