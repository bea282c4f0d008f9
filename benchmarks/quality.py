"""Image quality of ObCLIP and its baselines on held-out shape prompts (the paper's Table 2, mini version).

    python benchmarks/quality.py [--cloud-model DIR] [--device-model DIR] [--engines DIR] [--prompts N]
                                 [--steps 25] [--guidance 7.5] [--methods KEY ...] [--all-candidates]
                                 [--out docs/quality] [--json]
    python benchmarks/quality.py --sweep benchmarks/sweeps/issue16.json [--sweep-k 10] [--sweep-list] ...

Prompts: the captions of the first N samples of
``mini.shapes.make_dataset(N, seed=0, split="heldout")`` (never trained on),
with their attributes as ground truth; prompt i runs with seed 1234 + i for
every method, so the methods differ only in how the image is made. Every image
goes through ``DevicePipeline.generate`` with the cloud in process
(``CloudStepRunner.handle``: request bytes in, handoff bytes out). ObCLIP uses
the shapes schema (device/schemas/shapes.json): every dataset caption names a
colour and a shape, so each request carries N = 6 x 3 = 18 candidates.

Methods (keys for --methods):

    cloud-only           the prompt as typed, all T steps on the cloud model (not private)
    device-only          all T steps on the device model, nothing sent (private)
    hybrid-k5/-k10       Hybrid SD: the prompt as typed, k cloud steps, T-k device steps (not private)
    obclip-k5/-k10       ObCLIP, every cloud step a full pass (exact)
    obclip-k5-paper/...  ObCLIP with the paper's preset: batch reuse + attention cache + block skip
    obclip-k5-cache/...  the preset without batch reuse (attention cache + block skip)

Scores, from mini/analyser.py on each image against the prompt's attributes:
colour / shape / both accuracy; MMD^2 (unbiased, fixed features) of the
method's N images against N real renders of another held-out draw
(``make_dataset(N, seed=1, split="heldout")``, as mini/train.py's final
evaluation); seconds per image (wall time of generate(), cloud included, on
this machine). A "real renders" row scores the prompts' own renders: the
analyser's ceiling and the MMD^2 noise floor at this N.

Batch reuse broadcasts the attention maps of the pivot (candidate 0 of the
canonical order, "red circle") to every candidate, so for each ObCLIP row the
accuracy is also split by whether the prompt's real candidate was the pivot.
Only 1 prompt in 18 has a red circle (5 of the default 60), so that split is
coarse; --all-candidates also finishes every candidate of each ObCLIP request
on the device as if it were the real one (scored against its own attributes),
which gives pivot vs non-pivot over all 18 candidates (~3x the device work).

Uncertainty: every accuracy comes with its Wilson 95% interval, and each
ObCLIP and Hybrid SD row with the paired bootstrap interval (prompts
resampled, mini/stats.py) of its "both" accuracy minus its reference's:
accelerated ObCLIP against exact ObCLIP at the same k, exact ObCLIP and Hybrid
SD against cloud-only. The per-prompt hits behind them are in the JSON.

Writes <out>/quality.md (the table), quality.json and quality_grid.png
(rows: methods, columns: the first prompts). Deterministic for fixed models,
engines and arguments, except the seconds.

--sweep FILE runs acceleration configurations instead of the table (see
expand_sweep for the file: entries and/or grids of AccelerationConfig fields,
anything AccelerationConfig.from_dict accepts; invalid combinations are
skipped with the reason). The exact run (every cloud step a full pass) is
always run first, as the reference. Every configuration runs at k = --sweep-k
on the same prompts and seeds with every candidate finished on the device (as
--all-candidates), and gets: its server cost in T MACs (SD-v1.4, N = 6,
T = 25, counted by benchmarks/flops.py, independent of the mini models);
"both" accuracy on the pivot (Wilson 95%) and on the non-pivot candidates
(bootstrap over prompts, 95%); the paired difference to the exact run on the
non-pivot candidates (prompt x candidate pairs, prompts resampled with all
their candidates) with the one-sided 95% bound of the loss; MMD^2 against the
real renders and against the exact run's images; the Pareto front (non-pivot
accuracy up, T MACs down). Writes <out>/sweep.md, sweep.json, sweep.png, and
rewrites sweep.md/json after every configuration while it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # mini/ (the demo model's data and analyser) runs from the checkout only

import numpy as np  # noqa: E402

from obclip.runtime.locations import default_engines_root  # noqa: E402
from obclip.runtime.plan import PRESETS, AccelerationConfig, preset  # noqa: E402

PROMPT_SEED = 0       # make_dataset seed of the held-out prompts (as mini/train.py's evaluation)
REFERENCE_SEED = 1    # make_dataset seed of the real renders MMD^2 compares against
SEED = 1234           # generation seed of prompt 0; prompt i uses SEED + i
SCHEMA = "shapes"     # the attribute schema shipped with obclip for the mini pair
ENGINE_CACHE = default_engines_root() / "quality"
GRID_COLUMNS = 8
PAPER_PRESETS = {5: "paper-k5", 10: "paper-k10"}


# --------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    key: str                                   # --methods key, e.g. "obclip-k5-paper"
    label: str                                 # table name, e.g. "ObCLIP"
    method: str                                # device.pipeline.Method value
    k: int | None = None                       # cloud steps (None: cloud-only T, device-only 0)
    accel: str = "-"                           # table label of the cloud's accelerations
    acceleration: AccelerationConfig | None = None

    def config(self, steps: int, guidance: float, seed: int):
        from obclip.device.oblivious import TransformConfig
        from obclip.device.pipeline import GenerationConfig

        return GenerationConfig(method=self.method, num_inference_steps=steps, switch_step=self.k,
                                guidance_scale=guidance, seed=seed, acceleration=self.acceleration,
                                transform=TransformConfig(schema_path=SCHEMA))

    def cloud_steps(self, steps: int) -> int:
        if self.method == "cloud-only":
            return steps
        if self.method == "device-only":
            return 0
        return self.k

    @property
    def is_obclip(self) -> bool:
        return self.method == "obclip"


def default_methods(presets: dict[int, AccelerationConfig | str] | None = None) -> list[MethodSpec]:
    """The table's rows: baselines, then ObCLIP exact / preset / cache-only for each k of ``presets``.

    ``presets``: {k: preset name or AccelerationConfig with switch_step k}; default the paper's k = 5, 10.
    """
    presets = dict(PAPER_PRESETS if presets is None else presets)
    accs = {k: preset(p) if isinstance(p, str) else p for k, p in presets.items()}
    names = {k: p if isinstance(p, str) else "preset" for k, p in presets.items()}
    for k, acc in accs.items():
        if acc.switch_step != k:
            raise ValueError(f"preset for k={k} has switch_step {acc.switch_step}")
    ks = sorted(accs)
    rows = [MethodSpec("cloud-only", "Cloud only", "cloud-only"),
            MethodSpec("device-only", "Device only", "device-only")]
    rows += [MethodSpec(f"hybrid-k{k}", "Hybrid SD", "hybrid-sd", k, "exact") for k in ks]
    rows += [MethodSpec(f"obclip-k{k}", "ObCLIP", "obclip", k, "exact") for k in ks]
    rows += [MethodSpec(f"obclip-k{k}-paper", "ObCLIP", "obclip", k, f"{names[k]} (reuse+cache+skip)", accs[k])
             for k in ks]
    rows += [MethodSpec(f"obclip-k{k}-cache", "ObCLIP", "obclip", k, f"{names[k]} cache+skip, no reuse",
                        accs[k].replace(batch_reuse=False)) for k in ks]
    return rows


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def heldout_prompts(n: int):
    """(captions, attributes, renders) of the first n held-out samples: the fixed prompt set."""
    from mini.shapes import make_dataset

    images, captions, attrs = make_dataset(n, seed=PROMPT_SEED, split="heldout")
    return captions, attrs, images


def reference_renders(n: int) -> np.ndarray:
    """n real held-out renders of another draw, for MMD^2."""
    from mini.shapes import make_dataset

    return make_dataset(n, seed=REFERENCE_SEED, split="heldout")[0]


# --------------------------------------------------------------------------
# The per-method loop
# --------------------------------------------------------------------------


def run_methods(cloud, pipeline, methods: list[MethodSpec], prompts: list[str], *, steps: int = 25,
                guidance: float = 7.5, seed: int = SEED, all_candidates: bool = False, progress=None) -> list[dict]:
    """Generate every prompt with every method; one record per method.

    cloud: the transport (``CloudStepRunner.handle``). Prompt i uses seed + i
    for every method. Each record: the spec, ``images`` uint8 [n, H, W, 3],
    ``seconds`` (generate() wall time per image), ``cloud_seconds``,
    ``real_index`` and ``n_candidates`` per prompt; with ``all_candidates``,
    ObCLIP records also get ``candidates``: per prompt, every candidate's
    image and assignment (the device finishing it as if it were the real one).
    """
    bad = [m.key for m in methods if m.cloud_steps(steps) > steps]
    if bad:
        raise ValueError(f"T={steps} is below the switch point k of {bad}; use T >= k")
    records = []
    for spec in methods:
        images, seconds, cloud_s, real_index, n_cands, cands = [], [], [], [], [], []
        t_method = time.perf_counter()
        for i, prompt in enumerate(prompts):
            config = spec.config(steps, guidance, seed + i)
            handoffs = []

            def transport(request: bytes, handoffs: list = handoffs) -> bytes:
                handoffs.append(cloud(request))
                return handoffs[-1]

            t0 = time.perf_counter()
            result = pipeline.generate(prompt, transport, config)
            seconds.append(time.perf_counter() - t0)
            cloud_s.append(result.timings["cloud"])
            images.append(result.image)
            prepared = result.prepared
            real_index.append(prepared.real_index)
            n_cands.append(prepared.candidate_set.n if prepared.candidate_set is not None else 1)
            if all_candidates and spec.is_obclip:
                cands.append(_finish_all(pipeline, prepared, handoffs[-1], config, result.image))
        records.append({"spec": spec, "steps": steps, "images": np.stack(images), "seconds": seconds,
                        "cloud_seconds": cloud_s,
                        "real_index": real_index, "n_candidates": n_cands,
                        **({"candidates": cands} if cands else {})})
        if progress:
            progress(f"{spec.key}: {len(prompts)} prompts in {time.perf_counter() - t_method:.1f}s")
    return records


FINISH_BATCH = 9  # candidates finished per device batch (rows 2 x 9 = 18: the default N in two batches)


def _finish_all(pipeline, prepared, handoff: bytes, config, real_image: np.ndarray) -> dict:
    """Every candidate of one request finished on the device as if it were the real one.

    The others are finished in batches (DevicePipeline.finish_candidates: the same steps row for row,
    ~5x faster than one at a time on CPU); the real one keeps the image generate() made."""
    cs = prepared.candidate_set
    others = [i for i in range(cs.n) if i != prepared.real_index]
    latents = [pipeline.finish_candidates(prepared, handoff, config, others[j:j + FINISH_BATCH])
               for j in range(0, len(others), FINISH_BATCH)]
    decoded = pipeline.engines.decode(np.concatenate(latents)) if others else None
    images = []
    for i in range(cs.n):
        images.append(real_image if i == prepared.real_index else decoded[others.index(i)])
    return {"images": np.stack(images), "assignments": [dict(a) for a in cs.assignments]}


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


ATTRIBUTES = ("colour", "shape", "both")
FEW_PROMPTS = 20  # below this, bootstrap intervals are flagged as not meaningful
BOOTSTRAP_RESAMPLES = 10000


def _hits(images, attrs) -> dict[str, np.ndarray] | None:
    """Per image: colour / shape / both read back right (mini/analyser.py's attribute_hits), bool arrays."""
    from mini.analyser import attribute_hits

    attrs = list(attrs)
    if len(attrs) == 0:
        return None
    hits = attribute_hits(list(images), attrs)
    return {k: np.asarray(hits[k], bool) for k in ATTRIBUTES}


def _accuracy_of(hits: dict | None) -> dict | None:
    return None if hits is None else {k: float(np.mean(v)) for k, v in hits.items()}


def _wilson(hits) -> list[float]:
    from mini.stats import wilson_interval

    hits = np.asarray(hits, bool)
    return list(wilson_interval(int(hits.sum()), len(hits)))


def _ci_of(hits: dict | None) -> dict | None:
    """Wilson 95% interval of each accuracy (images scored independently)."""
    return None if hits is None else {k: _wilson(v) for k, v in hits.items()}


def _accuracy(images, attrs) -> dict | None:
    return _accuracy_of(_hits(images, attrs))


def _scored(images, attrs) -> dict:
    """accuracy, its Wilson 95% interval, and the per-image hits (kept for exact pairing)."""
    hits = _hits(images, attrs)
    return {"accuracy": _accuracy_of(hits), "accuracy_ci": _ci_of(hits),
            "hits": None if hits is None else {k: v.tolist() for k, v in hits.items()}}


def _paired(a, b, level: float = 0.95) -> dict:
    """Paired bootstrap of mean(a) - mean(b) over the same prompts (mini/stats.py), as a dict."""
    from mini.stats import paired_bootstrap

    d = paired_bootstrap(np.asarray(a, np.float64), np.asarray(b, np.float64),
                         resamples=BOOTSTRAP_RESAMPLES, level=level)
    return {"diff": d.diff, "lo": d.lo, "hi": d.hi, "n": d.n, "resamples": d.resamples, "level": level}


def _mmd2(images: np.ndarray, reference: np.ndarray) -> float | None:
    from mini.analyser import mmd2

    return float(mmd2(images, reference)) if len(images) >= 2 and len(reference) >= 2 else None


def reference_key(spec: MethodSpec, specs: list[MethodSpec]) -> str | None:
    """The row a row's "both" is compared with: accelerated ObCLIP -> exact ObCLIP at the same k;
    exact ObCLIP and Hybrid SD -> cloud-only; others (and a reference not run) -> None."""
    if spec.is_obclip and spec.acceleration is not None:
        want = [m for m in specs if m.is_obclip and m.acceleration is None and m.k == spec.k]
    elif spec.is_obclip or spec.method == "hybrid-sd":
        want = [m for m in specs if m.method == "cloud-only"]
    else:
        return None
    return want[0].key if want else None


def summarize(records: list[dict], attrs, renders: np.ndarray, reference: np.ndarray) -> dict:
    """Table rows (no images): accuracy with Wilson 95% intervals and per-prompt hits, the paired
    bootstrap difference of "both" against the row's reference (``reference_key``), MMD^2, seconds;
    pivot splits for the ObCLIP rows."""
    attrs = list(attrs)
    rows = [{"key": "real", "label": "Real renders (reference)", "method": "real", "k": None, "accel": "-",
             "n": len(attrs), **_scored(renders, attrs), "mmd2": _mmd2(renders, reference),
             "seconds_per_image": None}]
    splits = []
    specs = [rec["spec"] for rec in records]
    for rec in records:
        spec = rec["spec"]
        rows.append({
            "key": spec.key, "label": spec.label, "method": spec.method, "k": spec.cloud_steps(rec["steps"]),
            "accel": spec.accel,
            "acceleration": spec.acceleration.to_dict() if spec.acceleration else None, "n": len(attrs),
            **_scored(rec["images"], attrs), "mmd2": _mmd2(rec["images"], reference),
            "seconds_per_image": float(np.mean(rec["seconds"])),
            "cloud_seconds_per_image": float(np.mean(rec["cloud_seconds"])),
            "n_candidates": sorted(set(rec["n_candidates"])),
        })
        if not spec.is_obclip:
            continue
        pivot = [i for i, r in enumerate(rec["real_index"]) if r == 0]
        others = [i for i, r in enumerate(rec["real_index"]) if r != 0]

        def part(idx: list[int], rec: dict = rec) -> dict:
            hits = _hits(rec["images"][idx], [attrs[i] for i in idx])
            return {"prompts": len(idx), "accuracy": _accuracy_of(hits), "accuracy_ci": _ci_of(hits)}

        split = {"key": spec.key, "label": spec.label, "k": spec.k, "accel": spec.accel,
                 "batch_reuse": bool(spec.acceleration and spec.acceleration.batch_reuse),
                 "by_real_index": {"pivot": part(pivot), "others": part(others)}}
        if "candidates" in rec:
            per_index = []
            n = min(len(c["assignments"]) for c in rec["candidates"])
            for j in range(n):
                per_index.append(_accuracy([c["images"][j] for c in rec["candidates"]],
                                           [c["assignments"][j] for c in rec["candidates"]]))
            pivot_hits = _hits([c["images"][0] for c in rec["candidates"]],
                               [c["assignments"][0] for c in rec["candidates"]])
            others_imgs = [c["images"][j] for c in rec["candidates"] for j in range(1, len(c["assignments"]))]
            others_asg = [c["assignments"][j] for c in rec["candidates"] for j in range(1, len(c["assignments"]))]
            others_hits = _hits(others_imgs, others_asg)
            split["all_candidates"] = {
                "pivot": {"images": len(rec["candidates"]), "accuracy": _accuracy_of(pivot_hits),
                          "accuracy_ci": _ci_of(pivot_hits)},
                # Wilson over images: candidates of one prompt share a trajectory, so this is optimistic.
                "others": {"images": len(others_imgs), "accuracy": _accuracy_of(others_hits),
                           "accuracy_ci": _ci_of(others_hits)},
                "per_index": per_index,
                "pivot_assignment": rec["candidates"][0]["assignments"][0],
            }
        splits.append(split)

    by_key = {r["key"]: r for r in rows}
    for row, spec in zip(rows[1:], specs):
        ref = reference_key(spec, specs)
        if spec.is_obclip or spec.method == "hybrid-sd":
            row["reference"] = ref
            row["vs_reference"] = (None if ref is None or row["hits"] is None else
                                   {"metric": "both", **_paired(row["hits"]["both"], by_key[ref]["hits"]["both"])})
    return {"rows": rows, "pivot_split": splits, "resolution": resolution(rows)}


def resolution(rows: list[dict]) -> dict:
    """What the sample can resolve: n, the Wilson half-widths of "both" at the observed rates, and the
    widths of the paired bootstrap intervals of the differences (in accuracy units, 0..1)."""
    n = max((r["n"] for r in rows), default=0)
    halves = [(r["accuracy_ci"]["both"][1] - r["accuracy_ci"]["both"][0]) / 2 for r in rows
              if r.get("accuracy_ci") and r["key"] != "real"]
    widths = [r["vs_reference"]["hi"] - r["vs_reference"]["lo"] for r in rows if r.get("vs_reference")]
    from mini.stats import wilson_interval

    lo, hi = wilson_interval(n // 2, n) if n else (0.0, 0.0)
    return {"n": n, "one_prompt": 1 / n if n else None,
            "wilson_half_width_both": [min(halves), max(halves)] if halves else None,
            "wilson_half_width_at_50": (hi - lo) / 2,
            "paired_interval_width": [min(widths), max(widths)] if widths else None}


# --------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------


def _pct(acc: dict | None, key: str) -> str:
    return "-" if acc is None else f"{100 * acc[key]:.1f}"


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def header_lines(meta: dict) -> list[str]:
    lines = ["# Image quality on held-out shape prompts (mini Table 2)", ""]
    if meta.get("warning"):
        lines += [f"> **WARNING: {meta['warning']}**", ""]
    lines += [
        f"- cloud model: `{meta['cloud_model']}` (weights: {meta['cloud_weights']})",
        f"- device model: `{meta['device_model']}` (weights: {meta['device_weights']}), "
        f"engines `{meta['engines']}`",
        f"- T = {meta['T']} DPM-Solver++ steps, guidance {meta['guidance']}, {meta['prompts']} prompts: "
        f"the captions of "
        f"`make_dataset({meta['prompts']}, seed={PROMPT_SEED}, split=\"heldout\")`, prompt i with seed "
        f"{meta['seed']} + i for every method",
        f"- ObCLIP candidates: schema `{meta['schema']}`, N = {meta['n_candidates']} per request; "
        f"pivot = candidate 0 ({meta.get('pivot', 'red circle')})",
        f"- accuracy: mini/analyser.py's colour / shape / both against the prompt's attributes "
        f"(one prompt = {100 / max(meta['prompts'], 1):.1f} points); MMD^2: unbiased, against "
        f"`make_dataset({meta['prompts']}, seed={REFERENCE_SEED}, split=\"heldout\")` renders",
        f"- seconds/image: wall time of DevicePipeline.generate with the cloud in process, {meta['threads']} "
        f"thread(s), on {meta['machine']}",
    ]
    return lines


def _ci_pct(acc: dict | None, ci: dict | None, key: str) -> str:
    """'45.0 [32.1, 58.6]': accuracy and its 95% interval in percent."""
    if acc is None:
        return "-"
    if not ci:
        return _pct(acc, key)
    return f"{100 * acc[key]:.1f} [{100 * ci[key][0]:.1f}, {100 * ci[key][1]:.1f}]"


def _diff_pct(d: dict | None) -> str:
    """'-3.3 [-10.0, +3.3]': a paired difference in points with its interval."""
    if d is None:
        return "-"
    return f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"


def _span(pair, scale: float = 100) -> str:
    return "-" if not pair else (f"{scale * pair[0]:.1f}" if abs(pair[0] - pair[1]) < 1e-12
                                 else f"{scale * pair[0]:.1f}-{scale * pair[1]:.1f}")


def resolution_lines(res: dict) -> list[str]:
    n = res["n"]
    if not n:
        return []
    few = [] if n >= FEW_PROMPTS else [
        "", f"> With {n} prompts the paired bootstrap intervals are too narrow to mean anything (a percentile "
            "bootstrap only sees the variation between the prompts it has); the Wilson intervals still hold."]
    return few + [
        f"Sample: n = {n} prompts per row, the same prompts and seeds for every row (one prompt = "
        f"{100 / n:.1f} points). Intervals: Wilson 95% for each accuracy; paired bootstrap 95% "
        f"({BOOTSTRAP_RESAMPLES} resamples of the prompts, both rows resampled together) for Δ both, the "
        "difference to the row's reference (accelerated ObCLIP: exact ObCLIP at the same k; exact ObCLIP "
        "and Hybrid SD: cloud only; the reference is named in the JSON's `reference`).",
        "",
        f"What n = {n} resolves: the Wilson half-width of 'both' at the observed rates is "
        f"{_span(res['wilson_half_width_both'])} points ({100 * res['wilson_half_width_at_50']:.1f} at 50%), so "
        "two rows compared unpaired must differ by about √2 times that (more where the rates are near 50%) "
        "to be told apart; paired, the bootstrap intervals "
        f"of Δ both are {_span(res['paired_interval_width'])} points wide, so a paired difference smaller than "
        "about half that width (or any whose interval contains 0) is not resolved. A 95% interval of a "
        "difference of 0 does not show that two rows are equal, only that the sample cannot separate them.",
    ]


def markdown(summary: dict, meta: dict) -> str:
    lines = header_lines(meta) + ["",
             "| method | k | accel | colour % [95% CI] | shape % [95% CI] | both % [95% CI] | Δ both vs ref "
             "[95% CI] | MMD² | seconds/image |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        k = "-" if r["k"] is None else r["k"]
        a, ci = r["accuracy"], r.get("accuracy_ci")
        ref = r.get("vs_reference")
        diff = "-" if "reference" not in r else (
            f"{_diff_pct(ref)} vs {r['reference']}" if ref else "reference not run")
        lines.append(f"| {r['label']} | {k} | {r['accel']} | {_ci_pct(a, ci, 'colour')} | "
                     f"{_ci_pct(a, ci, 'shape')} | {_ci_pct(a, ci, 'both')} | {diff} | "
                     f"{_num(r['mmd2'], '.4f')} | {_num(r['seconds_per_image'], '.2f')} |")
    if summary.get("resolution"):
        lines += [""] + resolution_lines(summary["resolution"])
    if summary["pivot_split"]:
        lines += ["", "Pivot vs non-pivot (ObCLIP): accuracy (both %, Wilson 95%) when the prompt's real "
                      "candidate is the pivot (candidate 0) vs any other; batch reuse broadcasts the pivot's "
                      "attention maps.", ""]
        has_all = any("all_candidates" in s for s in summary["pivot_split"])
        head = "| method | k | accel | real = pivot: prompts | both % | real ≠ pivot: prompts | both % |"
        rule = "|---|---:|---|---:|---:|---:|---:|"
        if has_all:
            head += " all candidates: pivot both % | others both % |"
            rule += "---:|---:|"
        lines += [head, rule]
        for s in summary["pivot_split"]:
            p, o = s["by_real_index"]["pivot"], s["by_real_index"]["others"]
            line = (f"| {s['label']} | {s['k']} | {s['accel']} | {p['prompts']} | "
                    f"{_ci_pct(p['accuracy'], p.get('accuracy_ci'), 'both')} | "
                    f"{o['prompts']} | {_ci_pct(o['accuracy'], o.get('accuracy_ci'), 'both')} |")
            if has_all:
                ac = s.get("all_candidates")
                line += (f" {_ci_pct(ac['pivot']['accuracy'], ac['pivot'].get('accuracy_ci'), 'both')} | "
                         f"{_ci_pct(ac['others']['accuracy'], ac['others'].get('accuracy_ci'), 'both')} |"
                         if ac else " - | - |")
            lines.append(line)
        if has_all:
            lines += ["", "The 'others' interval counts every non-pivot image as independent; candidates of "
                          "one prompt share the cloud's trajectory, so it is optimistic (the sweep, --sweep, "
                          "resamples prompts instead)."]
    return "\n".join(lines) + "\n"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def save_grid(path: Path, records: list[dict], captions: list[str], attrs, renders: np.ndarray,
              columns: int = GRID_COLUMNS, scale: int = 2) -> None:
    """PNG: one row per method (the real renders first), one column per prompt; under each image
    what the analyser read, green when colour and shape both match the prompt, red otherwise."""
    from PIL import Image, ImageDraw

    from mini.analyser import analyse

    cols = min(columns, len(captions))
    rows = [("Real renders", "ground truth", renders)]
    rows += [(r["spec"].label, f"k={r['spec'].cloud_steps(r['steps'])}"
              + ("" if r["spec"].accel == "-" else f" {r['spec'].accel}"), r["images"]) for r in records]
    h, w = renders.shape[1] * scale, renders.shape[2] * scale
    font, small = _font(12), _font(10)
    label_w, pad, cap_lines, foot = 200, 6, 3, 16
    head_h = 14 * cap_lines + 18
    cell_w, cell_h = w + pad, h + foot + pad
    grid = Image.new("RGB", (label_w + cols * cell_w + pad, head_h + len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c in range(cols):
        x = label_w + c * cell_w
        draw.text((x, 2), f"#{c}", fill="black", font=font)
        for n, line in enumerate(textwrap.wrap(captions[c], 22)[:cap_lines]):
            draw.text((x, 16 + 13 * n), line, fill="black", font=small)
    for r, (label, sub, images) in enumerate(rows):
        y = head_h + r * cell_h
        draw.text((pad, y + h // 2 - 14), label, fill="black", font=font)
        for n, line in enumerate(textwrap.wrap(sub, 30)[:2]):
            draw.text((pad, y + h // 2 + 2 + 12 * n), line, fill="dimgray", font=small)
        for c in range(cols):
            x = label_w + c * cell_w
            grid.paste(Image.fromarray(images[c]).resize((w, h), Image.NEAREST), (x, y))
            a = analyse(images[c])
            ok = a.colour == attrs[c].colour and a.shape == attrs[c].shape
            draw.text((x, y + h + 2), f"{a.colour} {a.shape}", fill="green" if ok else "red", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def per_prompt(records: list[dict], captions: list[str], attrs, seed: int) -> list[dict]:
    """What the analyser read for every (prompt, method): for the JSON."""
    from mini.analyser import analyse

    out = []
    for i, (cap, a) in enumerate(zip(captions, attrs)):
        row = {"prompt": cap, "seed": seed + i, "colour": a.colour, "shape": a.shape, "methods": {}}
        for rec in records:
            got = analyse(rec["images"][i])
            row["methods"][rec["spec"].key] = {"colour": got.colour, "shape": got.shape,
                                               "real_index": rec["real_index"][i],
                                               "seconds": round(rec["seconds"][i], 4)}
        out.append(row)
    return out


def write_outputs(out: Path, summary: dict, meta: dict, records: list[dict], captions: list[str], attrs,
                  renders: np.ndarray) -> dict[str, Path]:
    """<out>/quality.md, quality.json, quality_grid.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "quality.md", "json": out / "quality.json", "grid": out / "quality_grid.png"}
    paths["markdown"].write_text(markdown(summary, meta))
    doc = {"meta": meta, **summary, "per_prompt": per_prompt(records, captions, attrs, meta["seed"])}
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    save_grid(paths["grid"], records, captions, attrs, renders)
    return paths


# --------------------------------------------------------------------------
# Sweep: server cost vs utility over acceleration configurations
# --------------------------------------------------------------------------

SWEEP_COST_MODEL = "sd-v1.4"  # the paper's convention for server cost: SD-v1.4, N = 6, T = 25
SWEEP_COST_N = 6
SWEEP_COST_T = 25
EXACT_NAME = "exact"


@dataclass(frozen=True)
class SweepConfig:
    name: str
    acceleration: AccelerationConfig | None  # None: the exact run (every cloud step a full pass)
    aliases: tuple[str, ...] = ()            # other sweep entries with the same configuration

    @property
    def is_exact(self) -> bool:
        return self.acceleration is None


def _sweep_fields(entry: dict, k: int) -> dict:
    """An entry's AccelerationConfig fields: switch_step = k unless given, then a named ``preset``'s
    fields, then ``base`` (grids) and ``acceleration``. No field list of its own: from_dict judges them."""
    fields: dict = {"switch_step": k}
    if entry.get("preset") is not None:
        fields.update(preset(entry["preset"]).to_dict())
    for part in ("base", "acceleration"):
        value = entry.get(part)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{part} must be an object of AccelerationConfig fields, got {value!r}")
        fields.update(value or {})
    return fields


def _grid_name(prefix: str | None, combo: dict) -> str:
    inner = ",".join(f"{f}={v}" for f, v in combo.items())
    return f"{prefix}[{inner}]" if prefix else inner


def expand_sweep(doc, k: int = 10) -> tuple[list[SweepConfig], list[dict]]:
    """(configurations, skipped) from a sweep file's JSON.

    ``doc``: a list of entries, or one grid object. An entry is
    ``{"name": ..., "acceleration": {AccelerationConfig fields} | null, "preset": NAME?}`` (null and no
    preset: the exact run), or a grid ``{"name": prefix?, "preset": NAME?, "base": {...}, "grid":
    {field: [values, ...], ...}}`` expanded to every combination of the values (named
    ``prefix[field=value,...]``). ``switch_step`` defaults to k; a configuration for another k, or one
    AccelerationConfig.from_dict refuses, is skipped (``skipped``: name, fields, reason). The exact run
    comes first, always; a configuration equal to an earlier one becomes an alias of it.
    """
    entries = doc if isinstance(doc, list) else [doc]
    exact = AccelerationConfig.none(k)
    # Keyed by the canonical JSON of the fields: a field added later need not be hashable.
    found: dict[str | None, tuple[AccelerationConfig | None, list[str]]] = {None: (None, [EXACT_NAME])}
    skipped: list[dict] = []
    names: set[str] = {EXACT_NAME}

    def add(name: str, fields: dict | None) -> None:
        if name in names and name != EXACT_NAME:
            raise ValueError(f"sweep entry name {name!r} is used twice")
        if name == EXACT_NAME and fields is not None:
            raise ValueError(f"the name {EXACT_NAME!r} is reserved for the exact run (acceleration null)")
        names.add(name)
        if fields is None:
            cfg = None
        else:
            try:
                cfg = AccelerationConfig.from_dict(dict(fields))
            except (ValueError, TypeError) as e:
                skipped.append({"name": name, "fields": fields, "reason": str(e)})
                return
            if cfg.switch_step != k:
                skipped.append({"name": name, "fields": fields,
                                "reason": f"switch_step {cfg.switch_step} but the sweep runs k = {k} (--sweep-k)"})
                return
            if cfg == exact:
                cfg = None
        if name != EXACT_NAME or cfg is not None:
            key = None if cfg is None else json.dumps(cfg.to_dict(), sort_keys=True, default=str)
            found.setdefault(key, (cfg, []))[1].append(name)

    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError(f"a sweep entry must be an object, got {entry!r}")
        if "grid" in entry:
            grid = entry["grid"]
            if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
                raise ValueError(f"grid must map field names to non-empty lists of values, got {grid!r}")
            base = _sweep_fields(entry, k)
            for values in itertools.product(*grid.values()):
                combo = dict(zip(grid, values))
                add(_grid_name(entry.get("name"), combo), {**base, **combo})
        else:
            if not isinstance(entry.get("name"), str) or not entry["name"]:
                raise ValueError(f"a sweep entry needs a name, got {entry!r}")
            exact_entry = entry.get("acceleration") is None and entry.get("preset") is None
            add(entry["name"], None if exact_entry else _sweep_fields(entry, k))
    configs = [SweepConfig(ns[0], cfg, tuple(ns[1:])) for cfg, ns in found.values()]
    return configs, skipped


def load_sweep(path: Path, k: int = 10) -> tuple[list[SweepConfig], list[dict]]:
    return expand_sweep(json.loads(Path(path).read_text()), k)


def flops_counter():
    """benchmarks/flops.py's StepCounter (the benchmarks are scripts, not a package; as latency.py)."""
    import importlib.util

    name = "obclip_benchmark_flops"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("flops.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        spec.loader.exec_module(module)
    return module.StepCounter()


def server_cost(counter, config: AccelerationConfig) -> dict:
    """Server cost of one request with ``config`` in the paper's setting (SD-v1.4, N = 6, T = 25),
    counted from the ops that run (benchmarks/flops.py): T MACs (paper convention) and T FLOPs."""
    setup, costs = counter.plan_steps(SWEEP_COST_MODEL, SWEEP_COST_N, config, SWEEP_COST_T)
    total = setup + sum(b for _, b in costs)
    return {"paper_tmacs": total.paper_macs / 1e12, "tflops": float(total.flops) / 1e12,
            "modes": [s.mode.value for s, _ in costs]}


def sweep_costs(configs: list[SweepConfig], k: int, cost=None, log=None) -> tuple[list[SweepConfig], dict, list]:
    """(configs that could be counted, {name: cost}, skipped): a configuration whose cost cannot be
    counted (the accelerated UNet refuses it) is skipped with the reason."""
    if cost is None:
        counter = flops_counter()

        def cost(config: AccelerationConfig) -> dict:
            return server_cost(counter, config)

    kept, costs, skipped = [], {}, []
    for c in configs:
        try:
            costs[c.name] = cost(c.acceleration or AccelerationConfig.none(k))
        except (ValueError, RuntimeError, NotImplementedError) as e:
            if c.acceleration is None:
                raise
            skipped.append({"name": c.name, "fields": c.acceleration.to_dict(), "reason": f"cost: {e}"})
            if log:
                log(f"skip {c.name}: cost: {e}")
            continue
        kept.append(c)
    return kept, costs, skipped


def sweep_spec(c: SweepConfig, k: int) -> MethodSpec:
    return MethodSpec(c.name, c.name, "obclip", k, c.name, c.acceleration)


def _hit_matrix(rec: dict) -> list[np.ndarray]:
    """Per prompt: 'both' hit of every candidate (index 0 the pivot), from an --all-candidates record."""
    cands = rec["candidates"]
    sizes = [len(c["assignments"]) for c in cands]
    hits = _hits([im for c in cands for im in c["images"]], [a for c in cands for a in c["assignments"]])
    both = hits["both"] if hits is not None else np.zeros(0, bool)
    return np.split(both, np.cumsum(sizes)[:-1])


def _prompt_means(per_prompt: list[np.ndarray]) -> np.ndarray:
    """Per prompt: the share of its non-pivot candidates read right. Equal candidate counts are needed
    so that the mean over prompts is the mean over candidates (bootstrap by prompt)."""
    sizes = {len(h) for h in per_prompt}
    if len(sizes) != 1 or sizes == {1}:
        raise ValueError(f"every prompt needs the same number (>= 2) of candidates, got {sorted(sizes)}")
    return np.array([h[1:].mean() for h in per_prompt])


def score_sweep_record(rec: dict, attrs, renders_ref: np.ndarray, exact: dict | None) -> dict:
    """One configuration's scores (no images), pairing with ``exact`` (the exact run's scores, or None:
    this is the exact run) per prompt x candidate."""
    per_prompt = _hit_matrix(rec)
    pivot = np.array([h[0] for h in per_prompt])
    others = np.concatenate([h[1:] for h in per_prompt])
    means = _prompt_means(per_prompt)
    zeros = np.zeros_like(means)
    cluster = _paired(means, zeros)  # bootstrap by prompt of the non-pivot accuracy
    ref_means = means if exact is None else np.asarray(exact["non_pivot"]["prompt_means"])
    ref_hits = per_prompt if exact is None else [np.asarray(h, bool) for h in exact["hits"]]
    if [len(h) for h in ref_hits] != [len(h) for h in per_prompt]:
        raise ValueError("the exact run and this configuration have different candidates; cannot pair them")
    two = _paired(means, ref_means)
    one = _paired(means, ref_means, level=0.90)  # its lower end is the one-sided 95% bound
    all_images = np.concatenate([c["images"] for c in rec["candidates"]])
    return {
        "hits": [h.tolist() for h in per_prompt],
        "pivot": {"images": len(pivot), "correct": int(pivot.sum()), "accuracy": float(pivot.mean()),
                  "ci": _wilson(pivot)},
        "non_pivot": {"images": len(others), "prompts": len(per_prompt), "correct": int(others.sum()),
                      "accuracy": float(others.mean()),
                      "ci": [cluster["lo"], cluster["hi"]],       # resampling prompts (honest)
                      "ci_wilson_images": _wilson(others),        # images as independent (optimistic)
                      "prompt_means": means.tolist()},
        "vs_exact_non_pivot": {"diff": two["diff"], "lo": two["lo"], "hi": two["hi"],
                               "loss_upper95": max(0.0, -one["lo"]), "resamples": two["resamples"],
                               "prompts": two["n"]},
        "mmd2_renders": _mmd2(rec["images"], renders_ref),
        "_candidate_images": all_images,
        "seconds_per_request": float(np.mean(rec["seconds"])),
        "cloud_seconds_per_request": float(np.mean(rec["cloud_seconds"])),
    }


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """points (cost, utility): True where no other point costs no more and is worth no less, one strictly."""
    out = []
    for i, (c, u) in enumerate(points):
        out.append(not any((c2 <= c and u2 >= u and (c2 < c or u2 > u))
                           for j, (c2, u2) in enumerate(points) if j != i))
    return out


def run_sweep(cloud, pipeline, configs: list[SweepConfig], captions: list[str], attrs, *, k: int = 10,
              steps: int = 25, guidance: float = 7.5, seed: int = SEED, costs: dict | None = None,
              cost=None, reference: np.ndarray | None = None, progress=None, checkpoint=None) -> dict:
    """Every configuration (the exact run first) on the same prompts and seeds, every candidate finished
    on the device (run_methods with all_candidates), scored and paired with the exact run.

    costs: {name: server_cost(...)} (default: counted here). checkpoint(result): called after each
    configuration with the results so far (for partial files during a long sweep).
    """
    if not configs or not configs[0].is_exact:
        raise ValueError("the exact run must be the first configuration (expand_sweep puts it there)")
    attrs = list(attrs)
    skipped: list[dict] = []
    if costs is None:
        configs, costs, skipped = sweep_costs(configs, k, cost, progress)
    if reference is None:
        reference = reference_renders(len(captions))
    results: list[dict] = []
    exact: dict | None = None
    exact_images = None
    started = time.perf_counter()
    for c in configs:
        (rec,) = run_methods(cloud, pipeline, [sweep_spec(c, k)], captions, steps=steps, guidance=guidance,
                             seed=seed, all_candidates=True)
        scores = score_sweep_record(rec, attrs, reference, exact)
        images = scores.pop("_candidate_images")
        if exact_images is None:
            exact, exact_images = scores, images
            scores["mmd2_vs_exact"] = None  # the reference itself
        else:
            scores["mmd2_vs_exact"] = _mmd2(images, exact_images)
        results.append({"name": c.name, "aliases": list(c.aliases), "exact": c.is_exact,
                        "acceleration": c.acceleration.to_dict() if c.acceleration else None,
                        **costs[c.name], **scores})
        if progress:
            s = results[-1]
            progress(f"sweep {len(results)}/{len(configs)} {c.name}: {s['paper_tmacs']:.2f} T MACs, non-pivot "
                     f"{100 * s['non_pivot']['accuracy']:.1f}%, pivot {100 * s['pivot']['accuracy']:.1f}% "
                     f"({time.perf_counter() - started:.0f}s)")
        if checkpoint:
            checkpoint(_sweep_result(results, skipped, k))
    return _sweep_result(results, skipped, k)


def _sweep_result(results: list[dict], skipped: list[dict], k: int) -> dict:
    results = [dict(r) for r in results]  # a snapshot: checkpoints keep what was done when they were taken
    front = pareto_front([(r["paper_tmacs"], r["non_pivot"]["accuracy"]) for r in results])
    paper = PRESETS.get(PAPER_PRESETS.get(k, ""))
    for r, on in zip(results, front):
        r["pareto"] = on
        r["paper_preset"] = paper is not None and r["acceleration"] == paper.to_dict()
    return {"configs": results, "skipped": skipped, "k": k}


def sweep_markdown(result: dict, meta: dict) -> str:
    k = result["k"]
    rows = sorted(result["configs"], key=lambda r: (r["paper_tmacs"], -r["non_pivot"]["accuracy"]))
    exact = next(r for r in result["configs"] if r["exact"])
    n_prompts = exact["non_pivot"]["prompts"]
    n_cands = len(exact["hits"][0])
    lines = [f"# Acceleration sweep: server cost vs utility (ObCLIP, k = {k})", ""]
    if meta.get("warning"):
        lines += [f"> **WARNING: {meta['warning']}**", ""]
    lines += [
        f"- cloud model: `{meta['cloud_model']}` (weights: {meta['cloud_weights']}), device model: "
        f"`{meta['device_model']}` (weights: {meta['device_weights']})",
        f"- T = {meta['T']}, k = {k}, guidance {meta['guidance']}; {n_prompts} held-out prompts "
        f"(`make_dataset({n_prompts}, seed={PROMPT_SEED}, split=\"heldout\")`), prompt i with seed "
        f"{meta['seed']} + i, the same for every configuration",
        f"- schema `{meta['schema']}`: N = {n_cands} candidates per request, every one finished on the device "
        f"as if it were the real one and scored against its own attributes (mini/analyser.py, 'both' = colour "
        f"and shape right); pivot = candidate 0 ({meta.get('pivot', 'red circle')}): {n_prompts} images per "
        f"configuration, non-pivot: {n_prompts} x {n_cands - 1} = {n_prompts * (n_cands - 1)}",
        f"- server cost: T MACs (1e12 multiply-adds, the paper's convention) of one request on "
        f"{SWEEP_COST_MODEL}, N = {SWEEP_COST_N}, k = {k}, T = {SWEEP_COST_T}, counted from the ops that run "
        "(benchmarks/flops.py); it does not depend on the mini models measured here",
        "- intervals (95%): pivot: Wilson; non-pivot and Δ: bootstrap over prompts "
        f"({BOOTSTRAP_RESAMPLES} resamples; a prompt keeps all its candidates, which share one cloud "
        "trajectory), paired with the exact run prompt by prompt and candidate by candidate; 'loss ≤' is the "
        "one-sided 95% upper bound of exact minus this configuration (non-pivot)",
        "- MMD²: the real candidates' images against real renders of another held-out draw (as the table); "
        "vs exact: all candidate images against the exact run's (same prompts, seeds, candidates)",
        "- front: Pareto front, maximising non-pivot accuracy and minimising T MACs",
        "",
        "| configuration | r | s | T MACs | × exact | pivot both % [95%] | non-pivot both % [95%] | "
        "Δ non-pivot vs exact [95%] | loss ≤ | MMD² renders | MMD² vs exact | s/request | front |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]

    def pct(v: float) -> str:
        return f"{100 * v:.1f}"

    for r in rows:
        acc = r["acceleration"] or {}
        name = r["name"] + (" (paper preset)" if r.get("paper_preset") else "") + (
            f" (= {', '.join(r['aliases'])})" if r["aliases"] else "")
        p, o, d = r["pivot"], r["non_pivot"], r["vs_exact_non_pivot"]
        lines.append(
            f"| {name} | {acc.get('cache_step', '-')} | {acc.get('skip_step', '-')} | {r['paper_tmacs']:.2f} | "
            f"{r['paper_tmacs'] / exact['paper_tmacs']:.3f} | {pct(p['accuracy'])} [{pct(p['ci'][0])}, "
            f"{pct(p['ci'][1])}] | {pct(o['accuracy'])} [{pct(o['ci'][0])}, {pct(o['ci'][1])}] | "
            f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] | {pct(d['loss_upper95'])} | "
            f"{_num(r['mmd2_renders'], '.4f')} | {_num(r['mmd2_vs_exact'], '.4f')} | "
            f"{r['seconds_per_request']:.2f} | {'●' if r['pareto'] else ''} |")
    widths = [r["vs_exact_non_pivot"]["hi"] - r["vs_exact_non_pivot"]["lo"] for r in rows if not r["exact"]]
    if n_prompts < FEW_PROMPTS:
        lines += ["", f"> With {n_prompts} prompts the bootstrap intervals are too narrow to mean anything: a "
                      "percentile bootstrap only sees the variation between the prompts it has (with 1-2 "
                      "prompts often none). Use them from about 20 prompts on."]
    lines += ["", f"Sample: {n_prompts} prompts; the pivot's Wilson half-width at the exact run's rate is "
                  f"{50 * (exact['pivot']['ci'][1] - exact['pivot']['ci'][0]):.1f} points, the non-pivot "
                  f"interval {50 * (exact['non_pivot']['ci'][1] - exact['non_pivot']['ci'][0]):.1f}; paired Δ "
                  f"intervals are {_span([min(widths), max(widths)] if widths else None)} points wide. 'loss ≤ X': "
                  "with 95% confidence this configuration loses at most X points of non-pivot accuracy to the "
                  "exact run; a large X says the sample cannot vouch for the configuration, not that it loses "
                  "that much."]
    if result["skipped"]:
        lines += ["", f"Skipped ({len(result['skipped'])}):", ""]
        lines += [f"- `{s['name']}`: {s['reason']}" for s in result["skipped"]]
    lines += ["", "Every configuration's fields are in sweep.json (`acceleration`)."]
    return "\n".join(lines) + "\n"


# Display only (plot labels): shorter words for the fields a grid usually varies.
_SHORT = (("skip_variant=", ""), ("cache_step", "r"), ("skip_step", "s"), ("faster-diffusion", "FD"),
          ("deepcache", "DC"), ("batch_reuse", "reuse"))


def _short(name: str) -> str:
    for long, short in _SHORT:
        name = name.replace(long, short)
    return name


def plot_sweep(result: dict, path: Path) -> bool:
    """<out>/sweep.png: non-pivot accuracy vs server T MACs, front highlighted, paper preset and exact
    labelled. False (and a message) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed ({sys.executable}); skipped {path}", file=sys.stderr)
        return False
    rows = result["configs"]
    x = np.array([r["paper_tmacs"] for r in rows])
    y = np.array([100 * r["non_pivot"]["accuracy"] for r in rows])
    lo = np.array([100 * r["non_pivot"]["ci"][0] for r in rows])
    hi = np.array([100 * r["non_pivot"]["ci"][1] for r in rows])
    front = np.array([r["pareto"] for r in rows])
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o", color="0.6", ecolor="0.85", ms=4, label="configuration")
    order = np.argsort(x[front])
    ax.plot(x[front][order], y[front][order], "-o", color="tab:red", ms=6, label="Pareto front")
    n_labels = 0
    for r, xi, yi in zip(rows, x, y):
        if r["exact"] or r.get("paper_preset"):
            ax.annotate("exact" if r["exact"] else f"{r['name']} (paper)", (xi, yi), textcoords="offset points",
                        xytext=(6, 6), fontsize=9, weight="bold")
            ax.plot([xi], [yi], "s", color="tab:blue" if r["exact"] else "tab:green", ms=8)
        elif r["pareto"]:
            n_labels += 1
            ax.annotate(_short(r["name"]), (xi, yi), textcoords="offset points",
                        xytext=(6, -12 if n_labels % 2 else 8), fontsize=7, color="tab:red")
    ax.set_xlabel(f"server T MACs per request ({SWEEP_COST_MODEL}, N={SWEEP_COST_N}, k={result['k']}, "
                  f"T={SWEEP_COST_T}, paper convention)")
    ax.set_ylabel("non-pivot 'both' accuracy % (95% CI, by prompt)")
    ax.set_title("ObCLIP acceleration sweep: utility vs server cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_sweep(out: Path, result: dict, meta: dict, plot: bool = True) -> dict[str, Path]:
    """<out>/sweep.md, sweep.json and (plot) sweep.png."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "sweep.md", "json": out / "sweep.json"}
    paths["markdown"].write_text(sweep_markdown(result, meta))
    doc = {"meta": meta, "cost": {"model": SWEEP_COST_MODEL, "N": SWEEP_COST_N, "T": SWEEP_COST_T,
                                  "unit": "1e12 multiply-adds, paper convention"}, **result}
    paths["json"].write_text(json.dumps(_jsonable(doc), indent=1, allow_nan=False) + "\n")
    if plot and plot_sweep(result, out / "sweep.png"):
        paths["plot"] = out / "sweep.png"
    return paths


# --------------------------------------------------------------------------
# Models and engines
# --------------------------------------------------------------------------


def weights_origin(model: str) -> str:
    """'trained' / 'random' from the dir's obclip_model.json, else 'unknown'."""
    info = Path(model) / "obclip_model.json"
    try:
        return str(json.loads(info.read_text()).get("weights", "unknown"))
    except (OSError, ValueError):
        return "unknown (no obclip_model.json)"


def resolve_models(cloud: str | None, device: str | None) -> tuple[str, str]:
    """(cloud_dir, device_dir): explicit dirs win, else the embedded trained pair."""
    from obclip.cloud.models import default_models

    if cloud is None or device is None:
        default = default_models()
        cloud = cloud if cloud is not None else str(default[0])
        device = device if device is not None else str(default[1])
    return cloud, device


def resolve_engines(device_model: str, engines: str | None = None, cache: Path = ENGINE_CACHE) -> str:
    """Device engines for ``device_model``: --engines as given; the embedded default's own
    (ensure_default_engines); else exported once into ``cache``/<hash of the path>/device and reused
    while the model's files are unchanged."""
    from obclip.cloud.models import DEFAULT_MODELS_DIR
    from obclip.export.build_engines import ensure_default_engines, ensure_engines

    if engines:
        return engines
    model = Path(device_model).resolve()
    if model == (DEFAULT_MODELS_DIR / "device").resolve():
        return str(ensure_default_engines())
    return str(ensure_engines(str(model), cache / hashlib.sha256(str(model).encode()).hexdigest()[:16]))


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv=None) -> int:
    keys = [m.key for m in default_methods()]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cloud-model", default=None,
                   help="cloud model dir (default: the embedded pair, src/obclip/models/obclip-mini/cloud)")
    p.add_argument("--device-model", default=None,
                   help="device model dir (default: the embedded pair, src/obclip/models/obclip-mini/device)")
    p.add_argument("--engines", default=None,
                   help="device engines dir (default: exported from the device model into a cache, reused)")
    p.add_argument("--prompts", type=int, default=60, help="number of held-out prompts (default 60)")
    p.add_argument("--steps", type=int, default=25, help="T (default 25)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=SEED, help="generation seed of prompt 0 (+1 per prompt)")
    p.add_argument("--methods", nargs="+", default=keys, choices=keys, metavar="KEY",
                   help=f"rows to run (default all): {' '.join(keys)}")
    p.add_argument("--all-candidates", action="store_true",
                   help="also finish every ObCLIP candidate as if real: pivot vs others over all candidates")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default 1)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "quality",
                   help="folder for quality.md, quality.json, quality_grid.png (default docs/quality)")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the Markdown table")
    p.add_argument("--sweep", type=Path, metavar="FILE",
                   help="run an acceleration sweep instead of the table: FILE is JSON, a list of {name, "
                        "acceleration} entries and/or {base, grid} objects (see expand_sweep); writes "
                        "<out>/sweep.md, sweep.json, sweep.png (e.g. benchmarks/sweeps/issue16.json)")
    p.add_argument("--sweep-k", type=int, default=10, help="switch point k of the sweep (default 10)")
    p.add_argument("--sweep-list", action="store_true",
                   help="with --sweep: expand the file, count every configuration's server cost, print them "
                        "and the skipped ones, and stop (no generation)")
    p.add_argument("--config", action="append", default=[], metavar="LABEL=JSON",
                   help="an extra ObCLIP row with this acceleration (AccelerationConfig fields as JSON, "
                        "e.g. the options of docs/method.md 7.7); repeatable")
    args = p.parse_args(argv)

    if args.prompts < 1:
        print("error: --prompts must be >= 1", file=sys.stderr)
        return 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    sweep = None
    if args.sweep is not None:
        if args.steps < args.sweep_k:
            print(f"error: --steps {args.steps} is below --sweep-k {args.sweep_k}; use T >= k", file=sys.stderr)
            return 2
        try:
            configs, skipped = load_sweep(args.sweep, args.sweep_k)
        except (OSError, ValueError) as e:
            print(f"error: --sweep {args.sweep}: {e}", file=sys.stderr)
            return 2
        for sk in skipped:
            log(f"skip {sk['name']}: {sk['reason']}")
        configs, costs, cost_skipped = sweep_costs(configs, args.sweep_k, log=log)
        skipped += cost_skipped
        log(f"sweep: {len(configs)} configurations (exact first), {len(skipped)} skipped")
        for c in configs:
            log(f"  {c.name}: {costs[c.name]['paper_tmacs']:.2f} T MACs"
                + (f" (= {', '.join(c.aliases)})" if c.aliases else ""))
        if args.sweep_list:
            return 0
        sweep = (configs, costs, skipped)
    methods = [m for m in default_methods() if m.key in args.methods]
    for text in args.config:
        label, _, body = text.partition("=")
        try:
            cfg = AccelerationConfig.from_dict(json.loads(body))
        except ValueError as e:
            print(f"error: --config {text!r}: {e}", file=sys.stderr)
            return 2
        methods.append(MethodSpec(f"obclip-{label}", "ObCLIP", "obclip", cfg.switch_step, label, cfg))
    too_big = [m.key for m in methods if m.cloud_steps(args.steps) > args.steps]
    if too_big and sweep is None:
        print(f"error: --steps {args.steps} is below the switch point k of {too_big}; use T >= k", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.steps import CloudStepRunner
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.oblivious import ObliviousTransform, TransformConfig
    from obclip.device.pipeline import DevicePipeline

    cloud_dir, device_dir = resolve_models(args.cloud_model, args.device_model)
    engines_dir = resolve_engines(device_dir, args.engines)
    pipeline = DevicePipeline(DeviceEngines(EngineConfig(engines_dir=engines_dir, threads=args.threads)))
    runner = CloudStepRunner(load_text_to_latent(cloud_dir))

    captions, attrs, renders = heldout_prompts(args.prompts)
    reference = reference_renders(args.prompts)
    transform = ObliviousTransform(TransformConfig(schema_path=SCHEMA))
    sets = [transform(c) for c in captions]
    n_cands = sorted({s.n for s in sets})
    pivot = sets[0].assignments[0]

    weights = {"cloud": weights_origin(cloud_dir), "device": weights_origin(device_dir)}
    warning = None
    if any(w != "trained" for w in weights.values()):
        warning = (f"cloud weights {weights['cloud']}, device weights {weights['device']}; with RANDOM weights "
                   "the images are noise and these numbers say nothing about quality")
        log(f"WARNING: {warning}")
    meta = {"cloud_model": cloud_dir, "device_model": device_dir, "engines": engines_dir,
            "engines_model": pipeline.engines.manifest.model_id, "cloud_weights": weights["cloud"],
            "device_weights": weights["device"], "warning": warning, "T": args.steps, "guidance": args.guidance,
            "prompts": args.prompts, "seed": args.seed, "prompt_source": {"seed": PROMPT_SEED, "split": "heldout"},
            "reference_source": {"seed": REFERENCE_SEED, "split": "heldout"},
            "schema": SCHEMA,
            "n_candidates": n_cands[0] if len(n_cands) == 1 else n_cands,
            "pivot": " ".join(str(v) for v in pivot.values()), "methods": [m.key for m in methods],
            "all_candidates": args.all_candidates, "threads": args.threads, "machine": _machine()}

    if sweep is not None:
        return _main_sweep(args, sweep, runner, pipeline, captions, attrs, reference, meta, log)
    t0 = time.perf_counter()
    records = run_methods(runner.handle, pipeline, methods, captions, steps=args.steps, guidance=args.guidance,
                          seed=args.seed, all_candidates=args.all_candidates, progress=log)
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    summary = summarize(records, attrs, renders, reference)
    paths = write_outputs(args.out, summary, meta, records, captions, attrs, renders)
    if args.json:
        print(paths["json"].read_text(), end="")
    else:
        print(paths["markdown"].read_text(), end="")
        print(f"\n{len(methods)} methods x {args.prompts} prompts in {meta['elapsed_s']}s; wrote "
              + ", ".join(str(p) for p in paths.values()))
    return 0


def _main_sweep(args, sweep, runner, pipeline, captions, attrs, reference, meta, log) -> int:
    configs, costs, skipped = sweep
    meta = {**meta, "methods": None, "all_candidates": True, "sweep_file": str(args.sweep), "k": args.sweep_k}

    def checkpoint(partial: dict) -> None:  # partial files while a long sweep runs
        write_sweep(args.out, {**partial, "skipped": skipped}, {**meta, "partial": True}, plot=False)

    t0 = time.perf_counter()
    result = run_sweep(runner.handle, pipeline, configs, captions, attrs, k=args.sweep_k, steps=args.steps,
                       guidance=args.guidance, seed=args.seed, costs=costs, reference=reference, progress=log,
                       checkpoint=checkpoint)
    result["skipped"] = skipped
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    paths = write_sweep(args.out, result, meta)
    if args.json:
        print(paths["json"].read_text(), end="")
    else:
        print(paths["markdown"].read_text(), end="")
        print(f"\n{len(configs)} configurations x {args.prompts} prompts x {meta['n_candidates']} candidates in "
              f"{meta['elapsed_s']}s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
