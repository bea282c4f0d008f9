"""What benchmarks/quality.py writes, apart from the runs: the Markdown tables (quality.md,
sweep.md), the JSON documents (quality.json, sweep.json) and the pictures (quality_grid.png,
sweep.png). Everything a report says about the setup comes from the run's ``meta`` (and, for a
sweep, the result's ``cost``), so what is printed is what was run.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
from jsonout import strict_json
from quality_stats import BOOTSTRAP_RESAMPLES, FEW_PROMPTS

GRID_COLUMNS = 8

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
        f"`make_dataset({meta['prompts']}, seed={meta['prompt_source']['seed']}, split=\"heldout\")`, "
        f"prompt i with seed {meta['seed']} + i for every method",
        f"- ObCLIP candidates: schema `{meta['schema']}`, N = {meta['n_candidates']} per request; "
        f"pivot = candidate 0 ({meta.get('pivot', 'red circle')})",
        f"- accuracy: mini/analyser.py's colour / shape / both against the prompt's attributes "
        f"(one prompt = {100 / max(meta['prompts'], 1):.1f} points); MMD^2: unbiased, against "
        f"`make_dataset({meta['prompts']}, seed={meta['reference_source']['seed']}, "
        "split=\"heldout\")` renders",
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


def quality_table(summary: dict) -> list[str]:
    """The quality table's lines: one row per method (accuracy with Wilson 95%, Δ vs its reference)."""
    lines = ["| method | k | accel | colour % [95% CI] | shape % [95% CI] | both % [95% CI] | Δ both vs ref "
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
    return lines


def markdown(summary: dict, meta: dict) -> str:
    lines = header_lines(meta) + [""] + quality_table(summary)
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
    paths["json"].write_text(json.dumps(strict_json(doc), indent=1, allow_nan=False) + "\n")
    save_grid(paths["grid"], records, captions, attrs, renders)
    return paths


def sweep_table(result: dict) -> list[str]:
    """The sweep table's lines: one row per configuration, cheapest first, the Pareto front marked."""
    rows = sorted(result["configs"], key=lambda r: (r["paper_tmacs"], -r["non_pivot"]["accuracy"]))
    exact = next(r for r in result["configs"] if r["exact"])
    lines = [
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
    return lines


def sweep_markdown(result: dict, meta: dict) -> str:
    k, cost = result["k"], result["cost"]
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
        f"(`make_dataset({n_prompts}, seed={meta['prompt_source']['seed']}, split=\"heldout\")`), prompt i "
        "with seed "
        f"{meta['seed']} + i, the same for every configuration",
        f"- schema `{meta['schema']}`: N = {n_cands} candidates per request, every one finished on the device "
        f"as if it were the real one and scored against its own attributes (mini/analyser.py, 'both' = colour "
        f"and shape right); pivot = candidate 0 ({meta.get('pivot', 'red circle')}): {n_prompts} images per "
        f"configuration, non-pivot: {n_prompts} x {n_cands - 1} = {n_prompts * (n_cands - 1)}",
        f"- server cost: T MACs (1e12 multiply-adds, the paper's convention) of one request on "
        f"{cost['model']}, N = {cost['N']}, k = {k}, T = {cost['T']}, counted from the ops that run "
        "(benchmarks/flops.py); it does not depend on the mini models measured here",
        "- intervals (95%): pivot: Wilson; non-pivot and Δ: bootstrap over prompts "
        f"({BOOTSTRAP_RESAMPLES} resamples; a prompt keeps all its candidates, which share one cloud "
        "trajectory), paired with the exact run prompt by prompt and candidate by candidate; 'loss ≤' is the "
        "one-sided 95% upper bound of exact minus this configuration (non-pivot)",
        "- MMD²: the real candidates' images against real renders of another held-out draw (as the table); "
        "vs exact: all candidate images against the exact run's (same prompts, seeds, candidates)",
        "- front: Pareto front, maximising non-pivot accuracy and minimising T MACs",
        "",
    ]
    lines += sweep_table(result)
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
    cost = result["cost"]
    ax.set_xlabel(f"server T MACs per request ({cost['model']}, N={cost['N']}, k={result['k']}, "
                  f"T={cost['T']}, paper convention)")
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
    doc = {"meta": meta, **result}
    paths["json"].write_text(json.dumps(strict_json(doc), indent=1, allow_nan=False) + "\n")
    if plot and plot_sweep(result, out / "sweep.png"):
        paths["plot"] = out / "sweep.png"
    return paths
