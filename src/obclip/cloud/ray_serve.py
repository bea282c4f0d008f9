"""The cloud service on Ray Serve: N replicas of the same Starlette app behind one HTTP endpoint.

    pip install 'obclip[ray]'
    python -m obclip.cloud.ray_serve --model /models/stable-diffusion-v1-4 --device cuda --dtype float16 --replicas 4
    python -m obclip.cloud.ray_serve --model DIR --replicas 2 --device cpu --cpus-per-replica 4
    python -m obclip.cloud.ray_serve --address auto ...   # join a running cluster (`ray start --head` first)

One replica is one ``cloud.service.Service`` (model, worker thread, queue,
metrics) wrapped in the app ``create_app`` builds, exactly what
``python -m obclip.cloud.serve`` runs in one process: same endpoints (POST
/v1/steps, GET /healthz, /readyz, /metrics), limits, errors and batching.
Ray's HTTP proxy sends each request to one replica, so the k cloud steps of
a request all run on one model, and batching happens within a replica.
With ``--device cuda`` each replica holds one GPU (Ray sets its
CUDA_VISIBLE_DEVICES), so ``--replicas`` is the number of GPUs to use; on CPU
each replica takes ``--cpus-per-replica`` cores (and as many torch threads).

A replica counts as started only once its model is loaded and warmed up
(the load is awaited while Ray builds the replica), so Serve routes nothing
to it before that and this command prints the URL only when every replica is
ready. After that Ray's ``check_health`` fails if the service stops being
ready, and Ray replaces the replica. /readyz and /metrics answer for the one
replica a request lands on.

Ctrl-C (or SIGTERM) deletes the application and, when this command started
Ray itself, shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from obclip.runtime.errors import InputError, ObclipError, ServiceError
from obclip.runtime.options import add_flags, check_fields, from_flags, option

from .http_app import create_app
from .service import Service
from .service_config import ServiceConfig

RAY_MISSING = "Ray Serve is not installed: pip install 'obclip[ray]'"
APP_NAME = "obclip"
DEPLOYMENT_NAME = "obclip-cloud"

log = logging.getLogger("obclip.ray_serve")


@dataclass(frozen=True)
class RayOptions:
    """How the service is deployed on Ray: replicas, their resources and the route."""

    replicas: int = option(1, "model replicas; with --device cuda, the number of GPUs to use", ge=1)
    cpus_per_replica: float = option(1.0, "CPU cores Ray reserves per replica; on CPU also its torch threads",
                                     gt=0)
    gpus_per_replica: float = option(1.0, "GPUs per replica with --device cuda", gt=0, cli=False)
    address: str | None = option(None, "Ray cluster to join ('auto', or ray://host:10001); default: start Ray "
                                 "on this machine")
    route_prefix: str = option("/", "serve the endpoints under this path, e.g. /obclip -> POST "
                               "/obclip/v1/steps")
    max_ongoing_requests: int | None = option(None, "requests Serve lets into one replica at once (default: "
                                              "queue size + max batch rows / 2 + 4)", ge=1)

    def __post_init__(self) -> None:
        check_fields(self)
        prefix = self.route_prefix
        if not prefix.startswith("/") or (prefix != "/" and prefix.endswith("/")):
            raise InputError(f"route_prefix must start with '/' and not end with one, got {prefix!r}")


def import_serve():
    """``ray.serve``, or an ImportError that says how to install it."""
    try:
        from ray import serve
    except ImportError as e:
        raise ImportError(RAY_MISSING) from e
    return serve


class CloudReplica:
    """One Serve replica: one Service and the app around it (made an ingress by ``build_app``).

    Not decorated here, so this module imports without Ray; ``serve.ingress()`` with no app
    defers the app to ``__serve_build_asgi_app__``, called on the replica after __init__.
    """

    def __init__(self, config: ServiceConfig, log_level: str = "info"):
        self.log_level = log_level
        # Behind Ray's proxy a client that disconnects cancels the handler task (which abandons its
        # job); the replica's receive() is Ray's, not uvicorn's, so it is not watched for a disconnect.
        self.service = Service(replace(config, cancel_on_disconnect=False))

    async def __serve_build_asgi_app__(self):
        # Only Serve calls this, in the replica's own process: our loggers need a handler there
        # (Ray keeps the worker's stderr in its logs and echoes it on the driver).
        obclip_log = logging.getLogger("obclip")
        obclip_log.setLevel(self.log_level.upper())
        if not obclip_log.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            obclip_log.addHandler(handler)
            obclip_log.propagate = False
        # Wait for load + warm-up here, not in check_health: Serve runs one health check right
        # after building the replica and counts a failure as a failed start (and later three
        # failures in a row as a dead replica), so a check that failed "until loaded" would
        # restart slow loads forever. Awaited here, the replica only joins the routing table
        # (and serve.run only returns) once the model answers.
        await asyncio.wrap_future(self.service.start())
        if not self.service.ready:  # Service._load never raises; it records the error
            raise ServiceError(f"could not load the model: {self.service.load_error}", code="load_failed")
        # The very app `python -m obclip.cloud.serve` serves. Its lifespan sees the service started
        # and only closes it when Serve stops the replica.
        return create_app(service=self.service)

    def check_health(self) -> None:
        """Serve's liveness probe (every health_check_period_s): raising makes Serve replace us."""
        if not self.service.ready:
            raise ServiceError(f"obclip service is not ready (state: {self.service.state}"
                               + (f", {self.service.load_error}" if self.service.load_error else "") + ")")


