"""Serving time and memory of a cloud engines folder, with every step mode loaded, and the handoff against torch.

    python benchmarks/engine_memory.py --engines OUT/cloud [--model CLOUD_DIR] [--presets paper-k5,...]
                                       [--n 2] [--size 256] [--steps 25] [--threads T]
                                       [--memory none|arena|shared|shared+prepack] [--optimization extended|all]
                                       [--warm N] [--rounds 2] [--json PATH]
    python benchmarks/engine_memory.py --engines OUT/cloud --compare none,arena,shared,shared+prepack \
                                       --processes 3 --rounds 4 [--json PATH]      # side by side

In one process, before torch is imported: the resident memory at start,
after ``OrtEngine`` has opened the folder (manifest and hashes checked, the
text encoder and every mode graph loaded as onnxruntime sessions over one
memory-mapped ``weights.bin``), and after one request per preset through the
onnxruntime backend, ``--rounds`` times (the first round's sessions are cold unless ``--warm N``
ran ``OrtEngine.warm`` at N candidates first). ``--memory``: how the sessions allocate
(cloud/engine_backend.MEMORY_MODES: none, no CPU arena; arena, one arena per session; shared, one
arena for all sessions, onnxruntime's environment allocator; shared+prepack, that with prepacked
weights). RSS is split as /proc reports it: RssFile (pages of mapped files: the shared weights,
counted once however many sessions read them) and RssAnon (the process's own memory: session
state, activations); VmHWM is the peak. Then it checks that torch was never imported and, with
``--model``, runs the same requests on the torch backend and prints
max|a-b| / max(1, max|b|) of the latents and the solver state.

``--compare``: each memory mode in its own process (peak RSS is per process), ``--processes``
processes per mode started in turn (A B C D A B C D ...), so a slower phase of a shared machine
touches every mode alike; per mode and preset the warm requests' (rounds 2..) min and median seconds
over all its processes, the first round's median, and the largest peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from obclip.cloud.service_config import MEMORY_MODES

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


def summarise(runs: list[dict]) -> list[dict]:
    """Per memory mode and preset, over every process's rows: warm min / median, cold median, peak."""
    out = []
    for mode in dict.fromkeys(r["memory"] for r in runs):
        mine = [r for r in runs if r["memory"] == mode]
        peak = max(r["peak_mb"] for r in mine)
        loaded = max(r["loaded"]["rss_mb"] for r in mine)
        for name in dict.fromkeys(row["preset"] for r in mine for row in r["rows"]):
            rows = [row for r in mine for row in r["rows"] if row["preset"] == name]
            warm = [row["seconds"] for row in rows if row["round"] > 1]
            cold = [row["seconds"] for row in rows if row["round"] == 1]
            out.append({"memory": mode, "preset": name, "warm_min_s": min(warm) if warm else None,
                        "warm_median_s": statistics.median(warm) if warm else None,
                        "first_median_s": statistics.median(cold), "repeats": len(warm),
                        "processes": len(mine), "loaded_rss_mb": loaded, "peak_rss_mb": peak,
                        "final_anon_mb": max(r["rows"][-1]["anon_mb"] for r in mine)})
    return out


