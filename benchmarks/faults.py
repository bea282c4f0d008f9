"""Fault scenarios against a live local cloud service (loopback only, bounded in count and time).

    python benchmarks/faults.py [--model DIR] [--slow-conns 200] [--idle-conns 100] [--flood 40]
                                [--serve-arg=--flag --serve-arg=value ...]

Starts ``python -m obclip.cloud.serve`` as a child on 127.0.0.1 (app/local.py; the embedded
mini model unless --model) with short timeouts and small limits, so every scenario ends within
seconds, then runs each scenario and prints one line per scenario: the answers seen, the worst
time to recovery and a verdict. Recovery means: for cancelled or timed-out work, from the
moment it was abandoned (client gone, deadline passed) to the worker being free; for connection
faults, from the fault's start to the server having closed or answered every faulty connection;
otherwise, until a valid request is answered again. Checked: zero 500s (503/504/4xx are
designed answers), zero hangs (every client step has its own bound), the worker free within
one step of the largest admitted request (plus 0.5 s for the text encoder and the answer)
after every cancelled or timed-out request, and the child's RSS flat: printed at start, at the
quarter mark and at the end; end <= quarter + 10%. Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

SERVE_ARGS = ["--timeout", "20", "--header-timeout", "2", "--keep-alive", "1", "--body-timeout", "2",
              "--send-timeout", "3", "--max-connections", "64", "--queue-size", "4", "--batch-window-ms", "0",
              "--max-candidates", "8", "--max-image-size", "64", "--torch-threads", "2"]
HEADER_TIMEOUT_S, BODY_TIMEOUT_S = 2.0, 2.0
SLACK_S = 1.0
CANCEL_SLACK_S = 0.5
HANG_S = 60.0                         # no single client step may take longer: a hang


@dataclass
class Result:
    name: str
    statuses: Counter = field(default_factory=Counter)
    recovery_s: float = 0.0
    ok: bool = True
    note: str = ""


class Live:
    """The running child: raw HTTP over loopback sockets."""

    def __init__(self, url: str, pid: int):
        self.url, self.pid = url, pid
        self.port = int(url.rsplit(":", 1)[1])

    def connect(self, timeout: float = HANG_S) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def exchange(self, raw: bytes, timeout: float = HANG_S) -> tuple[int, dict, bytes]:
        with self.connect(timeout) as s:
            try:
                s.sendall(raw)
            except OSError:
                pass
            return parse(read_all(s))

    def post(self, body: bytes, path: str = "/v1/steps", timeout: float = HANG_S) -> tuple[int, dict, bytes]:
        return self.exchange(post_head(body, path) + body, timeout)

    def metric(self, name: str, labels: str = "") -> float:
        """The sum of a metric's samples from GET /metrics (those whose labels contain ``labels``)."""
        status, _, text = self.exchange(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 10)
        total = 0.0
        for line in text.decode().splitlines():
            key, _, value = line.rpartition(" ")
            if key.split("{")[0] == name and labels in key:
                total += float(value)
        return total

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.pid).memory_info().rss / 2**20


def post_head(body: bytes, path: str = "/v1/steps") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()


def read_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return data


