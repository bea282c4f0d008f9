"""Server wall time per request: ObCLIP's cloud steps, with and without accelerations, against the baselines.

    python benchmarks/latency.py [--device cpu|cuda] [--dtype float32|float16] [--model mini|sd-v1.4]
                                 [--repeats R] [--n 2 4 6] [--presets paper-k5 paper-k10] [--json]
                                 [--backend torch onnxruntime --engines OUT/cloud] [--engine-memory MODE]
                                 [--no-baselines] [--cloud-model DIR] [--solver dpmsolver++|lcm]

Rows (one request each, timed around ``CloudStepRunner.run``, the server's
whole request: prompt encoding, shared noise, the plan's cloud steps
through ``step_modes.run_mode`` on the engine, the solver, the copy of the result to host):

    SD cloud only     N = 1, all T steps, the prompt as typed (not private)   (SDXL family: "SDXL cloud only")
    Hybrid SD         N = 1, k steps, the prompt as typed (not private)   ("Hybrid SDXL")
    vanilla OG        N candidates, all T steps, no acceleration (the N runs batched in one request)
    ObCLIP            N candidates, k steps, every step a full pass
    + cache           attention cache from r + block skip from s (the paper's "+cache" row)
    + cache + reuse   the preset: batch reuse before r, cache from r, skip from s
    + exact extras    the preset + cross-attention K/V once per request + merged step-0 unconditional rows
                      (a guidance-embedding UNet, LCM-SDXL, has no unconditional rows: K/V once only)

All rows are measured in one run, interleaved: after a warm-up round of
every request, each repeat runs every request once (round-robin, the
starting request rotating per repeat so slow drift spreads evenly). Reported:
min and median, the speed-ups median(ObCLIP, same N, the preset's k) / median(row)
(and the same with minima) and median(vanilla OG, same N) / median(row), and
beside them each row's FLOPs ratio FLOPs(ObCLIP) / FLOPs(row), counted from the
ops that run (benchmarks/flops.py's counter, the model's native size). A
time ratio above its FLOPs ratio (by more than 5%) cannot come from the
FLOPs saved and is flagged "noise": rerun with more --repeats on a quiet
machine before quoting it.

Models: on CPU the embedded mini model (or --cloud-model) with its text
encoder; with --device cuda by default SD-v1.4's UNet config with random
weights in fp16 at 512 px, and a random [N+1, 77, 768] text embedding in
place of the CLIP text encoder (not timed: about one pass of a 123 M-parameter
encoder over N+1 prompts per request in a real server). Timing on CUDA uses
CUDA events after a torch.cuda.synchronize(); the code path is otherwise the
same as on CPU. Random weights do not change the work a step does.

Backends: ``--backend torch torch-compiled onnxruntime`` times every request on
each, interleaved in the same rounds. torch-compiled: every step mode through
``torch.compile(mode="reduce-overhead")`` (CUDA graphs on cuda), compiled in
the warm-up round, which is not timed. onnxruntime: the cloud engines in
``--engines``, exported from the same model with ``python
export/build_engines.py --cloud-model DIR`` (its default ``--cloud-modes
presets`` holds every row's step modes). The column "vs torch" is
median(torch, same request) / median(row). For a mid-size SD-v1.4-shaped UNet
on CPU: ``python benchmarks/cloud_engines.py --write-narrow-sd DIR``, export
DIR, then ``--cloud-model DIR --engines OUT/cloud``.

SDXL family on the tiny models (the full topologies at 32-64 channels, random weights):
``python benchmarks/cloud_engines.py --write-tiny-sdxl DIR`` writes DIR/sdxl, DIR/koala-700m and
DIR/lcm-sdxl; export the cloud one (``python export/build_engines.py --cloud-model DIR/sdxl --out
OUT``) and time ``--cloud-model DIR/sdxl --backend torch onnxruntime --engines OUT/cloud``; LCM-SDXL with
``--solver lcm --steps 8 --presets paper-lcm-k4``. Their FLOPs column is counted on the named config the
folder's obclip_model.json gives (sdxl-tiny, lcm-sdxl-tiny), at the timed latent size.

The paper's V100 seconds (docs/method.md) are printed in their own column as a
reference only: a different GPU, real weights and the paper's own code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from obclip.cloud.service_config import MEMORY_MODES
from obclip.runtime.plan import PRESETS, AccelerationConfig, preset
from obclip.runtime.solver import DPM_SOLVER, SOLVER_KINDS

SEED = 1234
GUIDANCE = 7.5
PAPER_T = 25
# docs/method.md, section 6: server latency on one V100, seconds. Reference only.
PAPER_V100_S = {
    ("cloud-only", 1, None): 1.28,
    ("hybrid-sd", 1, 5): 0.30, ("hybrid-sd", 1, 10): 0.51,
    ("vanilla-og", 4, None): 5.01, ("vanilla-og", 6, None): 7.47,
    ("+ cache + reuse", 4, 5): 0.61, ("+ cache + reuse", 6, 5): 0.98,
    ("+ cache + reuse", 4, 10): 1.12, ("+ cache + reuse", 6, 10): 1.55,
}

# Candidate sets from the person schema, canonical order; an N between the
# natural sizes takes the first N of the next larger set.
CANDIDATE_PROMPTS = {
    2: "a portrait photo of a woman wearing glasses",                  # gender
    6: "a portrait photo of an old woman wearing glasses",             # age x gender
    30: "a portrait photo of an old asian woman wearing glasses",      # age x ethnicity x gender
}
REAL_PROMPT = "a portrait photo of an old woman wearing glasses"


def candidates(n: int) -> tuple[str, ...]:
    from obclip.device.oblivious import ObliviousTransform, TransformConfig

    if n == 1:
        return (REAL_PROMPT,)
    size = min((s for s in CANDIDATE_PROMPTS if s >= n), default=None)
    if size is None:
        raise ValueError(f"N={n} is over the largest candidate set ({max(CANDIDATE_PROMPTS)})")
    cands = ObliviousTransform(TransformConfig())(CANDIDATE_PROMPTS[size]).candidates
    assert len(cands) == size, (CANDIDATE_PROMPTS[size], len(cands))
    return tuple(cands[:n])


@dataclass(frozen=True)
class Row:
    label: str                              # what the table prints
    method: str                             # cloud-only, hybrid-sd, vanilla-og, obclip
    n: int
    k: int                                  # cloud steps
    acceleration: AccelerationConfig | None
    group: str                              # the preset the row belongs to ("" for shared rows)

    @property
    def key(self) -> tuple:
        """Rows with the same key send the same request and are measured once."""
        return (self.n, self.k, self.acceleration)


def build_rows(presets, ns, steps: int, baselines: bool = True, family: str = "sd",
               guided: bool = True) -> list[Row]:
    """Display order; vanilla OG / cloud-only rows repeat per preset but share one measurement.
    ``family``: the cloud model's ("sd", "sdxl"), for the baselines' labels; ``guided=False`` (a
    guidance-embedding UNet, LCM): its extras row projects K/V once only (no unconditional rows to merge)."""
    rows = []
    cloud = family.upper()
    if not isinstance(presets, dict):
        presets = {name: preset(name) for name in presets}
    for name, acc in presets.items():
        k = acc.switch_step
        if baselines:
            rows.append(Row(f"{cloud} cloud only", "cloud-only", 1, steps, None, name))
            rows.append(Row(f"Hybrid {cloud}", "hybrid-sd", 1, k, None, name))
        for n in ns:
            if baselines:
                rows.append(Row("vanilla OG", "vanilla-og", n, steps, None, name))
            rows.append(Row("ObCLIP", "obclip", n, k, AccelerationConfig.none(k), name))
            rows.append(Row("+ cache", "obclip", n, k, acc.replace(batch_reuse=False), name))
            rows.append(Row("+ cache + reuse", "obclip", n, k, acc, name))
            extras = acc.replace(cross_kv_once=True, merge_step0_uncond=guided)
            rows.append(Row("+ exact extras" if guided else "+ K/V once", "obclip", n, k, extras, name))
    return rows


def make_request(row: Row, steps: int, size: int, seed: int = SEED, guidance: float = GUIDANCE,
                 solver: str = "dpmsolver++"):
    from obclip.runtime.protocol import StepsRequest

    return StepsRequest(candidates=candidates(row.n), seed=seed, num_inference_steps=steps, switch_step=row.k,
                        guidance_scale=guidance, height=size, width=size, acceleration=row.acceleration,
                        solver=solver)


def _timer(cuda: bool):
    import torch

    if not cuda:
        def timed(fn) -> float:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return timed

    def timed_cuda(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    return timed_cuda


NOISE_TOLERANCE = 0.05  # a time ratio this far above its FLOPs ratio is flagged


def row_flops(counter, model_name: str, row: Row, steps: int) -> float:
    """FLOPs of one request of ``row`` (all its cloud steps), counted on the meta device."""
    config = row.acceleration or AccelerationConfig.none(row.k)
    setup, costs = counter.plan_steps(model_name, row.n, config, steps)
    return float((setup + sum(b for _, b in costs)).flops)


def flops_counter(latent_size: int | None = None):
    """benchmarks/flops.py's StepCounter (the benchmarks are scripts, not a package), counting at
    ``latent_size`` (the timed requests' latent side; None: each UNet's native size)."""
    spec = importlib.util.spec_from_file_location("obclip_benchmark_flops", Path(__file__).with_name("flops.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.StepCounter(latent_size=latent_size)


def counted_config(model_name: str, cloud_model: str | None) -> str | None:
    """The named UNet config whose FLOPs stand for the timed model: the named model, or the one a
    --cloud-model folder names in its obclip_model.json ("spec", as write_random_model writes);
    None when the folder names none (a trained model outside the named configs)."""
    from obclip.cloud.models import MODEL_SPECS

    if cloud_model is None:
        return model_name
    info = Path(cloud_model).expanduser() / "obclip_model.json"
    try:
        spec = json.loads(info.read_text()).get("spec")
    except (OSError, ValueError, AttributeError):
        return None
    return MODEL_SPECS[spec].unet if spec in MODEL_SPECS else None


def measure(runners, rows: list[Row], *, steps: int, size: int, repeats: int, warmup: int = 1,
            cuda: bool = False, seed: int = SEED, guidance: float = GUIDANCE, progress=None,
            flops: dict | None = None, solver: str = "dpmsolver++") -> list[dict]:
    """Time every distinct request of ``rows`` on every runner, interleaved; one result per (runner, row)
    with medians and speed-ups. ``runners``: a CloudStepRunner, or {backend name: runner}."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not isinstance(runners, dict):
        runners = {"torch": runners}
    requests: dict[tuple, object] = {}
    for row in rows:
        if row.key not in requests:
            requests[row.key] = make_request(row, steps, size, seed, guidance, solver)
    jobs = [(backend, key) for key in requests for backend in runners]   # a request's backends side by side
    timed = _timer(cuda)

    def run(job: tuple) -> None:
        backend, key = job
        runners[backend].run(requests[key])

    for w in range(warmup):
        for job in jobs:
            run(job)
        if progress:
            progress(f"warm-up round {w + 1}/{warmup} done")
    times: dict[tuple, list[float]] = {job: [] for job in jobs}
    for rep in range(repeats):
        t0 = time.perf_counter()
        start = rep % len(jobs)
        for job in jobs[start:] + jobs[:start]:
            times[job].append(timed(lambda job=job: run(job)))
        if progress:
            progress(f"repeat {rep + 1}/{repeats}: {time.perf_counter() - t0:.1f}s")

    med = {job: statistics.median(v) for job, v in times.items()}
    low = {job: min(v) for job, v in times.items()}
    out = []
    for backend in runners:
        for row in rows:
            job = (backend, row.key)
            m = med[job]
            # ObCLIP without acceleration at this row's N and its preset's k (vanilla OG rows too).
            base = next((r.key for r in rows if r.method == "obclip" and r.n == row.n and r.group == row.group
                         and r.acceleration == AccelerationConfig.none(r.k)), None)
            obclip = None if base is None else med[(backend, base)]
            time_ratio = None if obclip is None or row.n == 1 else obclip / m
            flops_ratio = None if flops is None or base is None or row.n == 1 else flops[base] / flops[row.key]
            vanilla = next((med[(backend, r.key)] for r in rows if r.method == "vanilla-og" and r.n == row.n), None)
            torch_m = med.get(("torch", row.key)) if backend != "torch" else None
            paper_key = (row.label if row.method == "obclip" else row.method, row.n,
                         None if row.k == steps else row.k)
            out.append({
                "backend": backend, "group": row.group, "label": row.label, "method": row.method, "n": row.n,
                "cloud_steps": row.k,
                "acceleration": None if row.acceleration is None else row.acceleration.to_dict(),
                "times_s": times[job], "median_s": m, "min_s": low[job], "max_s": max(times[job]),
                "speedup_vs_obclip": time_ratio,
                "speedup_vs_obclip_min": None if base is None or row.n == 1 else low[(backend, base)] / low[job],
                "flops": None if flops is None else flops[row.key],
                "flops_ratio_vs_obclip": flops_ratio,
                "noise": (time_ratio is not None and flops_ratio is not None
                          and time_ratio > flops_ratio * (1 + NOISE_TOLERANCE)),
                "speedup_vs_vanilla": None if vanilla is None or row.n == 1 else vanilla / m,
                "speedup_vs_torch": None if torch_m is None else torch_m / m,
                "speedup_vs_torch_min": None if torch_m is None else low[("torch", row.key)] / low[job],
                "paper_v100_s": PAPER_V100_S.get(paper_key) if steps == PAPER_T else None,
            })
    return out


