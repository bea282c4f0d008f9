"""A bounded load run of the cloud service on loopback: batching off vs on.

    python benchmarks/load.py [--clients 8] [--requests 200] [--window-ms 10] [--n 6]
                              [--steps 10] [-k 5] [--size 64] [--model DIR] [--acceleration NAME]

Starts the service in this process (uvicorn in a thread, on 127.0.0.1 with an
ephemeral port; the embedded mini cloud model unless --model), then runs a
closed loop: --clients threads, each with its own stdlib ServiceClient
(device/client.py), send --requests requests in all (same T, k, size; every
request its own candidates and seed) and wait for each answer before the next.
Twice, side by side: batch_window_ms=0 (one at a time) and --window-ms. Prints
per run: throughput (requests/s), p50/p95/p99 latency, errors (must be 0),
the process RSS before, after a quarter of the requests and at the end (the
service runs in this process, so it includes the client threads; from the
quarter mark on it must stay flat: before it, the allocator grows to the
largest batch shapes and keeps that memory), request and response bytes per
request; then the batched/unbatched throughput ratio. Exit status 1 if any
request failed.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

PEOPLE = [f"a photo of a{n} {age} {who}" for age, n in (("young", ""), ("middle-aged", ""), ("old", "n"))
          for who in ("man", "woman", "boy", "girl")]


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    i = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[i]


def start_service(config):
    import uvicorn

    from obclip.cloud.http_app import create_app
    from obclip.cloud.service import Service

    service = Service(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service=service), log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return service, server, thread, sock.getsockname()[1]


def make_bodies(args) -> list[bytes]:
    from obclip.runtime.plan import preset
    from obclip.runtime.protocol import StepsRequest

    acc = preset(args.acceleration) if args.acceleration else None
    bodies = []
    for i in range(args.requests):
        cands = tuple(PEOPLE[(i + j) % len(PEOPLE)] for j in range(args.n))
        bodies.append(StepsRequest(cands, i, args.steps, args.k, 7.5, args.size, args.size,
                                   acceleration=acc).to_bytes())
    return bodies


def run_load(args, window_ms: float, bodies: list[bytes]) -> dict:
    from obclip.cloud.service_config import ServiceConfig
    from obclip.device.client import ClientConfig, ServiceClient

    config = ServiceConfig(model=args.model, batch_window_ms=window_ms, queue_size=max(8, 2 * args.clients),
                           request_timeout_s=args.timeout, max_batch_rows=args.max_batch_rows,
                           torch_threads=args.torch_threads)
    service, server, thread, port = start_service(config)
    url = f"http://127.0.0.1:{port}"
    try:
        probe = ServiceClient(ClientConfig(url, timeout_s=10, retries=0))
        deadline = time.monotonic() + 300
        while not probe.ready():
            if service.state == "failed":
                raise RuntimeError(f"the service failed to load: {service.load_error}")
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready")
            time.sleep(0.05)
        # one request alone first, so lazy inits do not land in the measured run
        ServiceClient(ClientConfig(url, timeout_s=args.timeout, retries=0))(bodies[0])
        rss_before = rss_mb()
        next_i, lock = [0], threading.Lock()
        latencies, errors, sent, received = [], [], [0], [0]
        rss_quarter = [float("nan")]  # the allocator grows to the largest batch shapes first

        def client_loop() -> None:
            client = ServiceClient(ClientConfig(url, timeout_s=args.timeout, retries=0))
            while True:
                with lock:
                    if next_i[0] >= len(bodies):
                        return
                    if next_i[0] == len(bodies) // 4:
                        rss_quarter[0] = rss_mb()
                    body = bodies[next_i[0]]
                    next_i[0] += 1
                t0 = time.perf_counter()
                try:
                    data = client(body)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
                    continue
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    sent[0] += len(body)
                    received[0] += data.wire_size

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss_after = rss_mb()
        reg = service.metrics.registry
        batches = reg.get_sample_value("obclip_batch_size_count") or 0
        batched_requests = reg.get_sample_value("obclip_batch_size_sum") or 0
        ok = len(latencies)
        return {
            "window_ms": window_ms, "requests": len(bodies), "ok": ok, "errors": len(errors),
            "error_samples": errors[:3], "wall_s": wall, "throughput": ok / wall if wall else float("nan"),
            "p50": percentile(latencies, 50), "p95": percentile(latencies, 95), "p99": percentile(latencies, 99),
            "rss_before": rss_before, "rss_quarter": rss_quarter[0], "rss_after": rss_after,
            "req_bytes": sent[0] / ok if ok else float("nan"), "resp_bytes": received[0] / ok if ok else float("nan"),
            # the warm-up and the first request each ran as a batch of one
            "mean_batch": (batched_requests - 2) / (batches - 2) if batches > 2 else float("nan"),
        }
    finally:
        server.should_exit = True
        thread.join(30)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--window-ms", type=float, default=10.0, help="the batched run's window")
    p.add_argument("--n", type=int, default=6, help="candidates per request")
    p.add_argument("--steps", type=int, default=10, help="T")
    p.add_argument("-k", type=int, default=5, help="cloud steps")
    p.add_argument("--size", type=int, default=64, help="image side, pixels")
    p.add_argument("--acceleration", default=None, help="a preset name, e.g. paper-k5 (needs -k 5)")
    p.add_argument("--model", default=None, help="cloud model directory (default: the embedded mini model)")
    p.add_argument("--max-batch-rows", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--torch-threads", type=int, default=None)
    args = p.parse_args(argv)
    if not 1 <= args.n <= len(PEOPLE):
        p.error(f"--n must be in 1..{len(PEOPLE)}")

    import logging

    logging.getLogger("obclip.service").setLevel(logging.WARNING)
    bodies = make_bodies(args)
    print(f"load: {args.clients} clients, {args.requests} requests, N={args.n} T={args.steps} k={args.k} "
          f"size={args.size} accel={args.acceleration or 'none'} model={args.model or 'embedded mini'} "
          f"pid={os.getpid()}", flush=True)
    runs = [run_load(args, 0.0, bodies), run_load(args, args.window_ms, bodies)]
    head = (f"{'batching':>14} {'req/s':>8} {'p50 s':>8} {'p95 s':>8} {'p99 s':>8} {'errors':>6} "
            f"{'mean batch':>10} {'RSS MB before':>13} {'at 1/4':>8} {'end':>8} {'req B':>7} {'resp B':>8}")
    print(head)
    for r in runs:
        label = "off (0 ms)" if r["window_ms"] == 0 else f"on ({r['window_ms']:g} ms)"
        print(f"{label:>14} {r['throughput']:8.2f} {r['p50']:8.3f} {r['p95']:8.3f} {r['p99']:8.3f} "
              f"{r['errors']:6d} {r['mean_batch']:10.2f} {r['rss_before']:13.1f} {r['rss_quarter']:8.1f} "
              f"{r['rss_after']:8.1f} "
              f"{r['req_bytes']:7.0f} {r['resp_bytes']:8.0f}")
        for e in r["error_samples"]:
            print(f"  error: {e}")
    off, on = runs
    print(f"batched/unbatched throughput: {on['throughput'] / off['throughput']:.2f}x")
    return 1 if any(r["errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
