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

from obclip.runtime.protocol import ERROR_MEDIA_TYPE, RequestLimits, error_body

from .service import HttpLimits, Service, ServiceConfig, create_app

if TYPE_CHECKING:
    import uvicorn

_D = ServiceConfig()
_L = _D.limits
_H = _D.http


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m obclip.cloud.serve",
                                description="Serve the cloud's first k denoising steps over HTTP (POST /v1/steps).")
    p.add_argument("--model", default=None,
                   help="cloud model: a diffusers-layout directory or hub id (default: the embedded mini model)")
    p.add_argument("--host", default=_D.host, help=f"address to bind (default {_D.host})")
    p.add_argument("--port", type=int, default=_D.port, help=f"port (default {_D.port}; 0: any free port)")
    p.add_argument("--fd", type=int, default=None,
                   help="serve on this inherited, already bound socket instead of --host/--port "
                        "(how obclip.app.local starts a child service on a free port without a race)")
    p.add_argument("--device", default=_D.device, help="torch device: cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default=_D.dtype, choices=["float32", "float16", "bfloat16"],
                   help="model dtype (default float32)")
    # backend (cloud engines issue)
    p.add_argument("--backend", default=_D.backend, choices=["torch", "onnxruntime"],
                   help="torch: run --model; onnxruntime: run the exported --engines folder, without torch "
                        "(default %(default)s)")
    p.add_argument("--engines", default=None,
                   help="with --backend onnxruntime: the cloud engines folder: OUT/cloud (fp32) or OUT/cloud-fp16 "
                        "(float16, for --providers cuda/tensorrt; ... --cloud-precision fp16) of "
                        "python export/build_engines.py --cloud-model ...")
    p.add_argument("--providers", default=_D.providers, choices=["cpu", "cuda", "tensorrt"],
                   help="onnxruntime execution providers (cuda/tensorrt need onnxruntime-gpu; default %(default)s)")
    p.add_argument("--compile", action="store_true",
                   help="torch backend: torch.compile each step mode (on CUDA replayed as CUDA graphs, one per "
                        "mode and shape); the first request of each mode and shape compiles")
    p.add_argument("--compile-warmup", nargs="*", default=[], metavar="PRESET:N",
                   help="with --compile: run these (e.g. paper-k10:6) at the native size before ready, so their "
                        "modes and shapes are compiled up front")
    g = p.add_argument_group("limits (checked before any model work; a violation is a 4xx naming the limit)")
    g.add_argument("--max-candidates", type=int, default=_L.max_candidates, help="N (default %(default)s)")
    g.add_argument("--max-steps", type=int, default=_L.max_steps, help="T (default %(default)s)")
    g.add_argument("--max-switch-step", type=int, default=_L.max_switch_step,
                   help="k, cloud steps per request (default %(default)s)")
    g.add_argument("--max-image-size", type=int, default=_L.max_image_size,
                   help="pixels (default: twice the model's native size)")
    g.add_argument("--max-prompt-chars", type=int, default=_L.max_prompt_chars,
                   help="characters per candidate (default %(default)s)")
    g.add_argument("--max-prompt-tokens", type=int, default=_L.max_prompt_tokens,
                   help="tokens per candidate (default: the text encoder's context)")
    g.add_argument("--max-body-bytes", type=int, default=_L.max_body_bytes, help="(default %(default)s)")
    g.add_argument("--max-cost", type=int, default=_L.max_cost,
                   help="cost budget per request, 2N x latent pixels x k (default: --max-candidates candidates "
                        "at the model's native size for 50 cloud steps); bounds a request's time and memory")
    g.add_argument("--max-guidance-scale", type=float, default=_L.max_guidance_scale,
                   help="(default %(default)s)")
    h = p.add_argument_group("HTTP front (see HttpLimits in cloud/service.py)")
    h.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"],
                   help="HTTP parser (default auto: httptools when installed); the limits hold with either")
    h.add_argument("--max-header-bytes", type=int, default=_H.max_header_bytes,
                   help="request line + headers, else 431 (default %(default)s)")
    h.add_argument("--max-headers", type=int, default=_H.max_headers, help="header fields, else 431 "
                   "(default %(default)s)")
    h.add_argument("--header-timeout", type=float, default=_H.header_timeout_s,
                   help="seconds to send a request head, from connect or the previous answer (default %(default)s)")
    h.add_argument("--keep-alive", type=float, default=_H.keep_alive_s,
                   help="seconds an idle connection stays open (default %(default)s)")
    h.add_argument("--body-timeout", type=float, default=_H.body_timeout_s,
                   help="seconds to send the request body (default %(default)s)")
    h.add_argument("--send-timeout", type=float, default=_H.send_timeout_s,
                   help="seconds an answer the client does not read is kept (default %(default)s)")
    h.add_argument("--max-connections", type=int, default=_H.max_connections,
                   help="open connections; more are answered 503 and closed (default %(default)s)")
    w = p.add_argument_group("worker")
    w.add_argument("--queue-size", type=int, default=_D.queue_size,
                   help="requests waiting beside the running one; more get 503 (default %(default)s)")
    w.add_argument("--timeout", type=float, default=_D.request_timeout_s,
                   help="seconds from arrival to answer, else 504 (default %(default)s)")
    w.add_argument("--retry-after", type=int, default=_D.retry_after_s,
                   help="Retry-After seconds on 503 (default %(default)s)")
    w.add_argument("--batch-window-ms", type=float, default=_D.batch_window_ms,
                   help="wait this long for requests with the same options to batch with; 0: one at a time "
                        "(default %(default)s)")
    w.add_argument("--max-batch-rows", type=int, default=_D.max_batch_rows,
                   help="UNet rows per batch, 2 x its candidates (default %(default)s)")
    w.add_argument("--no-warmup", action="store_true", help="ready as soon as the model is loaded")
    w.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--log-prompts", action="store_true",
                   help="DEBUGGING ONLY: write the candidate prompts to the log (off by default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(args: argparse.Namespace) -> ServiceConfig:
    return ServiceConfig(
        model=args.model, device=args.device, dtype=args.dtype, host=args.host, port=args.port,
        limits=RequestLimits(
            max_candidates=args.max_candidates, max_steps=args.max_steps, max_switch_step=args.max_switch_step,
            max_image_size=args.max_image_size, max_prompt_chars=args.max_prompt_chars,
            max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
            max_cost=args.max_cost, max_guidance_scale=args.max_guidance_scale),
        http=HttpLimits(
            max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
            header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive, body_timeout_s=args.body_timeout,
            send_timeout_s=args.send_timeout, max_connections=args.max_connections),
        queue_size=args.queue_size,
        request_timeout_s=args.timeout, retry_after_s=args.retry_after, warmup=not args.no_warmup,
        torch_threads=args.torch_threads, log_prompts=args.log_prompts,
        batch_window_ms=args.batch_window_ms, max_batch_rows=args.max_batch_rows,
        backend=args.backend, engines=args.engines, providers=args.providers,
        compile=args.compile, compile_warmup=tuple(args.compile_warmup),
    )


def checked_config(args: argparse.Namespace) -> ServiceConfig:
    """The ServiceConfig of the flags; ValueError if a value is invalid or a local --model is missing."""
    config = config_from_args(args)
    model = args.model
    if model is not None and (model.startswith((".", "/", "~")) or model.count("/") != 1) \
            and not Path(model).expanduser().exists():
        raise ValueError(f"model directory {model!r} does not exist (a diffusers-layout directory or a hub id)")
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
        raise ValueError(f"unknown HTTP parser {parser!r}; use auto, h11 or httptools")
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
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

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
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
