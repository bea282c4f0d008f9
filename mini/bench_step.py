"""Time stage text-unet's whole training step (mini.train.text_unet_trainer), variants side by side.

    python -m mini.bench_step --rounds 3 --steps 4

Each variant runs in its own process (libgomp reads OMP_WAIT_POLICY once, at
load) and the variants alternate within every round, so a machine whose load
changes over time slows them alike. Data are random latents with the real
captions, so no VAE is needed; the step is the real one (text encoder, UNet,
Min-SNR loss, clipping, AdamW, both EMAs).

Variants:
  before: libgomp's default waiting (MINI_OMP_DEFAULTS=1), unfused AdamW
  after:  passive waiting (mini.train's default), fused AdamW
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "before": {"env": {"MINI_OMP_DEFAULTS": "1"}, "fused": False},
    "after": {"env": {}, "fused": True},
    # alternatives considered
    "after-1thread": {"env": {}, "fused": True, "threads": 1},
    "spin10k": {"env": {"MINI_OMP_DEFAULTS": "1", "GOMP_SPINCOUNT": "10000"}, "fused": True},
}


def child(variant: str, steps: int, warmup: int, threads: int) -> dict:
    import numpy as np
    import torch

    import mini.train as T  # first: it sets OMP_WAIT_POLICY before torch loads libgomp
    from mini.shapes import make_dataset

    torch.set_num_threads(threads)
    if not VARIANTS[variant]["fused"]:
        T._adamw = lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd)  # the old optimiser
    hp = T.Hyper()
    with tempfile.TemporaryDirectory() as tmp:
        run = T.Run(hp=hp, scale=1.0, work=Path(tmp), out=Path(tmp), device=torch.device("cpu"), threads=threads)
        _, captions, _ = make_dataset(2000, seed=hp.seed)
        data = T.Latents.__new__(T.Latents)  # random latents instead of the VAE's, same shapes
        data.captions = sorted(set(captions)) + [""]
        data.empty = len(data.captions) - 1
        index = {c: i for i, c in enumerate(data.captions)}
        data.mean = torch.randn(hp.n_train, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        data.scaling = 1.0
        data.caption_index = torch.tensor([index[captions[i % len(captions)]] for i in range(hp.n_train)])
        tr = T.text_unet_trainer(run, data, total=hp.unet_steps)
        for s in range(warmup):
            tr.step(s)
        times = []
        for s in range(warmup, warmup + steps):
            t0 = time.perf_counter()
            tr.step(s)
            times.append(time.perf_counter() - t0)
    return {"variant": variant, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "optimizer_fused": tr.opt.defaults.get("fused"), "threads": torch.get_num_threads(),
            "batch": hp.batch, "step_s": [round(t, 4) for t in times], "min": round(min(times), 4),
            "median": round(float(np.median(times)), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mini.bench_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="before,after")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warmup, args.threads)), flush=True)
        return 0

    names = args.variants.split(",")
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("OMP_WAIT_POLICY", "MINI_OMP_DEFAULTS", "GOMP_SPINCOUNT")}
            env.update(VARIANTS[name]["env"])
            threads = VARIANTS[name].get("threads", args.threads)
            out = subprocess.run([sys.executable, "-m", "mini.bench_step", "--child", name, "--steps", str(args.steps),
                                  "--warmup", str(args.warmup), "--threads", str(threads)],
                                 env=env, capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(res)
            print(f"round {r + 1} {name:13s} wait={res['omp_wait_policy']} fused={res['optimizer_fused']} "
                  f"threads={res['threads']}: "
                  f"steps {' '.join(f'{t:.2f}' for t in res['step_s'])} s", flush=True)
    load = os.getloadavg()
    print(f"\nwhole text-unet step, batch {results[names[0]][0]['batch']}, {args.threads} threads unless said "
          f"({args.rounds} rounds x {args.steps} steps, alternating; load average now {load[0]:.1f}):")
    for name, rs in results.items():
        allt = sorted(t for r in rs for t in r["step_s"])
        print(f"  {name:13s} min {allt[0]:.2f} s, median {statistics.median(allt):.2f} s, max {allt[-1]:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