def compare(args: argparse.Namespace, argv: list[str]) -> int:
    """Each mode of ``--compare`` in its own process, ``--processes`` rounds of them in turn."""
    modes = args.compare.split(",")
    unknown = [m for m in modes if m not in MEMORY_MODES]
    if unknown:
        print(f"error: --compare {unknown}: each must be one of {list(MEMORY_MODES)}", file=sys.stderr)
        return 2
    passed = []   # this command's own flags, less the driver's
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--compare", "--processes", "--json", "--memory", "--model"):
            skip = True
            continue
        if a.split("=")[0] in ("--compare", "--processes", "--json", "--memory", "--model"):
            continue
        passed.append(a)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in range(args.processes):
            for mode in modes:
                out = Path(tmp) / f"{p}-{mode}.json"
                cmd = [sys.executable, __file__, *passed, "--memory", mode, "--json", str(out)]
                print(f"# process {p + 1}/{args.processes}: --memory {mode}", file=sys.stderr, flush=True)
                done = subprocess.run(cmd, stdout=subprocess.DEVNULL)
                if done.returncode != 0:
                    print(f"error: {' '.join(cmd)} exited {done.returncode}", file=sys.stderr)
                    return 1
                runs.append(json.loads(out.read_text()))
    table = summarise(runs)
    base = {r["preset"]: r for r in table if r["memory"] == modes[0]}
    print(f"{'memory':16s} {'preset':20s} {'warm min s':>10s} {'warm med s':>10s} {'x ' + modes[0]:>9s} "
          f"{'first s':>8s} {'loaded MB':>9s} {'peak MB':>8s}")
    for r in table:
        ratio = base[r["preset"]]["warm_median_s"] / r["warm_median_s"] if r["warm_median_s"] else float("nan")
        r["vs_first_mode"] = ratio
        print(f"{r['memory']:16s} {r['preset']:20s} {r['warm_min_s'] or float('nan'):10.3f} "
              f"{r['warm_median_s'] or float('nan'):10.3f} {ratio:9.2f} {r['first_median_s']:8.3f} "
              f"{r['loaded_rss_mb']:9.0f} {r['peak_rss_mb']:8.0f}")
    if args.json:
        doc = {"command": "python benchmarks/engine_memory.py " + " ".join(argv), "modes": modes,
               "summary": table, "runs": runs}
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False, default=float) + "\n")
    return 0


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
    p.add_argument("--memory", choices=MEMORY_MODES, default=None,
                   help="how the mode sessions allocate (default: OrtEngine's)")
    p.add_argument("--optimization", choices=("extended", "all"), default=None,
                   help="the mode sessions' graph optimisation level (default: OrtEngine's)")
    p.add_argument("--warm", type=int, default=0, metavar="N",
                   help="OrtEngine.warm at N candidates and --size before the first round (0: none)")
    p.add_argument("--rounds", type=int, default=2, help="times every preset's request is run")
    p.add_argument("--json", default=None, help="also write the rows (or, with --compare, the summary) here")
    p.add_argument("--compare", default=None, metavar="MODES",
                   help="comma-separated memory modes, each in its own process, side by side")
    p.add_argument("--processes", type=int, default=2, help="with --compare: processes per mode")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if not 1 <= args.n <= len(CANDIDATES):
        p.error(f"--n must be between 1 and {len(CANDIDATES)}")
    if args.compare:
        return compare(args, argv)

    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.steps import CloudStepRunner
    from obclip.runtime.plan import preset
    from obclip.runtime.protocol import StepsRequest

    def row(label: str, seconds: float | None = None) -> dict[str, float]:
        m = memory_mb()
        secs = f"{seconds:8.2f}" if seconds is not None else " " * 8
        print(f"{label:46s} {secs} {m['VmRSS']:9.0f} {m['RssFile']:9.0f} {m['RssAnon']:9.0f} {m['VmHWM']:9.0f}",
              flush=True)
        return {"rss_mb": m["VmRSS"], "file_mb": m["RssFile"], "anon_mb": m["RssAnon"], "peak_mb": m["VmHWM"]}

    print(f"{'phase':46s} {'seconds':>8s} {'RSS MB':>9s} {'file MB':>9s} {'anon MB':>9s} {'peak MB':>9s}")
    row("start (obclip imported)")
    t0 = time.perf_counter()
    options = {k: v for k, v in (("memory", args.memory), ("optimization", args.optimization)) if v is not None}
    engine = OrtEngine(args.engines, threads=args.threads, **options)
    memory_mode = engine.memory
    loaded = row(f"loaded: text encoder + {len(engine.manifest.modes)} mode graphs", time.perf_counter() - t0)
    warm_s = None
    if args.warm:
        t0 = time.perf_counter()
        engine.warm(args.warm, args.size, args.size)
        warm_s = time.perf_counter() - t0
        row(f"warmed: {len(engine.warmed)} graphs at N={args.warm}", warm_s)
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
    rows = []
    for round_ in range(args.rounds):
        for name, request in requests:
            t0 = time.perf_counter()
            got[name] = runner.run(request)
            secs = time.perf_counter() - t0
            m = row(f"after {name} (round {round_ + 1}, N={args.n}, {args.size} px, k={request.switch_step})", secs)
            rows.append({"preset": name, "round": round_ + 1, "seconds": secs, **m})
    torch_free = "torch" not in sys.modules
    print(f"torch imported by the onnxruntime backend: {'no' if torch_free else 'YES'}")
    if args.json:
        doc = {"memory": memory_mode, "optimization": engine.optimization, "warm_s": warm_s, "n": args.n,
               "size": args.size, "steps": args.steps, "threads": args.threads, "loaded": loaded, "rows": rows,
               "peak_mb": memory_mb()["VmHWM"], "torch_free": torch_free}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")

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