def parse(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 "):
        return 0, {}, data        # 0: the connection closed without an answer
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def is_json_error(answer: tuple[int, dict, bytes]) -> bool:
    status, headers, body = answer
    try:
        return headers.get("content-type", "").startswith("application/json") and "code" in json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False


def request_body(n: int = 4, steps: int = 4, k: int = 2, size: int = 64, seed: int = 0, **kw) -> bytes:
    from obclip.runtime.protocol import StepsRequest

    cands = tuple(f"a photo of person {i}" for i in range(n))
    return StepsRequest(cands, seed, steps, k, 7.5, size, size, **kw).to_bytes()


def with_field(name: str, raw_value: str) -> bytes:
    obj = json.loads(request_body())
    obj[name] = "@@"
    return json.dumps(obj).replace('"@@"', raw_value).encode()


def probe(live: Live) -> float:
    """Seconds until a valid request is answered 200 (the service has recovered)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < HANG_S:
        if live.post(request_body(n=2, steps=2, k=1))[0] == 200:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise TimeoutError("the service did not recover")


def wait_running(live: Live, value: float, timeout: float = HANG_S) -> float:
    """Seconds until obclip_jobs_running == value."""
    t0 = time.monotonic()
    while live.metric("obclip_jobs_running") != value:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"obclip_jobs_running did not become {value} within {timeout:g} s")
        time.sleep(0.02)
    return time.monotonic() - t0


# -- scenarios ------------------------------------------------------------------------------------
def valid_requests(live: Live, args) -> Result:
    r = Result("valid requests x3")
    for i in range(3):
        r.statuses[live.post(request_body(seed=i))[0]] += 1
    r.ok = r.statuses == Counter({200: 3})
    return r


def largest_admitted(live: Live, args) -> Result:
    """One request of the largest admitted step (N = max candidates at the max image size):
    the bound for cancellation. Two steps, so the worst-step gauge sees a full step."""
    r = Result("largest admitted step, to completion")
    t0 = time.monotonic()
    r.statuses[live.post(request_body(n=8, steps=4, k=2, seed=1))[0]] += 1
    r.recovery_s = 0.0
    r.note = f"took {time.monotonic() - t0:.2f} s; worst step {live.metric('obclip_worst_step_seconds'):.2f} s"
    r.ok = r.statuses == Counter({200: 1})
    return r


def cancel_bound(live: Live) -> float:
    return live.metric("obclip_worst_step_seconds") + CANCEL_SLACK_S


def deadline_mid_run(live: Live, args) -> Result:
    """A request over the deadline (50 steps of the largest admitted size): 504 at the deadline,
    the worker free within one step."""
    r = Result("deadline passes mid-run")
    for i in range(1):
        status = live.post(request_body(n=8, steps=50, k=50, seed=10 + i))[0]
        t_answer = time.monotonic()
        r.statuses[status] += 1
        wait_running(live, 0)
        server_side = live.metric("obclip_worst_cancel_to_free_seconds")
        r.recovery_s = max(r.recovery_s, time.monotonic() - t_answer, server_side)
    bound = cancel_bound(live)
    r.ok = r.statuses == Counter({504: 1}) and r.recovery_s <= bound
    r.note = f"bound {bound:.2f} s (worst step + {CANCEL_SLACK_S} s)"
    return r


def disconnect_mid_run(live: Live, args) -> Result:
    r = Result("client disconnects mid-run x3")
    for i in range(3):
        body = request_body(n=8, steps=50, k=50, seed=20 + i)
        with live.connect() as s:
            s.sendall(post_head(body) + body)
            wait_running(live, 1)
            time.sleep(0.5)
        gone = time.monotonic()
        wait_running(live, 0)
        r.recovery_s = max(r.recovery_s, time.monotonic() - gone)
        r.statuses["closed by client"] += 1
    r.recovery_s = max(r.recovery_s, live.metric("obclip_worst_cancel_to_free_seconds"))
    bound = cancel_bound(live)
    r.ok = r.recovery_s <= bound
    r.note = f"bound {bound:.2f} s (worst step + {CANCEL_SLACK_S} s)"
    return r


def over_budget(live: Live, args) -> Result:
    r = Result("over the limits (1024 px, N=32, cost)")
    for body in (request_body(n=8, size=1024), request_body(n=32), request_body(n=8, steps=100, k=100)):
        answer = live.post(body)
        r.statuses[answer[0]] += 1
        r.ok &= is_json_error(answer)
    r.ok &= all(400 <= s < 500 for s in r.statuses)
    return r


def hostile_fields(live: Live, args) -> Result:
    r = Result("hostile fields and paths")
    bodies = [with_field("candidates", '["\\ud800", "a"]'), with_field("guidance_scale", "1e308"),
              with_field("guidance_scale", "NaN"), with_field("seed", "9" * 5000),
              with_field("height", "[" * 100_000 + "]" * 100_000), b"{" * 50_000]
    answers = [live.post(b) for b in bodies] + [live.post(request_body(), path="/v1/steps/"),
                                               live.exchange(b"\x16\x03\x01 garbage\r\n\r\n")]
    for a in answers:
        r.statuses[a[0]] += 1
        r.ok &= is_json_error(a) and 400 <= a[0] < 500
    return r


def oversized_head(live: Live, args) -> Result:
    """A 100 MB header sent as fast as the server takes it."""
    r = Result("100 MB header")
    t0 = time.monotonic()
    with live.connect() as s:
        s.sendall(b"POST /v1/steps HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent, chunk = 0, b"a" * (1 << 20)
        try:
            while sent < 100 << 20:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        answer = parse(read_all(s))
    r.recovery_s = time.monotonic() - t0
    r.statuses[answer[0]] += 1
    r.ok = answer[0] == 431 and is_json_error(answer)
    r.note = f"server stopped it after {sent / 2**20:.0f} MiB sent"
    return r


def many_headers(live: Live, args) -> Result:
    r = Result("200 header fields")
    body = request_body()
    head = post_head(body).replace(b"\r\n\r\n", b"\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n")
    answer = live.exchange(head + body)
    r.statuses[answer[0]] += 1
    r.ok = answer[0] == 431 and is_json_error(answer)
    return r


def connection_flood(live: Live, count: int, name: str, drip: bytes | None, interval: float) -> Result:
    """``count`` connections at once; each sends ``drip`` every ``interval`` (None: nothing).
    Recovery: until the server has answered or closed every one of them."""
    r = Result(name)
    sel = selectors.DefaultSelector()
    t0 = time.monotonic()
    open_: dict[socket.socket, bytes] = {}
    for _ in range(count):
        s = live.connect(10)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        open_[s] = b""
    if drip is not None:
        for s in open_:
            try:
                s.send(b"POST /v1/steps HTTP/1.1\r\n")
            except OSError:
                pass
    next_drip = time.monotonic() + interval
    while open_ and time.monotonic() - t0 < HANG_S:
        for key, _ in sel.select(timeout=0.05):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, BlockingIOError):
                chunk = b""
            if chunk:
                open_[s] += chunk
                continue
            r.statuses[parse(open_.pop(s))[0] or "closed"] += 1
            r.recovery_s = time.monotonic() - t0
            sel.unregister(s)
            s.close()
        if drip is not None and time.monotonic() >= next_drip:
            next_drip += interval
            for s in list(open_):
                try:
                    s.send(drip)
                except OSError:
                    pass
    for s in open_:
        r.statuses["still open (hang)"] += 1
        s.close()
    r.ok = not open_ and r.recovery_s <= HEADER_TIMEOUT_S + SLACK_S and not r.statuses.get(500)
    r.note = f"bound {HEADER_TIMEOUT_S + SLACK_S:g} s; probe after: {probe(live):.2f} s"
    return r


def slow_heads(live: Live, args) -> Result:
    return connection_flood(live, args.slow_conns, f"{args.slow_conns} slow-drip heads (1 B / 0.5 s)", b"X", 0.5)


def idle_conns(live: Live, args) -> Result:
    return connection_flood(live, args.idle_conns, f"{args.idle_conns} idle connections", None, 0.5)


def slow_body(live: Live, args) -> Result:
    r = Result("slow-drip body")
    body = request_body()
    t0 = time.monotonic()
    with live.connect() as s:
        s.sendall(post_head(body) + body[:10])
        try:
            while True:
                time.sleep(0.3)
                s.sendall(b" ")
        except OSError:
            pass
        answer = parse(read_all(s))
    r.recovery_s = time.monotonic() - t0
    r.statuses[answer[0]] += 1
    r.ok = answer[0] == 408 and is_json_error(answer) and r.recovery_s <= BODY_TIMEOUT_S + SLACK_S
    return r


def request_flood(live: Live, args) -> Result:
    r = Result(f"{args.flood} concurrent requests (queue 4)")
    lock = threading.Lock()

    def one(i: int) -> None:
        status = live.post(request_body(n=2, steps=2, k=1, seed=100 + i))[0]
        with lock:
            r.statuses[status] += 1

    threads = [threading.Thread(target=one, args=(i,)) for i in range(args.flood)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S)
    r.ok = set(r.statuses) <= {200, 503, 504} and sum(r.statuses.values()) == args.flood   # designed answers
    r.recovery_s = probe(live)
    return r


def unread_answers(live: Live, args) -> Result:
    """Clients that send a request and never read the answer (nor close)."""
    r = Result("20 clients never read their answer")
    held = []
    for i in range(20):
        s = live.connect(10)
        body = request_body(n=2, steps=2, k=1, seed=200 + i)
        s.sendall(post_head(body) + body)
        held.append(s)
    r.recovery_s = probe(live)
    for s in held:
        s.close()
    r.statuses["probe 200"] += 1
    return r


SCENARIOS: list[Callable[[Live, argparse.Namespace], Result]] = [
    valid_requests, largest_admitted, deadline_mid_run, disconnect_mid_run,   # model work first: the
    over_budget, hostile_fields, oversized_head, many_headers, slow_heads,   # allocator's high-water mark
    idle_conns, slow_body, request_flood, unread_answers, deadline_mid_run, disconnect_mid_run,
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="cloud model directory (default: the embedded mini model)")
    p.add_argument("--slow-conns", type=int, default=200)
    p.add_argument("--idle-conns", type=int, default=100)
    p.add_argument("--flood", type=int, default=40)
    p.add_argument("--serve-arg", action="append", default=[], help="one more obclip.cloud.serve argument")
    args = p.parse_args(argv)

    from obclip.app.local import LocalService, LocalServiceConfig

    cfg = LocalServiceConfig(model=args.model, serve_args=tuple(SERVE_ARGS + args.serve_arg),
                             env={"OMP_NUM_THREADS": "2"})
    failed = 0
    with LocalService(cfg) as service:
        assert service.url is not None and service.proc is not None
        live = Live(service.url, service.proc.pid)
        print(f"faults: service pid {live.pid} at {live.url}, args: {' '.join(SERVE_ARGS + args.serve_arg)}",
              flush=True)
        rss = {"start": live.rss_mb()}
        print(f"RSS start: {rss['start']:.1f} MB", flush=True)
        print(f"{'scenario':<44} {'answers':<40} {'recovery s':>10}  verdict")
        quarter = max(1, len(SCENARIOS) // 4)
        for i, scenario in enumerate(SCENARIOS):
            if i == quarter:
                rss["quarter"] = live.rss_mb()
                print(f"RSS at the quarter mark: {rss['quarter']:.1f} MB", flush=True)
            t0 = time.monotonic()
            try:
                r = scenario(live, args)
            except (OSError, TimeoutError, AssertionError) as e:
                r = Result(scenario.__name__, ok=False, note=f"{type(e).__name__}: {e}")
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(r.statuses.items(), key=str))
            failed += not r.ok
            print(f"{r.name:<44} {answers:<40} {r.recovery_s:10.2f}  {'ok' if r.ok else 'FAIL'}"
                  f"{'  (' + r.note + ')' if r.note else ''}  [{time.monotonic() - t0:.1f} s]", flush=True)
        rss["end"] = live.rss_mb()
        served_500 = live.metric("obclip_requests_total", 'status="500"')
        worst_cancel = live.metric("obclip_worst_cancel_to_free_seconds")
        worst_step = live.metric("obclip_worst_step_seconds")
    rss_ok = rss["end"] <= rss["quarter"] * 1.10
    print(f"RSS MB: start {rss['start']:.1f}, quarter {rss['quarter']:.1f}, end {rss['end']:.1f} "
          f"(end <= quarter + 10%: {'ok' if rss_ok else 'FAIL'})")
    print(f"500s served: {served_500:.0f}; worst cancel-to-free {worst_cancel:.3f} s, worst step {worst_step:.3f} s")
    failed += (not rss_ok) + (served_500 > 0)
    print("all checks passed" if not failed else f"{failed} check(s) FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
