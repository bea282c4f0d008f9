"""Statistics of benchmarks/quality.py, apart from the runs: per-image hits, accuracies with Wilson
95% intervals, paired bootstrap differences over prompts (mini/stats.py), MMD^2 (mini/analyser.py),
what a sample size can resolve, the sweep's scores and its Pareto front. Pure functions of the
records ``quality.run_methods`` returns; no model, no files.
"""

from __future__ import annotations

from typing import Any

import numpy as np

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


def mmd2(images: np.ndarray, reference: np.ndarray) -> float | None:
    """Unbiased MMD^2 of two image sets (mini/analyser.py), or None below two images each."""
    from mini.analyser import mmd2 as unbiased_mmd2

    return float(unbiased_mmd2(images, reference)) if len(images) >= 2 and len(reference) >= 2 else None


def reference_key(spec: Any, specs: list[Any]) -> str | None:
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
             "n": len(attrs), **_scored(renders, attrs), "mmd2": mmd2(renders, reference),
             "seconds_per_image": None}]
    splits = []
    specs = [rec["spec"] for rec in records]
    for rec in records:
        spec = rec["spec"]
        rows.append({
            "key": spec.key, "label": spec.label, "method": spec.method, "k": spec.cloud_steps(rec["steps"]),
            "accel": spec.accel,
            "acceleration": spec.acceleration.to_dict() if spec.acceleration else None, "n": len(attrs),
            **_scored(rec["images"], attrs), "mmd2": mmd2(rec["images"], reference),
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
        "mmd2_renders": mmd2(rec["images"], renders_ref),
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
