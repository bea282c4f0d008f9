"""The model worker: one thread for all model work, the bounded queue in front of it, and
cross-request batching. No HTTP here: a caller queues a request (``enqueue``) and waits on the
job's future for an ``Outcome``; tests drive it with a step runner and threads alone.

One worker thread runs all model work (load, warm-up, requests), so torch never runs two
batches at once. Cross-request batching: the worker takes the first queued request and, for up
to ``batch_window_ms``, every queued request with the same T, k, size, guidance and
acceleration (up to ``max_batch_rows`` UNet rows), and runs them as one batch
(``CloudStepRunner.run_batch``); each gets the bytes it would get alone. ``batch_window_ms=0``:
one at a time. At most ``queue_size`` requests wait; the next is refused (``Overloaded``).

Cancellation: a job whose waiter gives up (deadline, client gone) is ``abandon``-ed. If it has
not started it is dropped from the queue; if it is running, its batch stops before its next
cloud step once every job of the batch was abandoned (the step loop's ``before_step`` is the
cancellation point; one step cannot be interrupted), and its result is discarded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from obclip.runtime.errors import InputError, ObclipError, ServiceError
from obclip.runtime.plan import PlannedStep
from obclip.runtime.protocol import StepsRequest, encode_handoff

from .answers import describe_request
from .metrics import Metrics
from .service_config import ServiceConfig
from .steps import CloudStepRunner

if TYPE_CHECKING:
    from .steps import CloudResult

log = logging.getLogger("obclip.service")


class StepRunner(Protocol):
    """What the worker runs requests on (cloud.steps.CloudStepRunner)."""

    def run(self, request: StepsRequest,
            before_step: Callable[[PlannedStep], None] | None = None) -> CloudResult: ...

    def run_batch(self, requests: Sequence[StepsRequest],
                  before_step: Callable[[PlannedStep], None] | None = None) -> list[CloudResult]: ...


class Overloaded(ServiceError):
    """The queue is full: retry later."""

    code = "overloaded"


class ShuttingDown(ServiceError):
    """The service is closing: retry, on another instance."""

    code = "shutting_down"


class _Cancelled(Exception):
    """Raised inside the step loop (by ``before_step``) when the request was abandoned."""


@dataclass
class Outcome:
    """What the worker hands a request's waiter: ok (data, run_s), cancelled, or error."""

    kind: str                           # "ok" | "cancelled" | "error"
    data: bytes = b""
    run_s: float = 0.0
    error: Exception | None = None      # kind "error": answered by its kind (cloud/answers.py)


class Job:
    __slots__ = ("request", "deadline", "cancelled", "abandoned_at", "step_starts", "future", "taken", "key",
                 "rows")

    def __init__(self, request: StepsRequest, deadline: float = math.inf):
        self.request = request
        self.deadline = deadline        # time.monotonic(): the worker stops the job at a step boundary after it
        self.cancelled = threading.Event()
        self.abandoned_at: float | None = None   # time.monotonic() of the abandonment (timeout, disconnect)
        self.step_starts: list[float] = []
        self.future: concurrent.futures.Future[Outcome] = concurrent.futures.Future()   # set by the worker
        self.taken = False              # out of the queue (run, batched or dropped); under Worker._lock
        self.key = CloudStepRunner.batch_key(request)
        self.rows = 2 * request.n

    def abandon(self, when: float | None = None) -> None:
        if self.abandoned_at is None:
            self.abandoned_at = time.monotonic() if when is None else when
        self.cancelled.set()