# --- models -------------------------------------------------------------------


def random_full_size_model(name: str, device: str, dtype):
    """A named UNet config with random weights on ``device`` and a random text embedding in place of the
    text encoder; everything else (tokenizer, scheduler config, latent geometry) as SD-v1.4's."""
    import torch

    from obclip.cloud.models import (
        SD14_SCHEDULER_CONFIG,
        UNET_CONFIGS,
        TextToLatentModel,
        build_unet,
        load_clip_tokenizer,
    )

    class RandomTextModel(TextToLatentModel):
        @torch.no_grad()
        def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
            # Deterministic per prompt, made on the host like token ids would be.
            rows = [torch.randn(77, dim, generator=torch.Generator().manual_seed(zlib.crc32(p.encode())))
                    for p in prompts]
            return torch.stack(rows).to(self.unet.device, self.unet.dtype)

    dim = UNET_CONFIGS[name]["cross_attention_dim"]
    torch.manual_seed(0)
    with torch.device(device):
        unet = build_unet(name)
    unet = unet.to(dtype=dtype).eval()
    return RandomTextModel(model_id=f"{name}-random-weights", tokenizer=load_clip_tokenizer(), text_encoder=None,
                           unet=unet, scheduler_config=dict(SD14_SCHEDULER_CONFIG), vae_scale_factor=8,
                           vae_scaling_factor=0.18215)


