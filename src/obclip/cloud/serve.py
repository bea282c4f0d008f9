"""Start the cloud service: one command, one process, one model worker.

    python -m obclip.cloud.serve --model /models/stable-diffusion-v1-4 --host 127.0.0.1 --port 8000
    obclip-serve --model ... --device cuda --dtype float16

Without --model the embedded default (random-weight mini model) is used,
built on first use. The HTTP port answers at once: GET /healthz is 200
while the process serves, GET /readyz is 503 until the model is loaded and
warmed up. If the model cannot be loaded the process exits with status 1.
See cloud/service.py for the endpoints, limits and error bodies.

The HTTP front (``HttpLimits``) is enforced here, in uvicorn's own protocol
classes, with whichever parser runs (``--http h11|httptools``; auto picks
httptools when installed): a connection cap (the excess is answered 503 and
closed at once), the request head's size (bytes, parsed incrementally) and a
deadline for it from connect or from the previous answer (slow-drip heads get
408), keep-alive idle close, a bound on how long an unread answer is kept,
and JSON bodies for the parser's own errors (400, 408, 431, 503).
"""

from __future__ import annotations

import argparse
import asyncio
import http
import json
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from obclip.runtime.errors import InputError, ObclipError
from obclip.runtime.options import add_flags, from_flags
from obclip.runtime.protocol import ERROR_MEDIA_TYPE, RequestLimits, error_body

from .http_app import create_app
from .service import Service
from .service_config import HttpLimits, ServiceConfig

if TYPE_CHECKING:
    import uvicorn


def build_parser() -> argparse.ArgumentParser:
    """The flags: one per ServiceConfig, RequestLimits and HttpLimits field (their declarations give
    the name, type, default and help: runtime/options.py), plus this process's own."""
    p = argparse.ArgumentParser(prog="python -m obclip.cloud.serve",
                                description="Serve the cloud's first k denoising steps over HTTP (POST /v1/steps).")
    add_flags(p, ServiceConfig)
    p.add_argument("--fd", type=int, default=None,
                   help="serve on this inherited, already bound socket instead of --host/--port "
                        "(how obclip.app.local starts a child service on a free port without a race)")
    add_flags(p.add_argument_group("limits (checked before any model work; a violation is a 4xx naming the "
                                   "limit)"), RequestLimits)
    h = p.add_argument_group("HTTP front (HttpLimits in cloud/service_config.py)")
    h.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                   help="HTTP parser (default auto: httptools when installed); the limits hold with either")
    add_flags(h, HttpLimits)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    config: ServiceConfig = from_flags(ServiceConfig, args, limits=from_flags(RequestLimits, args),
                                       http=from_flags(HttpLimits, args))
    return config


def checked_config(args: argparse.Namespace) -> ServiceConfig:
    """The ServiceConfig of the flags; InputError if a value is invalid or a local --model is missing."""
    config = config_from_args(args)
    model = args.model
    if model is not None and (model.startswith((".", "/", "~")) or model.count("/") != 1) \
            and not Path(model).expanduser().exists():
        raise InputError(f"model directory {model!r} does not exist (a diffusers-layout directory or a hub id)")
    return config