class Worker:
    """The model thread, its queue and its batching (see the module docstring)."""

    def __init__(self, config: ServiceConfig, metrics: Metrics):
        self.config = config
        self.metrics = metrics
        self.runner: StepRunner | None = None     # set once the model is loaded
        self.model_id = ""                        # written into every handoff
        self.closed = False
        self.on_batch: Callable[[list[StepsRequest]], None] | None = None   # hook: each batch before it runs
        self.worst_cancel_to_free_s = 0.0         # the cancellation bound actually measured
        self.worst_step_s = 0.0
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="obclip-model")
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)   # notified when a job is queued
        self._pending: list[Job] = []       # queued, not taken yet, in arrival order
        self._waiting = 0
        self._current: list[Job] | None = None   # the batch the worker runs; close() cancels it

    # -- what callers see -------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Requests queued, not taken yet."""
        return self._waiting

    @property
    def running_batch(self) -> list[Job] | None:
        return self._current

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the model thread (the service's load and warm-up), after the work queued before it."""
        return self._executor.submit(fn)

    def enqueue(self, request: StepsRequest, deadline: float) -> Job:
        """Queue a request; its ``future`` gets the Outcome. Overloaded when queue_size wait already,
        ShuttingDown once closed."""
        cfg = self.config
        with self._lock:
            if self._waiting >= cfg.queue_size:
                raise Overloaded(f"the service is busy ({self._waiting} requests waiting, "
                                 f"queue_size={cfg.queue_size}); retry later")
            job = Job(request, deadline)
            self._waiting += 1
            self._pending.append(job)
            self.metrics.queue_depth.set(self._waiting)
            self._arrived.notify_all()
        try:
            self._executor.submit(self._execute, job)
        except RuntimeError:  # executor shut down
            self.drop(job, count=False)
            raise ShuttingDown("the service is shutting down; retry on another instance") from None
        return job

    def drop(self, job: Job, count: bool = True) -> None:
        """Take an abandoned job out of the queue if it has not started (it never will)."""
        with self._lock:
            if not job.taken:
                job.taken = True
                self._pending.remove(job)
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)
                if count and not self.closed:
                    self.metrics.cancelled.labels(stage="queued").inc()

    def close(self) -> None:
        """Stop taking work: drop queued jobs, stop the running one at its next step."""
        self.closed = True
        with self._lock:
            dropped, self._pending = self._pending, []
            for job in dropped:
                job.taken = True
                self._waiting -= 1
            self.metrics.queue_depth.set(self._waiting)
        for job in dropped:
            job.abandon()
            job.future.cancel()
        for job in self._current or ():
            job.abandon()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the model thread ---------------------------------------------------------------------------
    @staticmethod
    def _before_step(batch: list[Job], step_starts: list[float]) -> None:
        """Called by the step loop before each cloud step: the cancellation point (the batch stops
        only when every one of its jobs was abandoned or is past its deadline), and step timing."""
        now = time.monotonic()
        for job in batch:
            if not job.cancelled.is_set() and now > job.deadline:
                job.abandon(job.deadline)   # the waiter answers 504; the worker need not wait for it
        if all(job.cancelled.is_set() for job in batch):
            raise _Cancelled()
        step_starts.append(time.perf_counter())

    def run(self, batch: list[Job]) -> tuple[list[bytes | ObclipError], float]:
        """Run a batch of jobs on the model (model thread only): one handoff (or, for a result that
        is not finite, an InputError) per job. Raises _Cancelled if every job was abandoned mid-way."""
        runner = self.runner
        if runner is None:
            raise ServiceError("the model is not loaded", code="not_ready")
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
        out: list[bytes | ObclipError] = []
        for request, result in zip(requests, results):
            if not (np.isfinite(result.latents).all() and np.isfinite(result.prev_x0).all()):
                # e.g. an extreme guidance scale on a model that overflows: refuse, never send NaN.
                out.append(InputError("the model produced non-finite values for this request (guidance_scale="
                                      f"{request.guidance_scale:g}); lower guidance_scale", code="non_finite_result"))
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

    def _take(self, job: Job) -> bool:
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
                job.future.set_result(Outcome("cancelled"))
            return False
        return True

    def _collect(self, first: Job) -> list[Job]:
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
            if left <= 0 or rows + 2 > cfg.max_batch_rows or self.closed:
                return batch
            self._arrived.wait(left)

    def _execute(self, job: Job) -> None:
        """Model-thread entry for a queued request (one per request). A job another job's batch took, or
        one abandoned in the queue, returns at once; otherwise it leads a batch. Answers go to each
        job's future as an Outcome, never raised."""
        with self._lock:
            if job.taken or not self._take(job):
                return
            batch = self._collect(job)
        self.metrics.running.set(1)
        answers: list[Outcome]
        try:
            data, run_s = self.run(batch)
            answers = [Outcome("error", error=d) if isinstance(d, ObclipError) else Outcome("ok", d, run_s)
                       for d in data]
        except _Cancelled:
            self._freed(batch)
            log.info("abandoned batch of %d stopped after %d step(s)", len(batch), len(job.step_starts))
            answers = [Outcome("cancelled")] * len(batch)
        except InputError as e:
            # The checks before the queue should have caught it; still the client's request.
            answers = [Outcome("error", error=e)] * len(batch)
        except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, generic answer
            log.exception("model worker failed on a batch of %d (%s): %s", len(batch),
                          describe_request(job.request), type(e).__name__)
            answers = [Outcome("error", error=e)] * len(batch)   # a bug: answered 500 "internal"
        finally:
            self.metrics.running.set(0)
        if all(j.cancelled.is_set() for j in batch) and answers[0].kind != "cancelled":
            self._freed(batch)   # abandoned during its last step: finished anyway, free now
        for j, answer in zip(batch, answers):
            if j.cancelled.is_set():   # abandoned while running: its result is discarded
                self.metrics.cancelled.labels(stage="running").inc()
                answer = Outcome("cancelled")
            j.future.set_result(answer)

    def _freed(self, batch: list[Job]) -> None:
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