def default_max_ongoing_requests(config: ServiceConfig) -> int:
    """Requests Serve lets into one replica at a time: the service's own queue and a full batch,
    plus a few for /healthz, /readyz, /metrics and 4xx answers. Serve's default (5) would
    hold requests in Ray's router, starving the batching window and hiding the service's
    503 (queue full) behind an unbounded wait."""
    return config.queue_size + max(1, config.max_batch_rows // 2) + 4


def build_app(config: ServiceConfig, options: RayOptions = RayOptions(), log_level: str = "info"):
    """The Serve application (``Deployment.bind(...)``) for ``serve.run``.

    ``config.device`` is "cpu" or "cuda": on cuda each replica asks Ray for ``gpus_per_replica``
    GPUs and sees its own GPU as cuda:0, so a device index would be wrong here.
    """
    serve = import_serve()
    if config.device not in ("cpu", "cuda"):
        raise InputError(f"device must be 'cpu' or 'cuda' under Ray Serve, got {config.device!r} "
                         "(Ray gives each replica its own GPU; it is 'cuda' inside the replica)")
    actor_options: dict = {"num_cpus": options.cpus_per_replica}
    if config.device == "cuda":
        actor_options["num_gpus"] = options.gpus_per_replica
    elif config.torch_threads is None:
        # Without this every CPU replica's torch would use all the node's cores.
        config = replace(config, torch_threads=max(1, int(options.cpus_per_replica)))
    deployment = serve.deployment(
        serve.ingress()(CloudReplica),
        name=DEPLOYMENT_NAME,
        num_replicas=options.replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=options.max_ongoing_requests or default_max_ongoing_requests(config),
        # Let requests that are running finish on shutdown or scale-down, as cloud.serve does.
        graceful_shutdown_timeout_s=max(1.0, float(config.request_timeout_s)),
    )
    return deployment.bind(config, log_level)


# -- CLI -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """obclip.cloud.serve flags (model, device, dtype, limits, worker) plus Ray's."""
    from .serve import build_parser as serve_parser

    p = serve_parser()
    p.prog = "python -m obclip.cloud.ray_serve"
    p.description = ("Serve the cloud's first k denoising steps over HTTP (POST /v1/steps) with Ray Serve: "
                     "one model per replica, one replica per GPU.")
    for action in p._actions:
        if action.dest in ("fd", "http", "header_timeout", "send_timeout", "max_connections"):
            # an inherited socket and the uvicorn-level HTTP front mean nothing to Ray's proxy
            # (header count/size and the body timeout are still checked by the app)
            action.help = argparse.SUPPRESS
        elif action.dest == "device":
            action.help = "cpu or cuda; with cuda each replica gets one GPU of its own (default cpu)"
        elif action.dest == "port":
            action.help = "port of Ray Serve's HTTP proxy (default %(default)s)"
    add_flags(p.add_argument_group("ray"), RayOptions)
    return p


def _url(host: str, port: int, route_prefix: str) -> str:
    shown = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
    return f"http://{shown}:{port}{route_prefix.rstrip('/')}"


def _load_failure(serve) -> str:
    """The replica's own reason from a failed deploy (Serve's message ends a long traceback)."""
    try:
        message = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME].message
    except Exception:  # noqa: BLE001 - best effort: the controller's log has the whole story
        return ""
    reasons = [line.strip() for line in message.splitlines() if "could not load the model" in line]
    return f"\n  {reasons[-1]}" if reasons else ""


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.fd is not None:
        print("error: --fd is not supported with Ray Serve (its proxy binds --host/--port)", file=sys.stderr)
        return 2
    if args.port == 0:
        print("error: Ray Serve needs a fixed --port", file=sys.stderr)
        return 2
    from .serve import checked_config

    try:
        options: RayOptions = from_flags(RayOptions, args)
        config = checked_config(args)  # on a multi-node cluster the model path must exist on every node
    except ObclipError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    model = args.model
    if model is not None and Path(model).expanduser().exists():
        # Replicas do not start in this directory: give them an absolute path.
        config = replace(config, model=str(Path(model).expanduser().resolve()))
    try:
        serve = import_serve()
        import ray
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        app = build_app(config, options, log_level=args.log_level)
    except ObclipError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    own_cluster = options.address is None
    # "local": always a fresh Ray on this machine, never a cluster someone else started.
    ray.init(address=options.address or "local", include_dashboard=False if own_cluster else None,
             logging_level=logging.WARNING)
    if config.device == "cuda":
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < options.replicas:  # Serve would wait for GPUs silently (an autoscaler may add some)
            print(f"warning: {options.replicas} replica(s) want a GPU each, the cluster has {gpus:g} now; "
                  "replicas without one wait until a GPU frees up", file=sys.stderr)

    def stop(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop)

    url = _url(config.host, config.port, options.route_prefix)
    code = 0
    try:
        # HTTP options are cluster-wide: on a cluster where Serve already runs they stay as they are.
        serve.start(http_options={"host": config.host, "port": config.port,
                                  "keep_alive_timeout_s": max(1, round(config.http.keep_alive_s))})
        print(f"deploying {options.replicas} replica(s) on {config.device}; loading the model...", file=sys.stderr)
        t0 = time.monotonic()
        try:
            serve.run(app, name=APP_NAME, route_prefix=options.route_prefix)  # returns once every replica is ready
        except RuntimeError as e:
            print(f"error: {e}{_load_failure(serve)}", file=sys.stderr)
            code = 1
        else:
            print(f"ready in {time.monotonic() - t0:.1f} s: {url}  (POST {url}/v1/steps; Ctrl-C to stop)",
                  flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down...", file=sys.stderr)
    finally:
        try:
            if own_cluster:
                serve.shutdown()
            else:  # leave other applications on a shared cluster alone
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    return code


if __name__ == "__main__":
    raise SystemExit(main())
