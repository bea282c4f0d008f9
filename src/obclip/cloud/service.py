"""The cloud service: the model, its worker and admission, behind the HTTP app of cloud/http_app.py.

    POST /v1/steps   body: StepsRequest.to_bytes() (canonical JSON)
                     200: the handoff bytes (application/octet-stream), as
                     cloud.steps.CloudStepRunner.handle returns them
    GET  /healthz    200 while the process serves HTTP
    GET  /readyz     503 until the model is loaded and one warm-up request ran
    GET  /metrics    Prometheus text format

The pieces, one concept each: ``ServiceConfig`` and ``HttpLimits`` (cloud/service_config.py),
errors to answers (cloud/answers.py: every error is a JSON body with a stable code; 4xx for
anything the client can fix, 503 with Retry-After when the service cannot take the request now,
504 on timeout, 500 only for a bug), the metrics (cloud/metrics.py), the model worker with its
queue and batching (cloud/worker.py), the ASGI app (cloud/http_app.py) and the uvicorn front
with its command (cloud/serve.py). No request can crash the process.

Order of work for one request, cheapest first: readiness, header count and size, body size (the
Content-Length header, then the bytes actually read, within ``body_timeout_s``), the request
parsed once (runtime.protocol: JSON, finite numbers in range, valid Unicode text, its step
plan), the configured limits (N, T, k, image size, guidance, the cost budget 2N x latent pixels
x k against the loaded model's real latent size, prompt length in characters and tokens); only
then is the request queued for the model.

Bounded cost: the cost budget (``RequestLimits.max_cost``; by default max_candidates candidates
at the model's native size for 50 cloud steps) and the image side (by default twice the native
size) bound a request's time and memory before it starts; a request whose deadline passes or
whose client disconnects stops at its next step boundary, so the worker is free again within
one step of the largest admitted request (``obclip_cancel_to_free_seconds``). A request not
answered within ``request_timeout_s`` of arriving gets 504; a client that disconnects while
its request waits or runs cancels it the same way.

Privacy: the candidates are never logged or written anywhere unless ``log_prompts`` is set (for
debugging); logs carry N, T, k, size, dtype, timings and sizes only, and error messages never
quote a candidate.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from obclip.runtime.errors import ObclipError, ServiceError
from obclip.runtime.protocol import ProtocolError, RequestLimits, StepsRequest

from .answers import ErrorAnswer
from .metrics import Metrics
from .service_config import ServiceConfig, compile_warmup_entry
from .worker import Job, Outcome, ShuttingDown, StepRunner, Worker

log = logging.getLogger("obclip.service")


class NotReady(ServiceError):
    """The model is still loading, failed to load, or the service is closing: retry shortly."""

    code = "not_ready"


def compile_warmup_request(entry: str, max_candidates: int, size: int) -> StepsRequest:
    """"PRESET:N" -> a request of N placeholder candidates with that preset at ``size`` px."""
    from obclip.runtime.plan import preset

    name, n = compile_warmup_entry(entry, max_candidates)
    acc = preset(name)
    return StepsRequest(candidates=tuple(f"a photo number {i}" for i in range(n)), seed=0,
                        num_inference_steps=max(25, acc.switch_step), switch_step=acc.switch_step,
                        guidance_scale=7.5, height=size, width=size, acceleration=acc)


class Service:
    """The model's lifecycle, the admission checks and the wait for an answer; the queue and the
    batching are the ``worker``'s, the HTTP app is ``cloud.http_app.create_app``."""

    def __init__(self, config: ServiceConfig | None = None):
        config = config or ServiceConfig()
        self.config = config
        self.metrics = Metrics()
        self.worker = Worker(config, self.metrics)
        self.state = "created"          # created -> loading -> warming -> ready | failed; closed
        self.load_error: str | None = None
        self.model: Any = None
        self.model_id = ""
        # The configured limits with the model's defaults filled in once it is loaded.
        self.limits: RequestLimits = config.limits
        self.on_load_failed: Callable[[BaseException], None] | None = None
        self._token_counter: Callable[[str], int] | None = None
        self._context: int | None = None
        self._latent_shape: Callable[[int, int], tuple[int, int, int]] | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def runner(self) -> StepRunner | None:
        return self.worker.runner

    @property
    def worst_cancel_to_free_s(self) -> float:
        return self.worker.worst_cancel_to_free_s

    def not_ready(self) -> NotReady:
        """Why the service cannot take a request now (/readyz and /v1/steps before ready)."""
        if self.state == "failed":
            return NotReady(f"the model could not be loaded: {self.load_error}", code="load_failed")
        if self.state == "closed":
            return NotReady("the service is shutting down", code="shutting_down")
        return NotReady(f"the model is not ready yet (state: {self.state}); retry shortly")

    # -- lifecycle (the worker thread does all model work) -------------------------------------
    def start(self) -> concurrent.futures.Future[Any]:
        """Load and warm up the model on the worker; returns at once (/readyz tells when it is done)."""
        if self.state != "created":
            raise RuntimeError(f"service already started (state {self.state})")   # a caller's bug
        self.state = "loading"
        if self.config.log_prompts:
            log.warning("log_prompts is on: candidate prompts will be written to the log (debugging only)")
        return self.worker.call(self._load)

    def _load_model(self) -> tuple[Any, str, int]:
        """The backend's model: torch on the model folder, or the exported engines without torch;
        with its tokenizer (as JSON) and its text context."""
        cfg = self.config
        if cfg.backend == "onnxruntime":
            from .engine_backend import OrtEngine

            engine = OrtEngine(str(cfg.engines), providers=cfg.providers, threads=cfg.torch_threads,
                               memory=cfg.engine_memory)
            return engine, engine.tokenizer_json, engine.text_max_length
        import torch

        from .models import load_text_to_latent, resolve_model_dir

        if cfg.torch_threads is not None:
            torch.set_num_threads(cfg.torch_threads)
        model = load_text_to_latent(resolve_model_dir(cfg.model, "cloud"), device=cfg.device,
                                    dtype=getattr(torch, cfg.dtype))
        return model, model.tokenizer.backend_tokenizer.to_str(), int(model.tokenizer.model_max_length)

    def _load(self) -> None:
        cfg = self.config
        try:
            from tokenizers import Tokenizer

            from .steps import CloudStepRunner

            t0 = time.perf_counter()
            model, tokenizer_json, context = self._load_model()
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
                engine = model
            else:
                from .torch_backend import TorchEngine

                engine = TorchEngine(model, compile_mode="reduce-overhead" if cfg.compile else None)
            self.worker.runner = CloudStepRunner(engine=engine, limits=self.limits)
            self.worker.model_id = model.model_id
            log.info("model %s loaded on %s (%s) in %.1f s", model.model_id, cfg.device, cfg.dtype,
                     time.perf_counter() - t0)
            f = model.vae_scale_factor
            size = max(f, min(model.default_image_size, self.limits.max_image_size or f) // f * f)
            if cfg.backend == "onnxruntime" and cfg.warm_graphs:
                self.state = "warming"
                t0 = time.perf_counter()
                n = min(cfg.warm_candidates, self.limits.max_candidates)
                warmed = model.warm(n, size, size)
                log.info("warmed %d graphs (N=%d, %d px) in %.2f s", len(warmed), n, size, time.perf_counter() - t0)
            if cfg.warmup:
                self.state = "warming"
                warm = StepsRequest(candidates=("a photo",), seed=0, num_inference_steps=2, switch_step=1,
                                    guidance_scale=7.5, height=size, width=size)
                t0 = time.perf_counter()
                self.worker.run([Job(warm)])
                log.info("warm-up request ran in %.2f s", time.perf_counter() - t0)
            for entry in cfg.compile_warmup:
                t0 = time.perf_counter()
                self.worker.run([Job(compile_warmup_request(entry, self.limits.max_candidates,
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
        self.worker.close()

    # -- admission and the wait (the asyncio side) -----------------------------------------------
    def check_limits(self, request: StepsRequest) -> None:
        """The configured limits, in the order of what they cost the server. No model work.
        Raises the request's error (a ProtocolError; LimitExceeded for a limit)."""
        if self._latent_shape is not None:
            try:
                self._latent_shape(request.height, request.width)
            except ValueError as e:   # the model's own size rule (e.g. a multiple of its VAE factor)
                raise ProtocolError(str(e), "invalid_image_size") from None
        self.limits.check(request, self._token_counter, self._context, self._latent_shape)

    async def submit(self, request: StepsRequest, deadline: float,
                     disconnected: Callable[[], Awaitable[object]] | None = None) -> tuple[bytes, float, float]:
        """Queue the request for the worker and wait until ``deadline`` (loop time, which is
        time.monotonic) or until ``disconnected()`` completes (the client went away): either way the
        job is abandoned and stops at its next step boundary.
        Returns (handoff bytes, seconds queued, seconds of model work); raises an ObclipError
        (answered by its kind) or an ErrorAnswer (504, 499)."""
        cfg = self.config
        job = self.worker.enqueue(request, deadline)
        loop = asyncio.get_running_loop()
        queued_at = loop.time()
        waiter: asyncio.Future[Outcome] = asyncio.wrap_future(job.future)
        watch: asyncio.Future[Any] | None = None if disconnected is None else asyncio.ensure_future(disconnected())
        waits: list[asyncio.Future[Any]] = [waiter] if watch is None else [waiter, watch]
        try:
            done, _ = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()),
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:   # this task was cancelled (server shutdown): abandon the job
            job.abandon()
            self.worker.drop(job)
            waiter.cancel()
            raise
        finally:
            if watch is not None and not watch.done():
                watch.cancel()
        timeout = ErrorAnswer(504, "timeout", f"no answer within the server's request_timeout_s="
                              f"{cfg.request_timeout_s:g} s; the work was cancelled")
        if waiter in done:
            if waiter.cancelled():   # close() dropped the queue
                raise ShuttingDown("the service is shutting down; retry")
            outcome = waiter.result()
            if outcome.kind == "ok":
                return outcome.data, max(0.0, loop.time() - queued_at - outcome.run_s), outcome.run_s
            if outcome.kind == "error" and outcome.error is not None:
                if isinstance(outcome.error, ObclipError):
                    raise outcome.error
                raise ErrorAnswer.of(outcome.error, cfg.retry_after_s)   # a bug in the worker: 500
            if self.state == "closed":
                raise ShuttingDown("the request was cancelled because the service is shutting down")
            raise timeout
        waiter.cancel()
        job.abandon()
        self.worker.drop(job)
        if watch is not None and watch in done:
            raise ErrorAnswer(499, "client_disconnected", "the client closed the connection; the work was "
                              "cancelled")
        raise timeout

