"""The service's Prometheus metrics, in a registry of their own (one per service)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
