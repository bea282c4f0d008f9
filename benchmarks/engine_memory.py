"""Serving memory of a cloud engines folder, with every step mode loaded, and the handoff against torch.

    python benchmarks/engine_memory.py --engines OUT/cloud [--model CLOUD_DIR] [--presets paper-k5,...]
                                       [--n 2] [--size 256] [--steps 25] [--threads T]
                                       [--memory none|arena|shared] [--rounds 2]

In one process, before torch is imported: the resident memory at start,
after ``OrtEngine`` has opened the folder (manifest and hashes checked, the
text encoder and every mode graph loaded as onnxruntime sessions over one
memory-mapped ``weights.bin``), and after one request per preset through the
onnxruntime backend, ``--rounds`` times (the first round's sessions are cold). ``--memory``: how
the sessions allocate (none: no CPU arena, the serving default; arena: one arena per session;
shared: one arena for all sessions, onnxruntime's environment allocator). RSS is split as /proc
reports it: RssFile (pages of mapped files: the shared weights, counted once however many sessions read
them) and RssAnon (the process's own memory: session state, activations);
VmHWM is the peak. Then it checks that torch was never imported and, with
``--model``, runs the same requests on the torch backend and prints
max|a-b| / max(1, max|b|) of the latents and the solver state.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

CANDIDATES = ("a photo of a young man", "a photo of an old man", "a photo of a young woman",
              "a photo of an old woman", "a photo of a middle-aged man", "a photo of a middle-aged woman")


def memory_mb() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile and VmHWM of this process, MB (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(1.0, float(np.abs(b).max())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", type=Path, required=True, help="the cloud engines folder (OUT/cloud)")
    p.add_argument("--model", default=None, help="the model folder they were exported from: also run torch")
    p.add_argument("--presets", default="paper-k5,paper-k10+extras,lean-k10",
                   help="comma-separated presets; '+extras' adds cross_kv_once and merge_step0_uncond "
                        "(default %(default)s)")
    p.add_argument("--n", type=int, default=2, help=f"candidates per request, 1..{len(CANDIDATES)}")
    p.add_argument("--size", type=int, default=256, help="image size in px (default %(default)s)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--memory", choices=("none", "arena", "shared"), default="none")
    p.add_argument("--rounds", type=int, default=2, help="times every preset's request is run")
    args = p.parse_args(argv)
    if not 1 <= args.n <= len(CANDIDATES):
        p.error(f"--n must be between 1 and {len(CANDIDATES)}")

    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.steps import CloudStepRunner
    from obclip.runtime.plan import preset
    from obclip.runtime.protocol import StepsRequest

    def row(label: str, seconds: float | None = None) -> None:
        m = memory_mb()
        secs = f"{seconds:8.2f}" if seconds is not None else " " * 8
        print(f"{label:46s} {secs} {m['VmRSS']:9.0f} {m['RssFile']:9.0f} {m['RssAnon']:9.0f} {m['VmHWM']:9.0f}",
              flush=True)

    print(f"{'phase':46s} {'seconds':>8s} {'RSS MB':>9s} {'file MB':>9s} {'anon MB':>9s} {'peak MB':>9s}")
    row("start (obclip imported)")
    t0 = time.perf_counter()
    engine = OrtEngine(args.engines, threads=args.threads, memory_arena=args.memory == "arena",
                       shared_arena=args.memory == "shared")
    row(f"loaded: text encoder + {len(engine.manifest.modes)} mode graphs", time.perf_counter() - t0)
    weights = args.engines / "unet" / "weights.bin"
    print(f"weights.bin {weights.stat().st_size / 1e6:.1f} MB, shared by every mode session")

    runner = CloudStepRunner(engine=engine)
    requests = []
    for name in args.presets.split(","):
        base, extras = name.removesuffix("+extras"), name.endswith("+extras")
        acc = preset(base)
        if extras:
            acc = acc.replace(cross_kv_once=True, merge_step0_uncond=True)
        requests.append((name, StepsRequest(CANDIDATES[:args.n], 11, args.steps, acc.switch_step, 7.5,
                                            args.size, args.size, acceleration=acc)))
    got = {}
    for round_ in range(args.rounds):
        for name, request in requests:
            t0 = time.perf_counter()
            got[name] = runner.run(request)
            row(f"after {name} (round {round_ + 1}, N={args.n}, {args.size} px, k={request.switch_step})",
                time.perf_counter() - t0)
    torch_free = "torch" not in sys.modules
    print(f"torch imported by the onnxruntime backend: {'no' if torch_free else 'YES'}")

    if args.model:
        from obclip.cloud.models import load_text_to_latent

        torch_runner = CloudStepRunner(load_text_to_latent(args.model))
        print(f"{'preset':22s} {'latents':>9s} {'prev_x0':>9s} {'torch s':>8s}")
        for name, request in requests:
            t0 = time.perf_counter()
            want = torch_runner.run(request)
            secs = time.perf_counter() - t0
            print(f"{name:22s} {rel(got[name].latents, want.latents):9.2e} "
                  f"{rel(got[name].prev_x0, want.prev_x0):9.2e} {secs:8.2f}", flush=True)
    return 0 if torch_free else 1


if __name__ == "__main__":
    raise SystemExit(main())
