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

Errors, all subclasses of ``ServiceError`` (status, code, message):
  ServiceRejected     4xx: the server's error code and message (never retried)
  ServiceUnavailable  connection errors and 503, after the retries
  ServiceTimeout      no complete answer within ``timeout_s``, or 504
  ServiceFailed       other 5xx
  BadResponse         a 200 whose body is not a valid handoff for this request:
                      wrong content type, truncated, wrong version, shapes,
                      dtype, N, request hash, or NaN/inf (also a ProtocolError)
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import ssl
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from obclip.runtime.protocol import (
    HANDOFF_MEDIA_TYPE,
    REQUEST_MEDIA_TYPE,
    STEPS_PATH,
    Handoff,
    ProtocolError,
    StepsRequest,
    decode_handoff,
    parse_error_body,
)

from .engines import DeviceEngines, EngineConfig
from .pipeline import DevicePipeline, GenerationConfig, GenerationResult

USER_AGENT = "obclip-device/1"


class ServiceError(Exception):
    """The cloud service did not answer with a usable handoff."""

    def __init__(self, text: str, *, status: int | None = None, code: str = "service_error",
                 message: str | None = None):
        super().__init__(text)
        self.status, self.code = status, code
        self.message = text if message is None else message  # the server's own message where it sent one


class ServiceRejected(ServiceError):
    """4xx: the server refused this request; ``code`` and ``message`` are the server's."""


class ServiceUnavailable(ServiceError):
    """Could not reach the service, or it stayed busy (503), after all retries."""


class ServiceTimeout(ServiceError):
    """No complete answer in time (client timeout or the server's 504)."""


class ServiceFailed(ServiceError):
    """The server failed (5xx other than 503/504)."""


class BadResponse(ServiceError, ProtocolError):
    """A 200 whose body is not a valid handoff for our request."""


