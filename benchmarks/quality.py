"""Image quality of ObCLIP and its baselines on held-out shape prompts (the paper's Table 2, mini version).

    python benchmarks/quality.py [--cloud-model DIR] [--device-model DIR] [--engines DIR] [--prompts N]
                                 [--steps 25] [--guidance 7.5] [--methods KEY ...] [--all-candidates]
                                 [--out docs/quality] [--json]

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

Writes <out>/quality.md (the table), quality.json and quality_grid.png
(rows: methods, columns: the first prompts). Deterministic for fixed models,
engines and arguments, except the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
from obclip.runtime.plan import AccelerationConfig, preset  # noqa: E402

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


def _finish_all(pipeline, prepared, handoff: bytes, config, real_image: np.ndarray) -> dict:
    """Every candidate of one request finished on the device as if it were the real one."""
    cs = prepared.candidate_set
    images = []
    for i, text in enumerate(cs.candidates):
        if i == prepared.real_index:
            images.append(real_image)
            continue
        as_real = dataclasses.replace(prepared, prompt=text, real_index=i)
        images.append(pipeline.engines.decode(pipeline.finish(as_real, handoff, config))[0])
    return {"images": np.stack(images), "assignments": [dict(a) for a in cs.assignments]}


# --------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------


def _accuracy(images, attrs) -> dict | None:
    from mini.analyser import attribute_accuracy

    if len(attrs) == 0:
        return None
    acc = attribute_accuracy(list(images), list(attrs))
    return {k: acc[k] for k in ("colour", "shape", "both")}


def _mmd2(images: np.ndarray, reference: np.ndarray) -> float | None:
    from mini.analyser import mmd2

    return float(mmd2(images, reference)) if len(images) >= 2 and len(reference) >= 2 else None


def summarize(records: list[dict], attrs, renders: np.ndarray, reference: np.ndarray) -> dict:
    """Table rows (no images): accuracy, MMD^2, seconds; pivot splits for the ObCLIP rows."""
    attrs = list(attrs)
    rows = [{"key": "real", "label": "Real renders (reference)", "method": "real", "k": None, "accel": "-",
             "n": len(attrs), "accuracy": _accuracy(renders, attrs), "mmd2": _mmd2(renders, reference),
             "seconds_per_image": None}]
    splits = []
    for rec in records:
        spec = rec["spec"]
        rows.append({
            "key": spec.key, "label": spec.label, "method": spec.method, "k": spec.cloud_steps(rec["steps"]),
            "accel": spec.accel,
            "acceleration": spec.acceleration.to_dict() if spec.acceleration else None, "n": len(attrs),
            "accuracy": _accuracy(rec["images"], attrs), "mmd2": _mmd2(rec["images"], reference),
            "seconds_per_image": float(np.mean(rec["seconds"])),
            "cloud_seconds_per_image": float(np.mean(rec["cloud_seconds"])),
            "n_candidates": sorted(set(rec["n_candidates"])),
        })
        if not spec.is_obclip:
            continue
        pivot = [i for i, r in enumerate(rec["real_index"]) if r == 0]
        others = [i for i, r in enumerate(rec["real_index"]) if r != 0]
        split = {"key": spec.key, "label": spec.label, "k": spec.k, "accel": spec.accel,
                 "batch_reuse": bool(spec.acceleration and spec.acceleration.batch_reuse),
                 "by_real_index": {
                     "pivot": {"prompts": len(pivot), "accuracy": _accuracy(rec["images"][pivot],
                                                                             [attrs[i] for i in pivot])},
                     "others": {"prompts": len(others), "accuracy": _accuracy(rec["images"][others],
                                                                               [attrs[i] for i in others])}}}
        if "candidates" in rec:
            per_index = []
            n = min(len(c["assignments"]) for c in rec["candidates"])
            for j in range(n):
                per_index.append(_accuracy([c["images"][j] for c in rec["candidates"]],
                                           [c["assignments"][j] for c in rec["candidates"]]))
            others_imgs = [c["images"][j] for c in rec["candidates"] for j in range(1, len(c["assignments"]))]
            others_asg = [c["assignments"][j] for c in rec["candidates"] for j in range(1, len(c["assignments"]))]
            split["all_candidates"] = {
                "pivot": {"images": len(rec["candidates"]), "accuracy": per_index[0]},
                "others": {"images": len(others_imgs), "accuracy": _accuracy(others_imgs, others_asg)},
                "per_index": per_index,
                "pivot_assignment": rec["candidates"][0]["assignments"][0],
            }
        splits.append(split)
    return {"rows": rows, "pivot_split": splits}


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


def markdown(summary: dict, meta: dict) -> str:
    lines = header_lines(meta) + ["",
             "| method | k | accel | colour % | shape % | both % | MMD² | seconds/image |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in summary["rows"]:
        k = "-" if r["k"] is None else r["k"]
        a = r["accuracy"]
        lines.append(f"| {r['label']} | {k} | {r['accel']} | {_pct(a, 'colour')} | {_pct(a, 'shape')} | "
                     f"{_pct(a, 'both')} | {_num(r['mmd2'], '.4f')} | {_num(r['seconds_per_image'], '.2f')} |")
    if summary["pivot_split"]:
        lines += ["", "Pivot vs non-pivot (ObCLIP): accuracy (both %) when the prompt's real candidate is the "
                      "pivot (candidate 0) vs any other; batch reuse broadcasts the pivot's attention maps.", ""]
        has_all = any("all_candidates" in s for s in summary["pivot_split"])
        head = "| method | k | accel | real = pivot: prompts | both % | real ≠ pivot: prompts | both % |"
        rule = "|---|---:|---|---:|---:|---:|---:|"
        if has_all:
            head += " all candidates: pivot both % | others both % |"
            rule += "---:|---:|"
        lines += [head, rule]
        for s in summary["pivot_split"]:
            p, o = s["by_real_index"]["pivot"], s["by_real_index"]["others"]
            line = (f"| {s['label']} | {s['k']} | {s['accel']} | {p['prompts']} | {_pct(p['accuracy'], 'both')} | "
                    f"{o['prompts']} | {_pct(o['accuracy'], 'both')} |")
            if has_all:
                ac = s.get("all_candidates")
                line += (f" {_pct(ac['pivot']['accuracy'], 'both')} | {_pct(ac['others']['accuracy'], 'both')} |"
                         if ac else " - | - |")
            lines.append(line)
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
    p.add_argument("--config", action="append", default=[], metavar="LABEL=JSON",
                   help="an extra ObCLIP row with this acceleration (AccelerationConfig fields as JSON, "
                        "e.g. the options of docs/method.md 7.7); repeatable")
    args = p.parse_args(argv)

    if args.prompts < 1:
        print("error: --prompts must be >= 1", file=sys.stderr)
        return 2
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
    if too_big:
        print(f"error: --steps {args.steps} is below the switch point k of {too_big}; use T >= k", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    from obclip.cloud.models import load_text_to_latent
    from obclip.cloud.steps import CloudStepRunner
    from obclip.device.engines import DeviceEngines, EngineConfig
    from obclip.device.oblivious import ObliviousTransform, TransformConfig
    from obclip.device.pipeline import DevicePipeline

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
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


if __name__ == "__main__":
    raise SystemExit(main())