# --- output -------------------------------------------------------------------


def _x(v) -> str:
    return f"{'-':>7}" if v is None else f"{v:6.2f}x"


def print_table(results: list[dict]) -> None:
    versus_torch = any(r.get("speedup_vs_torch") is not None for r in results)
    torch_head = f" {'vs torch':>8} {'(min)':>8}" if versus_torch else ""
    print(f"{'backend':<11} {'preset':<10} {'N':>2} {'row':<16} {'steps':>5} {'median s':>9} {'min s':>8} "
          f"{'max s':>8} {'vs ObCLIP':>9} {'(min)':>8} {'FLOPs':>8} {'':5} {'vs van.OG':>9}{torch_head} | "
          f"{'paper V100 s (reference)':>24}")
    last = None
    for r in results:
        here = (r.get("backend"), r["group"])
        if last is not None and here != last:
            print()
        last = here
        paper = "" if r["paper_v100_s"] is None else f"{r['paper_v100_s']:.2f}"
        flag = "noise" if r.get("noise") else ""
        torch_cols = (f" {_x(r.get('speedup_vs_torch')):>8} {_x(r.get('speedup_vs_torch_min')):>8}"
                      if versus_torch else "")
        print(f"{r.get('backend', 'torch'):<11} {r['group']:<10} {r['n']:>2} {r['label']:<16} {r['cloud_steps']:>5} "
              f"{r['median_s']:>9.4f} {r['min_s']:>8.4f} {r['max_s']:>8.4f} {_x(r['speedup_vs_obclip']):>9} "
              f"{_x(r.get('speedup_vs_obclip_min')):>8} {_x(r.get('flops_ratio_vs_obclip')):>8} {flag:5} "
              f"{_x(r['speedup_vs_vanilla']):>9}{torch_cols} | {paper:>24}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "float16"], default=None,
                   help="default: float32 on cpu, float16 on cuda")
    p.add_argument("--model", choices=["mini", "sd-v1.4"], default=None,
                   help="mini: the embedded model (or --cloud-model); sd-v1.4: its UNet config with random "
                        "weights (cuda only). Default: mini on cpu, sd-v1.4 on cuda")
    p.add_argument("--cloud-model", default=None, help="with --model mini: a cloud model dir instead of the embedded")
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's: 64 mini, 512 SD)")
    p.add_argument("--steps", type=int, default=PAPER_T, help="T")
    p.add_argument("--n", type=int, nargs="+", default=[2, 4, 6], help="candidate counts")
    p.add_argument("--presets", nargs="+", default=["paper-k5", "paper-k10"], choices=sorted(PRESETS))
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 7 on cpu, 20 on cuda)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of every request first")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch, and onnxruntime's intra-op pool)")
    p.add_argument("--backend", nargs="+", default=["torch"], choices=["torch", "torch-compiled", "onnxruntime"],
                   help="step engines to time side by side (default: torch); torch-compiled: torch.compile per "
                        "step mode, mode reduce-overhead (CUDA graphs on cuda), compiled in the warm-up round")
    p.add_argument("--engines", default=None, type=Path,
                   help="with --backend onnxruntime: the cloud engines folder exported from the same model "
                        "(python export/build_engines.py --cloud-model DIR)")
    p.add_argument("--providers", default="cpu", help="onnxruntime execution providers (default: cpu)")
    p.add_argument("--engine-memory", default=None, choices=MEMORY_MODES,
                   help="with --backend onnxruntime: how the mode sessions allocate (default: OrtEngine's, the "
                        "service's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--json-out", default=None, help="also write the JSON object to this file")
    p.add_argument("--solver", default=DPM_SOLVER, choices=list(SOLVER_KINDS),
                   help="the requests' solver (lcm: for LCM-SDXL, with --steps 8 --presets paper-lcm-k4)")
    p.add_argument("--no-baselines", action="store_true",
                   help="time only the ObCLIP rows (no SD cloud only, Hybrid SD or vanilla OG): for comparing "
                        "backends, where the T-step baselines would take most of the time")
    args = p.parse_args(argv)

    if "onnxruntime" in args.backend and args.engines is None:
        print("error: --backend onnxruntime needs --engines OUT/cloud (python export/build_engines.py "
              "--cloud-model DIR --out OUT)", file=sys.stderr)
        return 2
    too_big = [n for n in args.presets if preset(n).switch_step > args.steps]
    if too_big:
        print(f"error: --steps {args.steps} is below the switch point k of {too_big}; use T >= k", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print(f"error: --device cuda, but this torch ({torch.__version__}) sees no CUDA device; "
              "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu", file=sys.stderr)
        return 2
    model_name = args.model or ("sd-v1.4" if cuda else "mini")
    dtype_name = args.dtype or ("float16" if cuda else "float32")
    dtype = {"float32": torch.float32, "float16": torch.float16}[dtype_name]
    repeats = args.repeats or (20 if cuda else 7)
    if model_name == "sd-v1.4" and not cuda:
        print("error: the full-size SD-v1.4 UNet is timed on cuda only (minutes per request on a CPU); "
              "use --device cuda, or --model mini on cpu", file=sys.stderr)
        return 2
    if model_name == "sd-v1.4" and args.cloud_model:
        print("error: --cloud-model goes with --model mini; --model sd-v1.4 builds random weights", file=sys.stderr)
        return 2

    from obclip.cloud.models import load_text_to_latent, resolve_model_dir
    from obclip.cloud.steps import CloudStepRunner

    t_load = time.perf_counter()
    if model_name == "mini":
        model_dir = resolve_model_dir(args.cloud_model, "cloud")
        model = load_text_to_latent(model_dir, device=args.device, dtype=dtype)
        weights = "trained weights (embedded default)" if args.cloud_model is None else "as loaded"
        text = "its CLIP text encoder (timed)"
    else:
        model = random_full_size_model(model_name, args.device, dtype)
        model_dir, weights = model.model_id, "random weights"
        text = "random [N+1, 77, 768] embedding (text encoder not timed)"
    runners = {}
    for backend in dict.fromkeys(args.backend):
        if backend == "torch":
            runners[backend] = CloudStepRunner(model)
        elif backend == "torch-compiled":
            from obclip.cloud.torch_backend import TorchEngine

            runners[backend] = CloudStepRunner(engine=TorchEngine(model, compile_mode="reduce-overhead"))
        else:
            from obclip.cloud.engine_backend import OrtEngine

            memory = {} if args.engine_memory is None else {"memory": args.engine_memory}
            engine = OrtEngine(args.engines, providers=args.providers, threads=args.threads, **memory)
            if model_name == "mini" and "torch" in args.backend:  # side by side only on the same weights
                from obclip.export.staging import model_fingerprint

                if (engine.manifest.source or {}).get("fingerprint") != model_fingerprint(Path(model_dir)):
                    print(f"error: the engines in {args.engines} were not exported from {model_dir}; export "
                          "it: python export/build_engines.py --cloud-model DIR", file=sys.stderr)
                    return 2
            runners[backend] = CloudStepRunner(engine=engine)
    size = args.size or model.default_image_size
    load_s = time.perf_counter() - t_load

    family = model.conditioning.family
    rows = build_rows(args.presets, args.n, args.steps, baselines=not args.no_baselines, family=family,
                      guided=model.conditioning.guided)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    # FLOPs of the named config at the timed size (a --cloud-model that names no config has none to count).
    flops = None
    counted = counted_config(model_name, args.cloud_model)
    if counted is not None:
        counter = flops_counter(size // model.vae_scale_factor)
        flops = {row.key: row_flops(counter, counted, row, args.steps) for row in rows}
    else:
        log(f"no FLOPs column: {args.cloud_model} names no known model config in obclip_model.json")
    t0 = time.perf_counter()
    results = measure(runners, rows, steps=args.steps, size=size, repeats=repeats, warmup=args.warmup,
                      cuda=cuda, progress=log, flops=flops, solver=args.solver)
    elapsed = time.perf_counter() - t0

    device_name = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    meta = {"device": args.device, "device_name": device_name, "dtype": dtype_name, "model": model_name,
            "model_dir": str(model_dir), "family": family, "solver": args.solver,
            "weights": weights, "text": text, "image_size": size, "T": args.steps,
            "guidance": GUIDANCE, "seed": SEED, "repeats": repeats, "warmup": args.warmup,
            "threads": args.threads, "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "load_s": load_s, "elapsed_s": elapsed, "backends": list(runners),
            "engines": None if args.engines is None else str(args.engines), "flops_config": counted,
            "engine_memory": runners["onnxruntime"].engine.memory if "onnxruntime" in runners else None,
            "presets": {n: preset(n).to_dict() for n in args.presets}}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    if args.json:
        print(json.dumps({"meta": meta, "rows": results}, indent=1))
        return 0
    shown = model_name if args.cloud_model is None else f"{Path(args.cloud_model).name} ({family} family)"
    print(f"# server wall time per request, ours: {shown} ({weights}) on {args.device} ({device_name}), "
          f"{dtype_name}, {size} px, T={args.steps}, guidance {GUIDANCE}, solver {args.solver}")
    if "onnxruntime" in runners:
        import onnxruntime

        print(f"# onnxruntime {onnxruntime.__version__} ({args.providers}, memory {meta['engine_memory']}) on the "
              f"cloud engines in {args.engines}; "
              "vs torch = median(torch, same request) / median(row)")
    print(f"# text: {text}; torch {torch.__version__}, {args.threads} CPU thread(s) of {os.cpu_count()}; "
          f"{'CUDA events' if cuda else 'perf_counter'}; {args.warmup} warm-up round(s), median of {repeats} "
          "interleaved repeats")
    for n, acc in meta["presets"].items():
        print(f"# {n}: k={acc['switch_step']} r={acc['cache_step']} s={acc['skip_step']}")
    print("# vs ObCLIP = median(ObCLIP, same N, preset's k) / median(row), (min) the same with minima; FLOPs = "
          "FLOPs(ObCLIP) / FLOPs(row), the most the time ratio can honestly be; 'noise': time ratio > FLOPs ratio "
          f"+ {NOISE_TOLERANCE:.0%}; vs van.OG = median(vanilla OG, same N) / median(row); >1 is faster")
    if model_name == "mini" and args.device == "cpu":
        print("# the mini model is a CPU stand-in; its ratios are not the paper's GPU ratios")
    print("# the paper column: the paper's V100 numbers (docs/method.md), a different GPU, model and code: "
          "reference only")
    print()
    print_table(results)
    print(f"\nmeasured in {elapsed:.1f}s (+{load_s:.1f}s loading)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
