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

This file holds the runs (methods, prompts, the per-method loop, the sweep's configurations and
costs) and the command; the statistics are benchmarks/quality_stats.py, the Markdown, JSON and
pictures benchmarks/quality_report.py.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # mini/ (the demo model's data and analyser) runs from the checkout only
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))  # its statistics and reports (also when imported by a test)

import numpy as np  # noqa: E402
import quality_report as report  # noqa: E402
import quality_stats as stats  # noqa: E402

from obclip.runtime.locations import default_engines_root  # noqa: E402
from obclip.runtime.plan import PRESETS, AccelerationConfig, preset  # noqa: E402

PROMPT_SEED = 0       # make_dataset seed of the held-out prompts (as mini/train.py's evaluation)
REFERENCE_SEED = 1    # make_dataset seed of the real renders MMD^2 compares against
# Where the prompts and the reference renders come from, as every report states it (its meta).
DATA_SOURCES = {"prompt_source": {"seed": PROMPT_SEED, "split": "heldout"},
                "reference_source": {"seed": REFERENCE_SEED, "split": "heldout"}}
SEED = 1234           # generation seed of prompt 0; prompt i uses SEED + i
SCHEMA = "shapes"     # the attribute schema shipped with obclip for the mini pair
ENGINE_CACHE = default_engines_root() / "quality"
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
    in fewer onnxruntime calls than one at a time); the real one keeps the image generate() made."""
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
# Sweep: server cost vs utility over acceleration configurations
# --------------------------------------------------------------------------

SWEEP_COST_MODEL = "sd-v1.4"  # the paper's convention for server cost: SD-v1.4, N = 6, T = 25
SWEEP_COST_N = 6
SWEEP_COST_T = 25
SWEEP_COST = {"model": SWEEP_COST_MODEL, "N": SWEEP_COST_N, "T": SWEEP_COST_T,
              "unit": "1e12 multiply-adds, paper convention"}
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
        scores = stats.score_sweep_record(rec, attrs, reference, exact)
        images = scores.pop("_candidate_images")
        if exact_images is None:
            exact, exact_images = scores, images
            scores["mmd2_vs_exact"] = None  # the reference itself
        else:
            scores["mmd2_vs_exact"] = stats.mmd2(images, exact_images)
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
    front = stats.pareto_front([(r["paper_tmacs"], r["non_pivot"]["accuracy"]) for r in results])
    paper = PRESETS.get(PAPER_PRESETS.get(k, ""))
    for r, on in zip(results, front):
        r["pareto"] = on
        r["paper_preset"] = paper is not None and r["acceleration"] == paper.to_dict()
    return {"configs": results, "skipped": skipped, "k": k, "cost": SWEEP_COST}


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
    from obclip.export.device_engines import ensure_default_engines, ensure_engines

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
            "prompts": args.prompts, "seed": args.seed, **DATA_SOURCES, "schema": SCHEMA,
            "n_candidates": n_cands[0] if len(n_cands) == 1 else n_cands,
            "pivot": " ".join(str(v) for v in pivot.values()), "methods": [m.key for m in methods],
            "all_candidates": args.all_candidates, "threads": args.threads, "machine": _machine()}

    if sweep is not None:
        return _main_sweep(args, sweep, runner, pipeline, captions, attrs, reference, meta, log)
    t0 = time.perf_counter()
    records = run_methods(runner.handle, pipeline, methods, captions, steps=args.steps, guidance=args.guidance,
                          seed=args.seed, all_candidates=args.all_candidates, progress=log)
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    summary = stats.summarize(records, attrs, renders, reference)
    paths = report.write_outputs(args.out, summary, meta, records, captions, attrs, renders)
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
        report.write_sweep(args.out, {**partial, "skipped": skipped}, {**meta, "partial": True}, plot=False)

    t0 = time.perf_counter()
    result = run_sweep(runner.handle, pipeline, configs, captions, attrs, k=args.sweep_k, steps=args.steps,
                       guidance=args.guidance, seed=args.seed, costs=costs, reference=reference, progress=log,
                       checkpoint=checkpoint)
    result["skipped"] = skipped
    meta["elapsed_s"] = round(time.perf_counter() - t0, 1)
    paths = report.write_sweep(args.out, result, meta)
    if args.json:
        print(paths["json"].read_text(), end="")
    else:
        print(paths["markdown"].read_text(), end="")
        print(f"\n{len(configs)} configurations x {args.prompts} prompts x {meta['n_candidates']} candidates in "
              f"{meta['elapsed_s']}s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
