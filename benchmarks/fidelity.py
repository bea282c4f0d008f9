"""How far each server-side acceleration moves the result from the exact run.

    python benchmarks/fidelity.py [--json] [--steps 25] [--prompts P ...] [--presets paper-k5 paper-k10]
                                  [--cloud-model DIR] [--device-model DIR | --engines DIR] [--per-candidate]

For each preset (k, r, s) the exact reference is ObCLIP with no acceleration
(every cloud step a full pass) at the preset's k. Against it, with the same
candidate set, seed and schedule, each setting below runs the cloud steps
through ``CloudStepRunner.handle`` (request bytes in, handoff bytes out,
exactly what the server does):

    reuse only          batch-reused attention before r, full steps after
    cache only          attention cache from r, no block skip, no reuse
    cache+skip FD       attention cache from r + block skip from s (Faster Diffusion variant)
    cache+skip DeepC    the same with DeepCache's shallow-branch skip
    preset              reuse + cache + skip: the paper's setting
    preset refresh=2    the preset with a full (cache-refreshing) step every 2 steps after r
    exact extras        cross-attention K/V once per request + merged step-0 unconditional rows

Then, for every candidate in turn, the device finishes the remaining T-k
steps as if that candidate were the real one (``DevicePipeline.finish`` on the
handoff bytes, conditioned on that candidate's text) and decodes it.

Reported per candidate (JSON) and, in the table, for the pivot (candidate 0
of the canonical order, whose attention maps batch reuse broadcasts) and the
other candidates separately, so any unfairness between them is visible:

    latent rel L2   ||a - b|| / ||b|| of the handoff latent after step k (b = exact)
    x0 rel L2       the same for the handoff's data prediction (solver state)
    PSNR dB         final decoded image against the exact run's image; the
                    table's means and worst cases are PSNR of the mean / the
                    largest per-candidate MSE (so identical images average in)

The numbers are properties of the models run: by default the embedded
ObCLIP-Mini pair (trained on synthetic shapes); pass another pair with
--cloud-model/--device-model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from jsonout import strict_json  # benchmarks/ (a script's own folder is on sys.path)

from obclip.runtime.plan import PRESETS, AccelerationConfig, SkipVariant, StepMode, make_plan, preset

# Fixed candidate sets from the person schema: two with N = 2 (gender), two with N = 6 (age x gender).
PROMPTS = [
    "a photo of a man reading a book in a park",
    "a woman on a bicycle",
    "a portrait photo of an old woman wearing glasses",
    "a middle-aged man in hat Fashion portrait photo",
]
# The embedded ObCLIP-Mini is trained on shapes (schema "shapes"): its own check prompts.
SHAPE_PROMPTS = [
    "a large red circle on a white background",
    "a small blue square on a black background",
    "a red triangle",
    "a large green square",
]
SEED = 1234
MODE_LETTERS = {StepMode.FULL: "F", StepMode.REUSE: "R", StepMode.CACHE: "C", StepMode.SKIP: "S",
                StepMode.CACHE_SKIP: "X", StepMode.PIVOT: "P"}


# The further options of docs/method.md 7.7 on top of a preset (--new-options); those a preset's
# k, r, s do not admit (e.g. a pivot-only step needs r >= 2) are left out.
NEW_OPTIONS = (
    ("preset refresh=2 reuse", dict(refresh_every=2, refresh_mode="reuse")),
    ("preset frozen=skip", dict(frozen_guidance="skip")),
    ("preset frozen=cached", dict(frozen_guidance="cached")),
    ("preset pivot=1 + merge", dict(pivot_only_steps=1, merge_step0_uncond=True)),
    ("preset DeepC shallow", dict(skip_variant=SkipVariant.DEEPCACHE_SHALLOW)),
)


def settings_for(acc: AccelerationConfig, new_options: bool = False) -> list[tuple[str, AccelerationConfig]]:
    """The settings compared against the exact run for one preset (same k, r, s)."""
    k = acc.switch_step
    extra = []
    if new_options:
        for label, changes in NEW_OPTIONS:
            try:
                extra.append((label, acc.replace(**changes)))
            except ValueError:
                pass
    return [
        ("reuse only", acc.replace(attention_cache=False, block_skip=False, batch_reuse=True)),
        ("cache only", acc.replace(batch_reuse=False, attention_cache=True, block_skip=False)),
        ("cache+skip FD", acc.replace(batch_reuse=False, attention_cache=True, block_skip=True,
                                      skip_variant=SkipVariant.FASTER_DIFFUSION)),
        ("cache+skip DeepC", acc.replace(batch_reuse=False, attention_cache=True, block_skip=True,
                                         skip_variant=SkipVariant.DEEPCACHE)),
        ("preset", acc),
        ("preset refresh=2", acc.replace(refresh_every=2)),
        ("exact extras", AccelerationConfig.none(k).replace(cross_kv_once=True, merge_step0_uncond=True)),
    ] + extra


def modes_string(acc: AccelerationConfig, steps: int) -> str:
    return "".join(MODE_LETTERS[s.mode] for s in make_plan(steps, acc.switch_step, acc).cloud_steps)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    nb = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / nb if nb else float(np.linalg.norm(a))


def mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())


def psnr_of_mse(m: float) -> float:
    return float("inf") if m == 0 else float(10 * np.log10(255.0**2 / m))


def _split_run(runner, pipeline, prompt: str, steps: int, acc: AccelerationConfig, seed: int,
               guidance: float, size: int | None, decode: bool, solver: str = "dpmsolver++"):
    """One request through the server, then every candidate finished on the device as if it were real.
    A candidate whose finish the device refuses (its verification of the answer) gets None."""
    from obclip.device.pipeline import GenerationConfig, Method
    from obclip.runtime.errors import UntrustedAnswerError
    from obclip.runtime.protocol import decode_handoff
    from obclip.runtime.solver import make_schedule

    config = GenerationConfig(method=Method.OBCLIP, num_inference_steps=steps, switch_step=acc.switch_step,
                              guidance_scale=guidance, seed=seed, height=size, width=size, acceleration=acc,
                              solver=solver)
    prepared = pipeline.prepare(prompt, config)
    if prepared.request is None:
        raise SystemExit(f"error: the privacy policy keeps {prompt!r} on the device (nothing would be sent), so "
                         "it has no cloud steps to measure; pass --prompts the model's schema protects")
    handoff_bytes = runner.handle(prepared.request_bytes)
    latent_shape = pipeline.engines.latent_shape(prepared.height, prepared.width)
    handoff = decode_handoff(handoff_bytes, prepared.request, latent_shape,
                             make_schedule(pipeline.solver(solver), steps).timesteps)
    candidates = prepared.request.candidates
    finals, images = [], []
    for i, text in enumerate(candidates):
        # The device's own steps, with candidate i as the real one (conditioned on its text).
        as_real = dataclasses.replace(prepared, prompt=text, real_index=i)
        try:
            final = pipeline.finish(as_real, handoff_bytes, config)
        except UntrustedAnswerError:
            finals.append(None)
            images.append(None)
            continue
        finals.append(final)
        images.append(pipeline.engines.decode(final)[0] if decode else None)
    return candidates, handoff, finals, images


def measure(runner, pipeline, prompts=PROMPTS, steps: int = 25, presets=("paper-k5", "paper-k10"),
            seed: int = SEED, guidance: float = 7.5, size: int | None = None, decode: bool = True,
            progress=None, new_options: bool = False, solver: str = "dpmsolver++") -> dict:
    """Every setting of every preset on every prompt; one record per (setting, prompt, candidate).

    ``presets``: names (runtime.plan.preset) or {name: AccelerationConfig}.
    """
    if not isinstance(presets, dict):
        presets = {name: preset(name) for name in presets}
    records, settings = [], []
    for pname, acc in presets.items():
        k = acc.switch_step
        exact = AccelerationConfig.none(k)
        preset_modes = modes_string(acc, steps)
        for label, cfg in settings_for(acc, new_options):
            m = modes_string(cfg, steps)
            # refresh_every only adds full steps; none may fall inside k (paper-k5: r=3, k=5).
            same = label == "preset refresh=2" and m == preset_modes
            note = "no refresh step inside k: runs as preset" if same else ""
            settings.append({"preset": pname, "setting": label, "modes": m, "note": note,
                             "config": cfg.to_dict()})
        for p_i, prompt in enumerate(prompts):
            s = seed + p_i
            t0 = time.perf_counter()
            cands, ref, ref_finals, ref_images = _split_run(runner, pipeline, prompt, steps, exact, s, guidance,
                                                            size, decode, solver)
            for label, cfg in settings_for(acc, new_options):
                _, got, finals, images = _split_run(runner, pipeline, prompt, steps, cfg, s, guidance, size,
                                                    decode, solver)
                for i, cand in enumerate(cands):
                    rec = {
                        "preset": pname, "setting": label, "prompt": prompt, "seed": s, "n": len(cands),
                        "candidate": i, "pivot": i == 0, "candidate_text": cand,
                        "latent_rel_l2": rel_l2(got.latents[i], ref.latents[i]),
                        "x0_rel_l2": rel_l2(got.prev_x0[i], ref.prev_x0[i]),
                        "device_refused": finals[i] is None,
                    }
                    if finals[i] is not None and ref_finals[i] is not None:
                        rec["final_latent_rel_l2"] = rel_l2(finals[i], ref_finals[i])
                    if decode and images[i] is not None and ref_images[i] is not None:
                        rec["image_mse"] = mse(images[i], ref_images[i])
                        rec["psnr_db"] = psnr_of_mse(rec["image_mse"])
                    records.append(rec)
            if progress:
                progress(f"{pname}: prompt {p_i + 1}/{len(prompts)} (N={len(cands)}) "
                         f"{time.perf_counter() - t0:.1f}s")
    return {"settings": settings, "records": records}


def summarize(result: dict) -> list[dict]:
    """Rows (preset, setting, N): pivot mean over prompts, mean over prompts of the non-pivot mean, worst."""
    rows = []
    recs = result["records"]
    for st in result["settings"]:
        mine = [r for r in recs if r["preset"] == st["preset"] and r["setting"] == st["setting"]]
        for n in sorted({r["n"] for r in mine}):
            group = [r for r in mine if r["n"] == n]
            prompts = sorted({r["prompt"] for r in group}, key=[r["prompt"] for r in group].index)
            row = {**{k: st[k] for k in ("preset", "setting", "modes", "note")}, "n": n, "prompts": len(prompts),
                   "device_refused": sum(r["device_refused"] for r in group), "candidates": len(group)}
            for key in ("latent_rel_l2", "x0_rel_l2", "final_latent_rel_l2", "image_mse"):
                have = [r for r in group if key in r]  # a refused candidate has no final latent or image
                if not have:
                    continue
                piv = [r[key] for r in have if r["pivot"]]
                others = [float(np.mean([r[key] for r in have if r["prompt"] == p and not r["pivot"]]))
                          for p in prompts if any(r["prompt"] == p and not r["pivot"] for r in have)]
                worst = max(have, key=lambda r: r[key])
                row[key] = {"pivot": float(np.mean(piv)) if piv else None,
                            "others": float(np.mean(others)) if others else None,
                            "worst": worst[key], "worst_candidate": worst["candidate"],
                            "worst_prompt": worst["prompt"]}
            rows.append(row)
    return rows


def _fmt_rel(v) -> str:
    return f"{'-':>8}" if v is None else f"{v:8.1e}"


def _fmt_db(m) -> str:
    if m is None:
        return f"{'-':>6}"
    p = psnr_of_mse(m)
    return f"{'inf':>6}" if p == float("inf") else f"{p:6.1f}"


def print_table(rows: list[dict], result: dict, per_candidate: bool) -> None:
    has_img = any("image_mse" in r for r in rows)
    head = (f"{'preset':<10} {'setting':<17} {'cloud modes':<11} {'N':>2} | "
            f"{'handoff latent rel L2':^26} | {'handoff x0 rel L2':^26}")
    sub = f"{'':<10} {'':<17} {'':<11} {'':>2} | " + (f"{'pivot':>8} {'others':>8} {'worst':>8} | " * 2)
    if has_img:
        head += f" | {'final image PSNR dB':^20}"
        sub += f"{'pivot':>6} {'others':>6} {'worst':>6}"
    print(head)
    print(sub.rstrip(" |"))
    last = None
    for r in rows:
        if last is not None and r["preset"] != last:
            print()
        last = r["preset"]
        line = f"{r['preset']:<10} {r['setting']:<17} {r['modes']:<11} {r['n']:>2} | "
        for key in ("latent_rel_l2", "x0_rel_l2"):
            v = r[key]
            line += f"{_fmt_rel(v['pivot'])} {_fmt_rel(v['others'])} {_fmt_rel(v['worst'])} | "
        if has_img:
            v = r.get("image_mse") or {"pivot": None, "others": None, "worst": None}
            line += f"{_fmt_db(v['pivot'])} {_fmt_db(v['others'])} {_fmt_db(v['worst'])}"
        if r["device_refused"]:
            line += f"  (device refused {r['device_refused']} of {r['candidates']} answers)"
        if r["note"]:
            line += f"  ({r['note']})"
        print(line.rstrip(" |"))
    if per_candidate:
        print("\nper candidate index (mean over prompts with that N): latent rel L2 / x0 rel L2 / PSNR dB")
        recs = result["records"]
        for st in result["settings"]:
            mine = [r for r in recs if r["preset"] == st["preset"] and r["setting"] == st["setting"]]
            for n in sorted({r["n"] for r in mine}):
                cells = []
                for i in range(n):
                    c = [r for r in mine if r["n"] == n and r["candidate"] == i]
                    cell = f"{np.mean([r['latent_rel_l2'] for r in c]):.1e}/{np.mean([r['x0_rel_l2'] for r in c]):.1e}"
                    shown = [r["image_mse"] for r in c if "image_mse" in r]
                    if shown:
                        cell += f"/{_fmt_db(float(np.mean(shown))).strip()}"
                    cells.append(cell)
                print(f"{st['preset']:<10} {st['setting']:<17} N={n}: " + "  ".join(cells))


def _engines_dir(args) -> str:
    from obclip.export.device_engines import build_device_engines, ensure_default_engines

    if args.engines:
        return args.engines
    if args.device_model:
        out = Path(tempfile.mkdtemp(prefix="obclip-fidelity-engines-"))
        build_device_engines(args.device_model, out)
        return str(out / "device")
    return str(ensure_default_engines())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cloud-model", default=None, help="cloud model dir (default: the embedded mini model)")
    p.add_argument("--device-model", default=None, help="device model dir, exported to engines in a temp dir")
    p.add_argument("--engines", default=None, help="device engines dir (default: the embedded default's)")
    p.add_argument("--prompts", nargs="+", default=None,
                   help="prompts whose candidate sets are run (default: shape prompts for a model trained on "
                        "the shapes schema, such as the embedded one; person prompts otherwise)")
    p.add_argument("--presets", nargs="+", default=["paper-k5", "paper-k10"], choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=25, help="T")
    p.add_argument("--seed", type=int, default=SEED, help="seed of the first prompt (+1 per prompt)")
    p.add_argument("--guidance", type=float, default=7.5)
    from obclip.runtime.solver import DPM_SOLVER, SOLVER_KINDS

    p.add_argument("--solver", default=DPM_SOLVER, choices=list(SOLVER_KINDS),
                   help="the sampler of every run (lcm: the paper's distilled setting, with --steps 8)")
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and onnxruntime threads (1: on a small shared CPU more threads only contend)")
    p.add_argument("--no-decode", action="store_true", help="skip the device steps' VAE decode (no PSNR)")
    p.add_argument("--per-candidate", action="store_true", help="also print every candidate index")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--new-options", action="store_true",
                   help="also run the further options of docs/method.md 7.7 on each preset")
    args = p.parse_args(argv)

    too_big = [n for n in args.presets if preset(n).switch_step > args.steps]
    if too_big:
        print(f"error: --steps {args.steps} is below the switch point k of {too_big}; use T >= k", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    from obclip.cloud.models import load_text_to_latent, resolve_model_dir
    from obclip.cloud.steps import CloudStepRunner
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.pipeline import DevicePipeline

    cloud_dir = resolve_model_dir(args.cloud_model, "cloud")
    engines_dir = _engines_dir(args)
    pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=engines_dir, threads=args.threads)))
    runner = CloudStepRunner(load_text_to_latent(cloud_dir))
    weights = "trained weights (embedded ObCLIP-Mini)" if args.cloud_model is None else "as loaded"
    if args.prompts is None:
        args.prompts = SHAPE_PROMPTS if pipeline.engines.manifest.schema == "shapes" else PROMPTS
    log = (lambda m: print(m, file=sys.stderr)) if args.json else None

    t0 = time.perf_counter()
    result = measure(runner, pipeline, args.prompts, args.steps, args.presets, args.seed, args.guidance,
                     args.size, decode=not args.no_decode, progress=log, new_options=args.new_options,
                     solver=args.solver)
    elapsed = time.perf_counter() - t0
    rows = summarize(result)
    meta = {"cloud_model": cloud_dir, "engines": engines_dir, "T": args.steps, "solver": args.solver,
            "guidance": args.guidance,
            "presets": {n: preset(n).to_dict() for n in args.presets}, "prompts": args.prompts,
            "seed": args.seed, "threads": args.threads, "elapsed_s": elapsed}
    if args.json:
        meta["psnr_null_means"] = "identical images (infinite PSNR)"
        print(json.dumps(strict_json({"meta": meta, "summary": rows, **result}), indent=1, allow_nan=False))
        return 0
    print(f"# fidelity of the server-side accelerations vs exact ObCLIP (no acceleration), T={args.steps}, "
          f"solver {args.solver}, guidance {args.guidance}, seeds {args.seed}..{args.seed + len(args.prompts) - 1}")
    print(f"# cloud model {cloud_dir} ({weights}); device engines {engines_dir}")
    print("# pivot = candidate 0 (canonical order); others = mean over non-pivot candidates; means are over "
          "prompts; worst = over all prompts and candidates")
    print("# PSNR: of the mean / largest per-candidate MSE vs the exact run's image (inf = identical); "
          "modes: F full, R reuse, C attention cache, S skip, X cache+skip")
    for n, acc in meta["presets"].items():
        print(f"# {n}: k={acc['switch_step']} r={acc['cache_step']} s={acc['skip_step']}")
    print()
    print_table(rows, result, args.per_candidate)
    print(f"\n{len(result['records'])} candidate runs in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
