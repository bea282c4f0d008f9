"""The service's ASGI app (Starlette): the endpoints, the request body, the header limits.

One function per endpoint; every error becomes its answer through ``ErrorAnswer.of``
(cloud/answers.py), and the answer's status and code are counted in the metrics. The HTTP front
below the app (connection cap, head size and deadline, keep-alive) is cloud/serve.py's; behind
another server (Ray Serve, a reverse proxy) that server must enforce what it parses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from obclip.runtime.errors import ObclipError
from obclip.runtime.protocol import HANDOFF_MEDIA_TYPE, REQUEST_MEDIA_TYPE, STEPS_PATH, LimitExceeded, StepsRequest

from .answers import ErrorAnswer, describe_request
from .service import Service
from .service_config import ServiceConfig

log = logging.getLogger("obclip.service")


async def read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The body, at most ``limit`` bytes, complete before ``deadline`` (loop time)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ErrorAnswer(400, "bad_content_length", f"Content-Length {declared!r} is not an integer") from None
        if n > limit:
            raise LimitExceeded("body_too_large", "max_body_bytes", limit, n, "the request body (Content-Length)",
                                status=413)
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise LimitExceeded("body_too_large", "max_body_bytes", limit, size, "the request body (at least)",
                                    status=413)
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

    def error(endpoint: str, err: ErrorAnswer | ObclipError) -> Response:
        if not isinstance(err, ErrorAnswer):
            err = ErrorAnswer.of(err, service.config.retry_after_s)
        return answer(endpoint, err.response(), err.code)

    async def steps(request: Request) -> Response:
        cfg = service.config
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        deadline = arrived + cfg.request_timeout_s
        steps_request: StepsRequest | None = None
        try:
            if not service.ready:
                raise service.not_ready()
            ctype = request.headers.get("content-type", REQUEST_MEDIA_TYPE).split(";")[0].strip().lower()
            if ctype != REQUEST_MEDIA_TYPE:
                raise ErrorAnswer(415, "unsupported_media_type",
                                  f"Content-Type {ctype!r}: send the request as {REQUEST_MEDIA_TYPE}")
            body = await read_body(request, cfg.limits.max_body_bytes,
                                   min(deadline, arrived + cfg.http.body_timeout_s))
            steps_request = StepsRequest.from_bytes(body)   # the one parse: 400 not JSON, 422 a wrong request
            service.check_limits(steps_request)
            gone = (lambda: _disconnected(request)) if cfg.cancel_on_disconnect else None
            data, queued_s, run_s = await service.submit(steps_request, deadline, gone)
        except (ErrorAnswer, ObclipError) as e:
            err = e if isinstance(e, ErrorAnswer) else ErrorAnswer.of(e, cfg.retry_after_s)
            metrics.request_latency.observe(loop.time() - arrived)
            log.info("steps %d %s: %s", err.status, err.code, err.message)
            return error("steps", err)
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
            return error("readyz", service.not_ready())
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
        return error("other", ErrorAnswer.of(exc, service.config.retry_after_s))

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