@dataclass(frozen=True)
class ClientConfig:
    url: str                          # base URL of the service, e.g. http://127.0.0.1:8000
    timeout_s: float = 300.0          # one attempt, from connect to the last byte of the answer
    connect_timeout_s: float = 10.0   # the TCP (and TLS) connect of one attempt
    retries: int = 3                  # extra attempts after connection errors and 503
    backoff_s: float = 0.5            # wait before the first retry; doubles each time
    max_backoff_s: float = 10.0       # cap on a wait, the server's Retry-After included
    max_response_bytes: int = 512 * 1024 * 1024
    ca_file: str | None = None        # https: CA bundle (default: the system's)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL {self.url!r} must look like http://host:port or https://host")
        if parts.query or parts.fragment:
            raise ValueError(f"server URL {self.url!r} must not carry a query or fragment")
        for name in ("timeout_s", "connect_timeout_s", "max_backoff_s"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not isinstance(self.backoff_s, (int, float)) or not math.isfinite(self.backoff_s) or self.backoff_s < 0:
            raise ValueError(f"backoff_s must be a number >= 0, got {self.backoff_s!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an integer >= 0, got {self.retries!r}")
        if not isinstance(self.max_response_bytes, int) or self.max_response_bytes < 1:
            raise ValueError(f"max_response_bytes must be a positive integer, got {self.max_response_bytes!r}")


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
    def __init__(self, error: ServiceError, delay: float | None = None):
        self.error, self.delay = error, delay


class _Truncated(Exception):
    pass


def _claimed_latent_shape(data: bytes) -> tuple[int, ...]:
    """The per-candidate latent shape the handoff says it holds (checked again by decode_handoff)."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8:
            raise ValueError
        shape = json.loads(json.loads(data[8:8 + n].decode("utf-8"))["__metadata__"]["latent_shape"])
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(s) is int and s > 0 for s in shape)):
            raise ValueError
        return tuple(shape)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return (0, 0, 0)  # decode_handoff names what is wrong


def check_handoff(data: bytes, request: StepsRequest,
                  expected_latent_shape: tuple[int, int, int] | None = None) -> Handoff:
    """Full validation of a handoff against our request: format version, request hash, N, T, k,
    timesteps, dtype, tensor shapes (against ``expected_latent_shape`` when given, else against
    the shape the handoff's metadata states) and finite values. Raises BadResponse."""
    shape = expected_latent_shape or _claimed_latent_shape(data)
    try:
        return decode_handoff(data, request, shape)
    except ProtocolError as e:
        raise BadResponse(f"the service's answer is not a valid handoff: {e}", status=200,
                          code="invalid_handoff") from None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _server_timing(value: str | None) -> dict[str, float]:
    out = {}
    for part in (value or "").split(","):
        name, _, rest = part.strip().partition(";")
        for param in rest.split(";"):
            k, _, v = param.strip().partition("=")
            if k == "dur":
                try:
                    out[name.strip()] = float(v) / 1e3
                except ValueError:
                    pass
    return out


class ServiceClient:
    """``CloudTransport`` over HTTP: ``client(request_bytes) -> Handoff``, validated against the
    request (the pipeline uses it as is, without parsing the bytes again).

    Safe to share between threads for calls; ``last_call`` is the stats of the latest call made.
    """

    def __init__(self, config: ClientConfig | str):
        self.config = ClientConfig(config) if isinstance(config, str) else config
        parts = urllib.parse.urlsplit(self.config.url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._base = parts.path.rstrip("/")
        self.last_call: CallStats | None = None

    # -- public ---------------------------------------------------------------------------------
    def __call__(self, request_bytes: bytes) -> Handoff:
        request = StepsRequest.from_bytes(request_bytes)  # our own bytes: a ProtocolError here is a device bug
        cfg = self.config
        stats = CallStats()
        t0 = time.monotonic()
        try:
            error: ServiceError | None = None
            for attempt in range(cfg.retries + 1):
                stats.attempts = attempt + 1
                try:
                    status, headers, body = self._exchange("POST", STEPS_PATH, request_bytes, stats)
                    return self._accept(status, headers, body, request, stats)
                except _Retryable as r:
                    error = r.error
                    if attempt == cfg.retries:
                        break
                    delay = r.delay if r.delay is not None else cfg.backoff_s * 2 ** attempt
                    time.sleep(min(delay, cfg.max_backoff_s))
            assert error is not None
            error.args = (f"{error.args[0]} (gave up after {stats.attempts} attempt(s))",)
            raise error
        finally:
            stats.total_s = time.monotonic() - t0
            self.last_call = stats

    def ready(self) -> bool:
        """True when GET /readyz answers 200 (one attempt, no retries)."""
        try:
            status, _, _ = self._exchange("GET", "/readyz", None, CallStats())
        except (_Retryable, ServiceError):
            return False
        return status == 200

    # -- one attempt ----------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        timeout = min(self.config.connect_timeout_s, self.config.timeout_s)
        if self._https:
            ctx = ssl.create_default_context(cafile=self.config.ca_file)
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=ctx)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self, body: bytes | None) -> dict[str, str]:
        # Fixed: nothing here may vary with the request beyond its length, which is the same
        # for every member of a candidate set (their bytes are identical).
        h = {"User-Agent": USER_AGENT, "Accept": HANDOFF_MEDIA_TYPE, "Connection": "close"}
        if body is not None:
            h["Content-Type"] = REQUEST_MEDIA_TYPE
            h["Content-Length"] = str(len(body))
        return h

    def _exchange(self, method: str, path: str, body: bytes | None, stats: CallStats):
        """One HTTP exchange -> (status, lower-cased headers, body). Connection trouble -> _Retryable."""
        cfg = self.config
        url = self.config.url
        deadline = time.monotonic() + cfg.timeout_s
        conn = self._connection()

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            return left

        try:
            conn.connect()
            conn.sock.settimeout(remaining())
            conn.request(method, self._base + path, body=body, headers=self._headers(body))
            stats.bytes_sent += len(body or b"")
            sock = conn.sock
            sock.settimeout(remaining())
            # With Connection: close, getresponse() closes the connection's socket object (the
            # response reads through its own file); keep it open so the read deadline can be set.
            conn.close = lambda: None
            resp = conn.getresponse()
            headers = {k.lower(): v for k, v in resp.getheaders()}
            try:
                data = self._read_body(resp, sock, remaining)
            finally:
                resp.close()
            stats.bytes_received += len(data)
            return resp.status, headers, data
        except TimeoutError:
            raise ServiceTimeout(f"no complete answer from {url} within timeout_s={cfg.timeout_s:g} s",
                                 code="client_timeout") from None
        except _Truncated as e:
            raise _Retryable(BadResponse(f"the answer from {url} was truncated: {e} "
                                         "(the connection closed mid-response)", code="truncated")) from None
        except ConnectionRefusedError:
            raise _Retryable(ServiceUnavailable(f"could not connect to {url}: connection refused "
                                                "(is the service running?)", code="connection_refused")) from None
        except (http.client.RemoteDisconnected, ConnectionError) as e:
            raise _Retryable(ServiceUnavailable(
                f"the connection to {url} failed: {type(e).__name__}: {e}"
                " (server down, restarting or killed mid-request)", code="connection_error")) from None
        except http.client.IncompleteRead as e:
            raise _Retryable(BadResponse(f"the answer from {url} was truncated: got {len(e.partial)} bytes "
                                         "of a chunked body (the connection closed mid-response)",
                                         code="truncated")) from None
        except http.client.HTTPException as e:
            raise BadResponse(f"{url} did not answer valid HTTP: {type(e).__name__}: {e}",
                              code="bad_http") from None
        except ssl.SSLError as e:
            raise ServiceUnavailable(f"TLS with {url} failed: {e}", code="tls_error") from None
        except OSError as e:  # refused, unreachable, DNS, reset, ...
            raise _Retryable(ServiceUnavailable(f"could not connect to {url}: {type(e).__name__}: {e}",
                                                code="connection_error")) from None
        finally:
            http.client.HTTPConnection.close(conn)

    def _read_body(self, resp, sock, remaining: Callable[[], float]) -> bytes:
        limit = self.config.max_response_bytes
        length = resp.length  # Content-Length, or None for chunked / read-to-close
        if length is not None and length > limit:
            raise BadResponse(f"the answer is {length} bytes, over max_response_bytes={limit}",
                              code="response_too_large")
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
                raise BadResponse(f"the answer exceeds max_response_bytes={limit}", code="response_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- interpreting the answer ----------------------------------------------------------------
    def _accept(self, status: int, headers: dict, body: bytes, request: StepsRequest, stats: CallStats) -> Handoff:
        url = self.config.url
        if status == 200:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != HANDOFF_MEDIA_TYPE:
                raise BadResponse(f"{url} answered 200 with Content-Type {ctype or 'none'!r}, not "
                                  f"{HANDOFF_MEDIA_TYPE}: is this an obclip service?", status=200,
                                  code="bad_content_type")
            handoff = check_handoff(body, request)
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
            return parsed
        text = body[:200].decode("utf-8", "replace").strip()
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
    client = server if isinstance(server, ServiceClient) else ServiceClient(server)
    return pipeline.generate(prompt, client, config, on_step=on_step)
