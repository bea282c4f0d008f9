"""The cloud side as an HTTP service (ASGI: Starlette, served by uvicorn).

    POST /v1/steps   body: StepsRequest.to_bytes() (canonical JSON)
                     200: the handoff bytes (application/octet-stream), as
                     cloud.steps.CloudStepRunner.handle returns them
    GET  /healthz    200 while the process serves HTTP
    GET  /readyz     503 until the model is loaded and one warm-up request ran
    GET  /metrics    Prometheus text format

Every error is JSON, ``{"error": {"code": ..., "message": ...}}`` (plus
``"limit": {"name", "max", "got"}`` when a configured limit was hit), with a
4xx status for anything the client can fix, 503 (with Retry-After) when the
service cannot take the request now, 504 on timeout and 500 only for a bug
in the service; no request can crash the process.

Order of work for one request, cheapest first: readiness, header count and
size, body size (the Content-Length header, then the bytes actually read,
within ``body_timeout_s``), JSON, the request's fields (runtime.protocol:
finite numbers in range, valid Unicode text), the configured limits (N, T,
k, image size, guidance, the cost budget 2N x latent pixels x k against the
loaded model's real latent size, prompt length in characters and tokens),
the step plan; only then is the request queued for the model.

Bounded cost: the cost budget (``RequestLimits.max_cost``; by default
max_candidates candidates at the model's native size for 50 cloud steps) and
the image side (by default twice the native size) bound a request's time and
memory before it starts; a request whose deadline passes or whose client
disconnects stops at its next step boundary, so the worker is free again
within one step of the largest admitted request (``obclip_cancel_to_free_seconds``).

One worker thread runs all model work (load, warm-up, requests), so torch
never runs two batches at once. Cross-request batching: the worker takes the
first queued request and, for up to ``batch_window_ms``, every queued request
with the same T, k, size, guidance and acceleration (up to ``max_batch_rows``
UNet rows), and runs them as one batch (``CloudStepRunner.run_batch``); each
gets the bytes it would get alone. ``batch_window_ms=0``: one at a time. At most ``queue_size`` requests wait for
it; the next one gets 503 + Retry-After. A request that is not answered
within ``request_timeout_s`` of arriving gets 504: if its job has not
started it is dropped from the queue; if it is running, it stops before
its next cloud step (the step loop's ``before_step`` checks a cancel flag;
one step cannot be interrupted) and its result is discarded. A client that
disconnects while its request waits or runs cancels it the same way.

The HTTP front (header limits and timeouts, keep-alive, connection cap, JSON
answers for the HTTP parser's own errors) is ``HttpLimits``, enforced by
cloud/serve.py's uvicorn protocols; behind another server (Ray Serve, a
reverse proxy) that server must enforce what it parses.

Privacy: the candidates are never logged or written anywhere unless
``log_prompts`` is set (for debugging); logs carry N, T, k, size, dtype,
timings and sizes only, and error messages never quote a candidate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from obclip.runtime.plan import PRESETS, PlannedStep, make_plan, preset
from obclip.runtime.protocol import (
    HANDOFF_MEDIA_TYPE,
    REQUEST_MEDIA_TYPE,
    STEPS_PATH,
    LimitExceeded,
    ProtocolError,
    RequestLimits,
    StepsRequest,
    encode_handoff,
    error_body,
)

if TYPE_CHECKING:
    from .steps import CloudResult

log = logging.getLogger("obclip.service")


class StepRunner(Protocol):
    """What the worker runs requests on (cloud.steps.CloudStepRunner)."""

    def run(self, request: StepsRequest,
            before_step: Callable[[PlannedStep], None] | None = None) -> CloudResult: ...

    def run_batch(self, requests: Sequence[StepsRequest],
                  before_step: Callable[[PlannedStep], None] | None = None) -> list[CloudResult]: ...


def _positive(name: str, v: object) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive number, got {v!r}")


@dataclass(frozen=True)
class HttpLimits:
    """The HTTP front: what a connection may cost before and around a request. Enforced by the
    uvicorn protocols of cloud/serve.py (with h11 or httptools alike) and, for the header count
    and size, again by the app; behind a reverse proxy, set the proxy's equivalents no looser."""

    max_header_bytes: int = 16 * 1024   # request line + headers; more: 431
    max_headers: int = 64               # header fields; more: 431
    header_timeout_s: float = 10.0      # from connect (or the previous answer) to the end of the request head: 408
    keep_alive_s: float = 5.0           # an idle connection between requests is closed after this
    body_timeout_s: float = 30.0        # the request body, after its head: 408
    send_timeout_s: float = 60.0        # an answer the client does not read is dropped after this
    max_connections: int = 256          # open connections; more are answered 503 and closed at once

    def __post_init__(self) -> None:
        for name in ("max_header_bytes", "max_headers", "max_connections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("header_timeout_s", "keep_alive_s", "body_timeout_s", "send_timeout_s"):
            _positive(name, getattr(self, name))


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the service is started with; ``python -m obclip.cloud.serve --help`` maps flags to these."""

    model: str | None = None            # diffusers-layout directory or hub id; None: the embedded default
    device: str = "cpu"                 # torch device of the model ("cuda", "cuda:1", ...)
    dtype: str = "float32"              # torch dtype of the model: float32, float16, bfloat16
    host: str = "127.0.0.1"
    port: int = 8000
    # Limits (runtime/protocol.py), all checked before any model work; a violation is a 4xx naming the limit.
    # None fields (image size, cost budget) are resolved for the loaded model (RequestLimits.for_model).
    limits: RequestLimits = RequestLimits()
    http: HttpLimits = field(default_factory=HttpLimits)
    # The worker.
    queue_size: int = 8                 # requests waiting for the worker, beside the one it runs
    request_timeout_s: float = 120.0    # from arrival to answer, queue wait included
    retry_after_s: int = 1              # Retry-After on 503
    warmup: bool = True                 # /readyz stays 503 until one warm-up request ran
    torch_threads: int | None = None    # torch.set_num_threads in the worker (None: torch's default)
    # Cross-request batching: the worker waits up to batch_window_ms after taking a request for
    # more with the same T, k, size, guidance and acceleration, and runs them as one UNet batch
    # of at most max_batch_rows rows (2 x the candidates of all its requests). 0: one at a time.
    batch_window_ms: float = 10.0
    max_batch_rows: int = 64
    # A client that disconnects cancels its request (off where the server in front cannot tell).
    cancel_on_disconnect: bool = True
    # Privacy hygiene: candidates are logged only with this set (debugging only).
    log_prompts: bool = False
    # Backend (cloud engines issue): "torch" runs the model folder; "onnxruntime" the exported engines
    # folder ``engines`` (OUT/cloud, or OUT/cloud-fp16) without torch, on onnxruntime's ``providers``
    # (cpu, cuda, tensorrt).
    backend: str = "torch"
    engines: str | None = None
    providers: str = "cpu"
    # torch backend: torch.compile each step mode (on CUDA, "reduce-overhead" replays each mode and
    # shape as a CUDA graph; cloud/torch_backend.py). Each "PRESET:N" of compile_warmup runs once at
    # the native size before /readyz is ready, so those modes and shapes are compiled up front.
    compile: bool = False
    compile_warmup: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "onnxruntime") or (self.backend == "onnxruntime") != bool(self.engines):
            raise ValueError(f"backend must be torch, or onnxruntime with an engines folder; got backend="
                             f"{self.backend!r}, engines={self.engines!r}")
        if not isinstance(self.limits, RequestLimits):
            raise ValueError(f"limits must be a RequestLimits, got {type(self.limits).__name__}")
        if not isinstance(self.http, HttpLimits):
            raise ValueError(f"http must be an HttpLimits, got {type(self.http).__name__}")
        for name in ("queue_size", "max_batch_rows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        v = self.torch_threads
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"torch_threads must be an integer >= 1 or None, got {v!r}")
        if isinstance(self.retry_after_s, bool) or not isinstance(self.retry_after_s, int) or self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be an integer >= 0, got {self.retry_after_s!r}")
        if not (isinstance(self.request_timeout_s, (int, float)) and math.isfinite(self.request_timeout_s)
                and self.request_timeout_s > 0):
            raise ValueError(f"request_timeout_s must be a positive number of seconds, got {self.request_timeout_s!r}")
        if not (isinstance(self.batch_window_ms, (int, float)) and not isinstance(self.batch_window_ms, bool)
                and math.isfinite(self.batch_window_ms) and self.batch_window_ms >= 0):
            raise ValueError(f"batch_window_ms must be a number of milliseconds >= 0, got {self.batch_window_ms!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.compile and self.backend != "torch":
            raise ValueError("compile is for the torch backend (the onnxruntime backend runs exported graphs)")
        if self.compile_warmup and not self.compile:
            raise ValueError("compile_warmup needs compile")
        for entry in self.compile_warmup:
            compile_warmup_entry(entry, self.limits.max_candidates)   # raises on a bad entry


def compile_warmup_entry(entry: str, max_candidates: int) -> tuple[str, int]:
    """"PRESET:N" -> (preset name, N); a ValueError naming the expected form otherwise."""
    name, _, n = entry.partition(":")
    if name not in PRESETS or not n.isdigit() or not 1 <= int(n) <= max_candidates:
        raise ValueError(f"compile warm-up {entry!r}: expected PRESET:N with PRESET one of {sorted(PRESETS)} and "
                         f"N in 1..{max_candidates} (max_candidates), e.g. paper-k10:6")
    return name, int(n)


def compile_warmup_request(entry: str, max_candidates: int, size: int) -> StepsRequest:
    """"PRESET:N" -> a request of N placeholder candidates with that preset at ``size`` px."""
    name, n = compile_warmup_entry(entry, max_candidates)
    acc = preset(name)
    return StepsRequest(candidates=tuple(f"a photo number {i}" for i in range(n)), seed=0,
                        num_inference_steps=max(25, acc.switch_step), switch_step=acc.switch_step,
                        guidance_scale=7.5, height=size, width=size, acceleration=acc)


class ErrorAnswer(Exception):
    """An answer other than 200: status, a stable code, a message that never quotes a candidate."""

    def __init__(self, status: int, code: str, message: str, *, limit: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.headers = limit, headers or {}

    @classmethod
    def over_limit(cls, e: LimitExceeded) -> ErrorAnswer:
        return cls(e.status, e.code, str(e), limit=e.limit)

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.code, self.message, self.limit), status_code=self.status,
                            headers=self.headers)


def describe_request(request: StepsRequest, log_prompts: bool = False) -> str:
    """The request as it may be logged: shape and options; the candidates only with log_prompts."""
    acc = request.acceleration
    text = (f"N={request.n} T={request.num_inference_steps} k={request.switch_step} "
            f"size={request.height}x{request.width} dtype={request.wire_dtype} "
            f"accel={'none' if acc is None else f'r={acc.cache_step},s={acc.skip_step}'}")
    if log_prompts:
        text += f" candidates={list(request.candidates)!r}"
    return text


class Metrics:
    """Prometheus metrics, in a registry of their own (one per service)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("obclip_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("obclip_errors", "error answers by code", ["code"], registry=r)
        self.queue_depth = Gauge("obclip_queue_depth", "requests waiting for the model worker", registry=r)
        self.running = Gauge("obclip_jobs_running", "requests the model worker is running (0 or 1)", registry=r)
        self.cancelled = Counter("obclip_jobs_cancelled", "jobs abandoned after a timeout, by stage "
                                 "(queued: dropped before start; running: stopped between steps)", ["stage"],
                                 registry=r)
        self.batch_size = Histogram("obclip_batch_size", "requests per model batch",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.batch_rows = Histogram("obclip_batch_rows", "UNet rows per model batch (2 x its candidates)",
                                    buckets=(2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256), registry=r)
        self.step_latency = Histogram("obclip_step_latency_seconds", "one cloud step (guided UNet pass + solver)",
                                      buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.run_latency = Histogram("obclip_run_seconds", "model work of one request (text encoder + k steps)",
                                     buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.request_latency = Histogram("obclip_request_seconds", "POST /v1/steps, arrival to answer",
                                         buckets=(.01, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120), registry=r)
        self.ready = Gauge("obclip_ready", "1 once the model is loaded and warmed up", registry=r)
        self.cancel_to_free = Histogram(
            "obclip_cancel_to_free_seconds", "from the moment a running batch's last request was abandon"
            "ed (deadline passed, client gone) to the worker being free", registry=r,
            buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.worst_cancel_to_free = Gauge("obclip_worst_cancel_to_free_seconds",
                                          "the largest obclip_cancel_to_free_seconds so far", registry=r)
        self.worst_step = Gauge("obclip_worst_step_seconds", "the longest cloud step so far", registry=r)


class _Cancelled(Exception):
    """Raised inside the step loop (by ``before_step``) when the request was abandoned."""


@dataclass
class _Outcome:
    """What the worker hands a request's waiter: ok (data, run_s), cancelled, or error."""

    kind: str                           # "ok" | "cancelled" | "error"
    data: bytes = b""
    run_s: float = 0.0
    error: ErrorAnswer | None = None


class _Job:
    __slots__ = ("request", "deadline", "cancelled", "abandoned_at", "step_starts", "future", "taken", "key",
                 "rows")

    def __init__(self, request: StepsRequest, deadline: float = math.inf):
        from .steps import CloudStepRunner

        self.request = request
        self.deadline = deadline        # time.monotonic(): the worker stops the job at a step boundary after it
        self.cancelled = threading.Event()
        self.abandoned_at: float | None = None   # time.monotonic() of the abandonment (timeout, disconnect)
        self.step_starts: list[float] = []
        self.future: concurrent.futures.Future[_Outcome] = concurrent.futures.Future()   # set by the worker
        self.taken = False              # out of the queue (run, batched or dropped); under Service._lock
        self.key = CloudStepRunner.batch_key(request)
        self.rows = 2 * request.n

    def abandon(self, when: float | None = None) -> None:
        if self.abandoned_at is None:
            self.abandoned_at = time.monotonic() if when is None else when
        self.cancelled.set()


class Service:
    """The model, its worker thread, the queue bound and the metrics; the ASGI app is ``create_app``."""

    def __init__(self, config: ServiceConfig = ServiceConfig()):
        self.config = config
        self.metrics = Metrics()
        self.state = "created"          # created -> loading -> warming -> ready | failed; closed
        self.load_error: str | None = None
        self.model: Any = None
        self.runner: StepRunner | None = None
        self.model_id = ""
        # The configured limits with the model's defaults filled in once it is loaded.
        self.limits: RequestLimits = config.limits
        self.on_load_failed: Callable[[BaseException], None] | None = None
        self._token_counter: Callable[[str], int] | None = None
        self._context: int | None = None
        self._latent_shape: Callable[[int, int], tuple[int, int, int]] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="obclip-model")
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)   # notified when a job is queued
        self._pending: list[_Job] = []      # queued, not taken yet, in arrival order
        self._waiting = 0
        self._current: list[_Job] | None = None   # the batch the worker runs; close() cancels it
        self.worst_cancel_to_free_s = 0.0         # the cancellation bound actually measured
        self.worst_step_s = 0.0
        self.on_batch: Callable[[list[StepsRequest]], None] | None = None   # hook: each batch before it runs

    # -- lifecycle (the worker thread does all model work) -------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def start(self) -> concurrent.futures.Future:
        """Load and warm up the model on the worker; returns at once (/readyz tells when it is done)."""
        if self.state != "created":
            raise RuntimeError(f"service already started (state {self.state})")
        self.state = "loading"
        if self.config.log_prompts:
            log.warning("log_prompts is on: candidate prompts will be written to the log (debugging only)")
        return self._executor.submit(self._load)

    def _load(self) -> None:
        cfg = self.config
        try:
            from tokenizers import Tokenizer

            from .steps import CloudStepRunner

            t0 = time.perf_counter()
            # --- backend (cloud engines issue): torch on the model folder, or exported engines without torch
            if cfg.backend == "onnxruntime":
                from .engine_backend import OrtEngine

                engine = OrtEngine(str(cfg.engines), providers=cfg.providers, threads=cfg.torch_threads)
                model: Any = engine
                tokenizer_json, context = engine.tokenizer_json, engine.text_max_length
            else:
                import torch

                from .models import load_text_to_latent, resolve_model_dir

                if cfg.torch_threads is not None:
                    torch.set_num_threads(cfg.torch_threads)
                model_dir = resolve_model_dir(cfg.model, "cloud")
                model = load_text_to_latent(model_dir, device=cfg.device, dtype=getattr(torch, cfg.dtype))
                tokenizer_json = model.tokenizer.backend_tokenizer.to_str()
                context = int(model.tokenizer.model_max_length)
            # --- end backend
            # A tokenizer of its own for limit checks on the event loop: a tokenizers object is not
            # safe to use from two threads while the worker encodes.
            tok = Tokenizer.from_str(tokenizer_json)
            tok.no_truncation()
            tok.no_padding()
            self._token_counter = lambda text: len(tok.encode(text).ids)
            self._context = context
            self._latent_shape = model.latent_shape
            self.model, self.model_id = model, model.model_id
            self.limits = cfg.limits.for_model(model.default_image_size, model.latent_shape)
            if cfg.backend == "onnxruntime":
                self.runner = CloudStepRunner(engine=model, limits=self.limits)
            else:
                from .torch_backend import TorchEngine

                self.runner = CloudStepRunner(
                    engine=TorchEngine(model, compile_mode="reduce-overhead" if cfg.compile else None),
                    limits=self.limits)
            log.info("model %s loaded on %s (%s) in %.1f s", model.model_id, cfg.device, cfg.dtype,
                     time.perf_counter() - t0)
            if cfg.warmup:
                self.state = "warming"
                f = model.vae_scale_factor
                size = max(f, min(model.default_image_size, self.limits.max_image_size or f) // f * f)
                warm = StepsRequest(candidates=("a photo",), seed=0, num_inference_steps=2, switch_step=1,
                                    guidance_scale=7.5, height=size, width=size)
                t0 = time.perf_counter()
                self._run([_Job(warm)])
                log.info("warm-up request ran in %.2f s", time.perf_counter() - t0)
            for entry in cfg.compile_warmup:
                t0 = time.perf_counter()
                self._run([_Job(compile_warmup_request(entry, self.limits.max_candidates,
                                                       model.default_image_size))])
                log.info("compile warm-up %s ran in %.2f s", entry, time.perf_counter() - t0)
            self.state = "ready"
            self.metrics.ready.set(1)
            log.info("ready")
        except BaseException as e:  # noqa: BLE001 - reported on /readyz, and to the caller
            self.state = "failed"
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("could not load the model: %s", self.load_error)
            if self.on_load_failed is not None:
                self.on_load_failed(e)

    def close(self) -> None:
        """Stop taking work: drop queued jobs, stop the running one at its next step."""
        self.state = "closed"
        self.metrics.ready.set(0)
        with self._lock:
            dropped, self._pending = self._pending, []
            for job in dropped:
                job.taken = True
                self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)
        for job in dropped:
            job.abandon()
            job.future.cancel()
        batch = self._current
        for job in batch or ():
            job.abandon()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the worker side ------------------------------------------------------------------------
    @staticmethod
    def _before_step(batch: list[_Job], step_starts: list[float]) -> None:
        """Called by the step loop before each cloud step: the cancellation point (the batch stops
        only when every one of its jobs was abandoned or is past its deadline), and step timing."""
        now = time.monotonic()
        for job in batch:
            if not job.cancelled.is_set() and now > job.deadline:
                job.abandon(job.deadline)   # the waiter answers 504; the worker need not wait for it
        if all(job.cancelled.is_set() for job in batch):
            raise _Cancelled()
        step_starts.append(time.perf_counter())

    def _run(self, batch: list[_Job]) -> tuple[list[bytes | ErrorAnswer], float]:
        """Run a batch of jobs on the model (worker thread only): one handoff (or, for a result that
        is not finite, an ErrorAnswer) per job. Raises _Cancelled if every job was abandoned mid-way."""
        runner = self.runner
        if runner is None:
            raise RuntimeError("the model is not loaded")
        requests = [job.request for job in batch]
        step_starts: list[float] = []

        def before_step(step: PlannedStep) -> None:
            self._before_step(batch, step_starts)

        if self.on_batch is not None:
            self.on_batch(requests)
        self._current = batch
        try:
            t0 = time.perf_counter()
            if len(batch) == 1:
                results = [runner.run(requests[0], before_step=before_step)]
            else:
                results = runner.run_batch(requests, before_step=before_step)
            t1 = time.perf_counter()
        finally:
            self._current = None
            for job in batch:
                job.step_starts = step_starts
            self._observe_steps(step_starts)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_rows.observe(sum(job.rows for job in batch))
        self.metrics.run_latency.observe(t1 - t0)
        out: list[bytes | ErrorAnswer] = []
        for request, result in zip(requests, results):
            if not (np.isfinite(result.latents).all() and np.isfinite(result.prev_x0).all()):
                # e.g. an extreme guidance scale on a model that overflows: refuse, never send NaN.
                out.append(ErrorAnswer(422, "non_finite_result", "the model produced non-finite values for "
                                       f"this request (guidance_scale={request.guidance_scale:g}); "
                                       "lower guidance_scale"))
                continue
            out.append(encode_handoff(request, result.latents, result.prev_x0,
                                      lower_order_nums=result.lower_order_nums, step_index=result.step_index,
                                      timesteps=result.timesteps, cloud_model=self.model_id))
        return out, t1 - t0

    def _observe_steps(self, step_starts: list[float]) -> None:
        """Step latencies of a batch, ended by the next step's start or now (a stopped batch too)."""
        starts = step_starts + [time.perf_counter()]
        for a, b in zip(starts, starts[1:]):
            self.metrics.step_latency.observe(b - a)
            if b - a > self.worst_step_s:
                self.worst_step_s = b - a
                self.metrics.worst_step.set(b - a)

    def _take(self, job: _Job) -> bool:
        """Take a queued job out of the queue (under the lock). False if it was abandoned: it is dropped."""
        job.taken = True
        self._pending.remove(job)
        self._waiting -= 1
        self.metrics.queue_depth.set(self._waiting)
        if job.cancelled.is_set() or time.monotonic() > job.deadline \
                or not job.future.set_running_or_notify_cancel():
            job.abandon()
            self.metrics.cancelled.labels(stage="queued").inc()
            if not job.future.done():
                job.future.set_result(_Outcome("cancelled"))
            return False
        return True

    def _collect(self, first: _Job) -> list[_Job]:
        """The batch that starts with ``first``: jobs queued within the batching window with the same
        batch key, in arrival order, up to max_batch_rows rows (under the lock)."""
        cfg = self.config
        batch, rows = [first], first.rows
        if cfg.batch_window_ms <= 0:
            return batch
        deadline = time.monotonic() + cfg.batch_window_ms / 1e3
        while True:
            for job in list(self._pending):
                if job.key == first.key and rows + job.rows <= cfg.max_batch_rows and self._take(job):
                    batch.append(job)
                    rows += job.rows
            left = deadline - time.monotonic()
            if left <= 0 or rows + 2 > cfg.max_batch_rows or self.state == "closed":
                return batch
            self._arrived.wait(left)

    def _execute(self, job: _Job) -> None:
        """Worker entry for a queued request (one per request). A job another job's batch took, or one
        abandoned in the queue, returns at once; otherwise it leads a batch. Answers go to each job's
        future as an _Outcome, never raised."""
        with self._lock:
            if job.taken or not self._take(job):
                return
            batch = self._collect(job)
        self.metrics.running.set(1)
        answers: list[_Outcome]
        try:
            data, run_s = self._run(batch)
            answers = [_Outcome("error", error=d) if isinstance(d, ErrorAnswer) else _Outcome("ok", d, run_s)
                       for d in data]
        except _Cancelled:
            self._freed(batch)
            log.info("abandoned batch of %d stopped after %d step(s)", len(batch), len(job.step_starts))
            answers = [_Outcome("cancelled")] * len(batch)
        except (ProtocolError, ValueError) as e:
            # The checks before the queue should have caught it; still the client's request.
            answers = [_Outcome("error", error=ErrorAnswer(422, "invalid_request", str(e)))] * len(batch)
        except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, generic answer
            log.exception("model worker failed on a batch of %d (%s): %s", len(batch),
                          describe_request(job.request), type(e).__name__)
            answers = [_Outcome("error", error=ErrorAnswer(500, "internal", "the service failed on this request; "
                                                           "the failure is logged on the server"))] * len(batch)
        finally:
            self.metrics.running.set(0)
        if all(j.cancelled.is_set() for j in batch) and answers[0].kind != "cancelled":
            self._freed(batch)   # abandoned during its last step: finished anyway, free now
        for j, answer in zip(batch, answers):
            if j.cancelled.is_set():   # abandoned while running: its result is discarded
                self.metrics.cancelled.labels(stage="running").inc()
                answer = _Outcome("cancelled")
            j.future.set_result(answer)

    def _freed(self, batch: list[_Job]) -> None:
        """The worker is free after a batch every job of which was abandoned: record how long after
        the last abandonment (the cancellation bound: one step, plus the tail of the run)."""
        last = max((j.abandoned_at for j in batch if j.abandoned_at is not None), default=None)
        if last is None:
            return
        took = max(0.0, time.monotonic() - last)
        self.metrics.cancel_to_free.observe(took)
        if took > self.worst_cancel_to_free_s:
            self.worst_cancel_to_free_s = took
            self.metrics.worst_cancel_to_free.set(took)

    # -- the asyncio side -----------------------------------------------------------------------
    def check_limits(self, request: StepsRequest) -> None:
        """The configured limits, in the order of what they cost the server. No model work."""
        if self._latent_shape is not None:
            try:
                self._latent_shape(request.height, request.width)
            except ValueError as e:
                raise ErrorAnswer(422, "invalid_image_size", str(e)) from None
        try:
            self.limits.check(request, self._token_counter, self._context, self._latent_shape)
        except LimitExceeded as e:
            raise ErrorAnswer.over_limit(e) from None
        try:
            make_plan(request.num_inference_steps, request.switch_step, request.acceleration)
        except ValueError as e:
            raise ErrorAnswer(422, "invalid_request", f"no step plan for this request: {e}") from None

    async def submit(self, request: StepsRequest, deadline: float,
                     disconnected: Callable[[], Awaitable[object]] | None = None) -> tuple[bytes, float, float]:
        """Queue the request for the worker and wait until ``deadline`` (loop time, which is
        time.monotonic) or until ``disconnected()`` completes (the client went away): either way the
        job is abandoned and stops at its next step boundary.
        Returns (handoff bytes, seconds queued, seconds of model work)."""
        cfg = self.config
        retry = {"Retry-After": str(cfg.retry_after_s)}
        with self._lock:
            if self._waiting >= cfg.queue_size:
                raise ErrorAnswer(503, "overloaded", f"the service is busy ({self._waiting} requests waiting, "
                                   f"queue_size={cfg.queue_size}); retry later", headers=retry)
            job = _Job(request, deadline)
            self._waiting += 1
            self._pending.append(job)
            self.metrics.queue_depth.set(self._waiting)
            self._arrived.notify_all()
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        try:
            self._executor.submit(self._execute, job)
        except RuntimeError:  # executor shut down
            self._drop(job, count=False)
            raise ErrorAnswer(503, "shutting_down", "the service is shutting down; retry on another instance",
                               headers=retry) from None
        waiter: asyncio.Future[_Outcome] = asyncio.wrap_future(job.future)
        watch: asyncio.Future[Any] | None = None if disconnected is None else asyncio.ensure_future(disconnected())
        waits: list[asyncio.Future[Any]] = [waiter] if watch is None else [waiter, watch]
        try:
            done, _ = await asyncio.wait(waits,
                                         timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:   # this task was cancelled (server shutdown): abandon the job
            job.abandon()
            self._drop(job)
            waiter.cancel()
            raise
        finally:
            if watch is not None and not watch.done():
                watch.cancel()
        if waiter in done:
            if waiter.cancelled():   # close() dropped the queue
                raise ErrorAnswer(503, "shutting_down", "the service is shutting down; retry", headers=retry)
            outcome = waiter.result()
            if outcome.kind == "ok":
                return outcome.data, max(0.0, loop.time() - queued_at - outcome.run_s), outcome.run_s
            if outcome.kind == "error" and outcome.error is not None:
                raise outcome.error
            if self.state == "closed":
                raise ErrorAnswer(503, "shutting_down", "the request was cancelled because the service is "
                                   "shutting down", headers=retry)
            raise ErrorAnswer(504, "timeout", f"no answer within the server's request_timeout_s="
                               f"{cfg.request_timeout_s:g} s; the work was cancelled")
        waiter.cancel()
        job.abandon()
        self._drop(job)
        if watch is not None and watch in done:
            raise ErrorAnswer(499, "client_disconnected", "the client closed the connection; the work was "
                               "cancelled")
        raise ErrorAnswer(504, "timeout", f"no answer within the server's request_timeout_s="
                           f"{cfg.request_timeout_s:g} s; the work was cancelled")

    def _drop(self, job: _Job, count: bool = True) -> None:
        """Take an abandoned job out of the queue if it has not started (it never will)."""
        with self._lock:
            if not job.taken:
                job.taken = True
                self._pending.remove(job)
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)
                if count and self.state != "closed":
                    self.metrics.cancelled.labels(stage="queued").inc()


async def _read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The body, at most ``limit`` bytes, complete before ``deadline`` (loop time)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ErrorAnswer(400, "bad_content_length", f"Content-Length {declared!r} is not an integer") from None
        if n > limit:
            raise ErrorAnswer.over_limit(LimitExceeded("body_too_large", "max_body_bytes", limit, n,
                                                       "the request body (Content-Length)", status=413))
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ErrorAnswer.over_limit(LimitExceeded("body_too_large", "max_body_bytes", limit, size,
                                                           "the request body (at least)", status=413))
            chunks.append(chunk)

    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(read(), timeout=max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:
        raise ErrorAnswer(408, "body_timeout", "the request body did not arrive in time (the server's "
                           "body_timeout_s, within its request_timeout_s); send the body at once") from None
    except ClientDisconnect:
        raise ErrorAnswer(400, "client_disconnected", "the client closed the connection mid-body") from None
    return b"".join(chunks)


def parse_request(body: bytes) -> StepsRequest:
    """Body -> StepsRequest; 400 for bytes that are not a JSON object, 422 for a wrong object."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise ErrorAnswer(400, "malformed_json", f"the request body is not UTF-8 JSON: {e}") from None
    except RecursionError:
        raise ErrorAnswer(400, "malformed_json", "the request body is not UTF-8 JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ErrorAnswer(400, "malformed_json", f"the request body must be a JSON object, got {type(obj).__name__}")
    try:
        return StepsRequest.from_bytes(body)
    except ProtocolError as e:
        raise ErrorAnswer(422, "invalid_request", str(e)) from None
    except (TypeError, ValueError) as e:  # e.g. a list where a string belongs
        raise ErrorAnswer(422, "invalid_request", f"a request field has the wrong type: {e}") from None


def create_app(config: ServiceConfig | None = None, *, service: Service | None = None) -> Starlette:
    """The ASGI app. Its lifespan starts the model load (in the background) and closes the service."""
    if service is None:
        service = Service(config or ServiceConfig())
    metrics = service.metrics

    def answer(endpoint: str, response: Response, code: str | None = None) -> Response:
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        if code is not None:
            metrics.errors.labels(code=code).inc()
        return response

    def error(endpoint: str, err: ErrorAnswer) -> Response:
        return answer(endpoint, err.response(), err.code)

    async def steps(request: Request) -> Response:
        cfg = service.config
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        deadline = arrived + cfg.request_timeout_s
        steps_request: StepsRequest | None = None
        try:
            if not service.ready:
                raise _not_ready(service)
            ctype = request.headers.get("content-type", REQUEST_MEDIA_TYPE).split(";")[0].strip().lower()
            if ctype != REQUEST_MEDIA_TYPE:
                raise ErrorAnswer(415, "unsupported_media_type",
                                   f"Content-Type {ctype!r}: send the request as {REQUEST_MEDIA_TYPE}")
            body = await _read_body(request, cfg.limits.max_body_bytes,
                                    min(deadline, arrived + cfg.http.body_timeout_s))
            steps_request = parse_request(body)
            service.check_limits(steps_request)
            gone = (lambda: _disconnected(request)) if cfg.cancel_on_disconnect else None
            data, queued_s, run_s = await service.submit(steps_request, deadline, gone)
        except ErrorAnswer as e:
            metrics.request_latency.observe(loop.time() - arrived)
            log.info("steps %d %s: %s", e.status, e.code, e.message)
            return error("steps", e)
        total = loop.time() - arrived
        metrics.request_latency.observe(total)
        log.info("steps 200 %s queue=%.3fs run=%.3fs total=%.3fs bytes=%d",
                 describe_request(steps_request, cfg.log_prompts), queued_s, run_s, total, len(data))
        # Fixed-width durations (milliseconds): the answer's size must not vary from request to request.
        return answer("steps", Response(data, media_type=HANDOFF_MEDIA_TYPE, headers={
            "Cache-Control": "no-store",
            "Server-Timing": f"queue;dur={min(queued_s * 1e3, 9.9e8):011.1f}, run;dur={min(run_s * 1e3, 9.9e8):011.1f}",
        }))

    async def healthz(request: Request) -> Response:
        return answer("healthz", JSONResponse({"status": "alive", "state": service.state}))

    async def readyz(request: Request) -> Response:
        if not service.ready:
            return error("readyz", _not_ready(service))
        return answer("readyz", JSONResponse({"status": "ready", "model": service.model_id}))

    async def metrics_endpoint(request: Request) -> Response:
        return answer("metrics", Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        codes = {404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        message = {404: f"no endpoint at {request.url.path}; POST {STEPS_PATH}, GET /healthz, /readyz, /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error("other", ErrorAnswer(exc.status_code, code, message, headers=dict(exc.headers or {})))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
        return error("other", ErrorAnswer(500, "internal", "the service failed on this request; "
                                                            "the failure is logged on the server"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if service.state == "created":
            service.start()
        try:
            yield
        finally:
            service.close()

    app = Starlette(routes=[
        Route(STEPS_PATH, steps, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error, Exception: internal_error}, lifespan=lifespan,
        middleware=[Middleware(_HeaderGuard, service=service)])
    # /v1/steps/ is not /v1/steps: a redirect would make clients resend the body elsewhere.
    app.router.redirect_slashes = False
    app.state.service = service
    return app


async def _disconnected(request: Request) -> None:
    """Completes when the client closes the connection (the body has been read: the next
    receive() is the disconnect, whenever it comes)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _HeaderGuard:
    """ASGI middleware: the header count and size limits (HttpLimits), the same whichever HTTP
    parser (h11, httptools, Ray's proxy) built the scope. The uvicorn protocols of cloud/serve.py
    also bound the bytes a head may take while it is parsed; this check is exact."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            limits = self.service.config.http
            headers = scope.get("headers") or []
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") \
                + sum(len(k) + len(v) + 4 for k, v in headers)
            err = None
            if len(headers) > limits.max_headers:
                err = ErrorAnswer(431, "too_many_headers", f"the request has {len(headers)} header fields, over "
                                  f"the server's limit max_headers={limits.max_headers}",
                                  limit={"name": "max_headers", "max": limits.max_headers, "got": len(headers)})
            elif size > limits.max_header_bytes:
                err = ErrorAnswer(431, "headers_too_large", f"the request head is {size} bytes, over the "
                                  f"server's limit max_header_bytes={limits.max_header_bytes}",
                                  limit={"name": "max_header_bytes", "max": limits.max_header_bytes, "got": size})
            if err is not None:
                metrics = self.service.metrics
                metrics.requests.labels(endpoint="other", status=str(err.status)).inc()
                metrics.errors.labels(code=err.code).inc()
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _not_ready(service: Service) -> ErrorAnswer:
    retry = {"Retry-After": str(service.config.retry_after_s)}
    if service.state == "failed":
        return ErrorAnswer(503, "load_failed", f"the model could not be loaded: {service.load_error}", headers=retry)
    if service.state == "closed":
        return ErrorAnswer(503, "shutting_down", "the service is shutting down", headers=retry)
    return ErrorAnswer(503, "not_ready", f"the model is not ready yet (state: {service.state}); retry shortly",
                        headers=retry)

