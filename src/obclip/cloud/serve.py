"""Start the cloud service: one command, one process, one model worker.

    python -m obclip.cloud.serve --model /models/stable-diffusion-v1-4 --host 127.0.0.1 --port 8000
    obclip-serve --model ... --device cuda --dtype float16

Without --model the embedded default (random-weight mini model) is used,
built on first use. The HTTP port answers at once: GET /healthz is 200
while the process serves, GET /readyz is 503 until the model is loaded and
warmed up. If the model cannot be loaded the process exits with status 1.
See cloud/service.py for the endpoints, limits and error bodies.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

from obclip.runtime.protocol import RequestLimits

from .service import Service, ServiceConfig, create_app

_D = ServiceConfig()
_L = _D.limits


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
    g = p.add_argument_group("limits (checked before any model work; a violation is a 4xx naming the limit)")
    g.add_argument("--max-candidates", type=int, default=_L.max_candidates, help="N (default %(default)s)")
    g.add_argument("--max-steps", type=int, default=_L.max_steps, help="T (default %(default)s)")
    g.add_argument("--max-switch-step", type=int, default=_L.max_switch_step,
                   help="k, cloud steps per request (default %(default)s)")
    g.add_argument("--max-image-size", type=int, default=_L.max_image_size, help="pixels (default %(default)s)")
    g.add_argument("--max-prompt-chars", type=int, default=_L.max_prompt_chars,
                   help="characters per candidate (default %(default)s)")
    g.add_argument("--max-prompt-tokens", type=int, default=_L.max_prompt_tokens,
                   help="tokens per candidate (default: the text encoder's context)")
    g.add_argument("--max-body-bytes", type=int, default=_L.max_body_bytes, help="(default %(default)s)")
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
            max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes),
        queue_size=args.queue_size,
        request_timeout_s=args.timeout, retry_after_s=args.retry_after, warmup=not args.no_warmup,
        torch_threads=args.torch_threads, log_prompts=args.log_prompts,
        batch_window_ms=args.batch_window_ms, max_batch_rows=args.max_batch_rows,
    )


def checked_config(args: argparse.Namespace) -> ServiceConfig:
    """The ServiceConfig of the flags; ValueError if a value is invalid or a local --model is missing."""
    config = config_from_args(args)
    model = args.model
    if model is not None and (model.startswith((".", "/", "~")) or model.count("/") != 1) \
            and not Path(model).expanduser().exists():
        raise ValueError(f"model directory {model!r} does not exist (a diffusers-layout directory or a hub id)")
    return config


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = checked_config(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = Service(config)
    app = create_app(service=service)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=max(1, int(config.request_timeout_s))))
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