def _raw_answer(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error answer with the JSON error body, closing the connection."""
    body = json.dumps(error_body(code, message)).encode()
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", f"content-type: {ERROR_MEDIA_TYPE}",
            f"content-length: {len(body)}", "connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class _FrontMixin:
    """HttpLimits on top of a uvicorn HTTP protocol (H11Protocol or HttpToolsProtocol): one instance
    per connection. Uses the protocol's ``transport``, ``connections``, ``cycle`` and ``loop``."""

    front: HttpLimits = HttpLimits()
    on_refused: Callable[[int, str], None] | None = None   # metrics hook: (status, code)
    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any
    loop: asyncio.AbstractEventLoop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.front.max_connections:
            self._refuse(503, "too_many_connections", f"the server has max_connections="
                         f"{self.front.max_connections} open connections; retry later", {"Retry-After": "1"})
            return
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        waiting = self._head_timer is not None
        before = self.cycle
        if waiting:
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self.transport.is_closing():
            return
        if self.cycle is not before:           # a request head was parsed: its deadline is met
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer, self._head_bytes = None, 0
        elif waiting and self._head_bytes > self.front.max_header_bytes:
            self._too_large()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # An answer the client does not read must not be kept forever (close() waits for the buffer).
        if self._linger is not None:
            self._linger.cancel()
        self._linger = self.loop.call_later(self.front.send_timeout_s, self._drop_unread)
        if not self.transport.is_closing():
            self._await_head()                  # the next request's head has its own deadline

    def send_400_response(self, msg: str) -> None:
        """The parser's own errors, as JSON (uvicorn writes plain text)."""
        if self._head_timer is not None and self._head_bytes > self.front.max_header_bytes:
            self._too_large()
            return
        self._refuse(400, "bad_http_request", "the request is not valid HTTP/1.1")

    # -- helpers -------------------------------------------------------------------------------
    def _await_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_bytes = 0
        self._head_timer = self.loop.call_later(self.front.header_timeout_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            return                              # a request is being answered; the app has its own deadlines
        if self._head_bytes:
            self._refuse(408, "header_timeout", f"the request head did not arrive within the server's "
                         f"header_timeout_s={self.front.header_timeout_s:g} s")
        else:
            self.transport.close()

    def _too_large(self) -> None:
        self._refuse(431, "headers_too_large", f"the request head is at least {self._head_bytes} bytes, over "
                     f"the server's limit max_header_bytes={self.front.max_header_bytes}")

    def _drop_unread(self) -> None:
        self._linger = None
        if self.transport.get_write_buffer_size():
            self.transport.abort()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._linger):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._linger = None

    def _refuse(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        if self.on_refused is not None:
            self.on_refused(status, code)
        self._cancel_timers()
        if not self.transport.is_closing():
            self.transport.write(_raw_answer(status, code, message, headers))
            self.transport.close()
            # close() waits for the buffer; a peer that does not read it is dropped.
            self._linger = self.loop.call_later(self.front.send_timeout_s, self._drop_unread)


def front_protocol(parser: str, limits: HttpLimits,
                   on_refused: Callable[[int, str], None] | None = None) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class for ``parser`` ("auto", "h11" or "httptools") with ``limits``."""
    if parser == "auto":
        try:
            import httptools  # noqa: F401
            parser = "httptools"
        except ImportError:
            parser = "h11"
    if parser == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    elif parser == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base  # type: ignore[assignment]
    else:
        raise InputError(f"unknown HTTP parser {parser!r}; use auto, h11 or httptools")
    attrs = {"front": limits, "on_refused": staticmethod(on_refused) if on_refused else None}
    return cast("type[asyncio.Protocol]", type(f"Front{base.__name__}", (_FrontMixin, base), attrs))


def uvicorn_config(service: Service, *, parser: str = "auto", log_level: str | None = "info",
                   **kw: Any) -> uvicorn.Config:
    """The uvicorn Config for a service's app with its HTTP front (``service.config.http``)."""
    import uvicorn

    cfg = service.config
    metrics = service.metrics

    def refused(status: int, code: str) -> None:
        metrics.requests.labels(endpoint="http", status=str(status)).inc()
        metrics.errors.labels(code=code).inc()

    options: dict[str, Any] = dict(
        host=cfg.host, port=cfg.port, http=front_protocol(parser, cfg.http, refused), log_level=log_level,
        timeout_keep_alive=cfg.http.keep_alive_s, h11_max_incomplete_event_size=cfg.http.max_header_bytes,
        timeout_graceful_shutdown=max(1, int(cfg.request_timeout_s)))
    options.update(kw)
    return uvicorn.Config(create_app(service=service), **options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = checked_config(args)
    except ObclipError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(config)
    server = uvicorn.Server(uvicorn_config(service, parser=args.http, log_level=args.log_level))
    failed: list[BaseException] = []

    def load_failed(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True  # polled by uvicorn's main loop

    service.on_load_failed = load_failed
    # An inherited socket: family and type are read from the descriptor itself.
    server.run(sockets=None if args.fd is None else [socket.socket(fileno=args.fd)])
    if failed:
        print(f"error: could not load the model: {service.load_error}", file=sys.stderr)
        # By its kind (a missing or corrupt model is an obclip error); anything else is a bug.
        return failed[0].exit_code if isinstance(failed[0], ObclipError) else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
