"""Cloud fp16 engines: ``OUT/cloud-fp16``, converted from the checked fp32 folder ``OUT/cloud``.

    python export/build_engines.py --cloud-model DIR --cloud-precision fp16   # OUT/cloud, then OUT/cloud-fp16
    obclip-serve --backend onnxruntime --engines OUT/cloud-fp16 [--providers cuda]

Not re-traced: every graph of the fp32 folder (the text encoder, one graph per step mode, and
``cross_kv`` if present) is converted with the device variants' converter
(``device_variants.fp16_model``): weights and compute in float16, graph inputs and outputs kept
float32 (so the service, the step loop and the caches between steps are unchanged), and the ops in
``CLOUD_FP16_KEEP_FP32`` kept float32: the device list ``FP16_KEEP_FP32`` (norms' variance,
softmax, the timestep embedding's sin/cos/exp) plus ``CumSum``. Batch reuse's token alignment
takes range sums as differences of a running sum, which needs float32's mantissa (differences of
numbers near 1), so the whole range-sum chain (``range_sum_nodes``: the cast of the softmax
output, CumSum, pad, gathers at the starts and stops, the difference, the weights, the
renormalisation) is kept float32, and the float16 round trips the converter puts between two
float32 nodes are removed (``drop_fp16_round_trips``): the running sum is never rounded to
float16. The folder has the fp32 folder's layout (``export/cloud_engines.py``): the converted mode
graphs again reference ONE shared weights file, ``unet/weights.bin``, now holding float16 tensors
(each once, content-addressed by ``cloud_engines.SharedWeightsWriter``), which
``cloud/engine_backend.OrtEngine`` maps once and hands to every session.
The manifest hashes every file, records ``precision: "fp16"`` and the same mode table.

This is the folder TensorRT builds from (``--tensorrt --cloud-precision fp16``: a strongly typed
network, so fp16 graphs give fp16 engines) and that onnxruntime's CUDA provider serves in float16.
onnxruntime's CPU provider has few float16 kernels: it runs these graphs with casts inserted
(correct, which is what the check below needs, but not faster than fp32 there).

The check, printed and stored in the manifest's ``variant_check``; a folder that fails it is not
written (built beside the target, removed on failure), and a rerun skips a folder already built
from the same fp32 manifest with the same conversion and check:

- per graph: the fp16 graph against its fp32 graph on the same random batch (3 candidates, latent
  side 3x the graphs' multiple; the caches a mode reads are those the fp32 graphs wrote on that
  batch), max |fp16 - fp32| / max(1, |fp32|) over all outputs <= ``GRAPH_TOLERANCE``;
- end to end: the cloud steps of a few prompts (presets ``none-k10`` and ``paper-k10``, those the
  folder has graphs for; at the model's default image size, at most 256 px) through ``OrtEngine``
  on both folders, same seed: the handed-off latents' max and mean abs difference, the max
  relative to max(1, |fp32|) <= ``LATENT_TOLERANCE``.

Tolerances: float16 rounds to 2^-11 (~4.9e-4) relative; a UNet graph is dozens of float16
matmuls/convs whose rounding errors add up (the norms and softmax kept float32), and a mode graph's
output is the guided eps, where guidance multiplies the (cond - uncond) error by the guidance scale.
One graph is held to 5e-2 (about 100 float16 roundings, several times the worst difference
measured; docs/ reports the measurements of ``benchmarks/cloud_engines.py``): the check is there to
refuse a broken conversion (an overflow to inf or NaN, a wrong cast, a mis-wired graph: errors of
order 1), not to rank precision choices, which are fixed by construction above (and tested
structurally). The k-step trajectory, where the solver feeds each step's error into the next, is
held to the same 5e-2 relative on the handed-off latents.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from obclip.export.cloud_engines import WEIGHTS, WEIGHTS_INDEX, SharedWeightsWriter
from obclip.export.device_variants import CHECK_PROMPTS, FP16_KEEP_FP32, fp16_model, save_onnx
from obclip.export.specs import ModeGraphSpec, manifest_request_spec
from obclip.export.staging import staged_folder
from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.manifest import EXPORT_VERSION, Manifest, ManifestError, sha256_file
from obclip.runtime.sessions import open_session
from obclip.runtime.weights import SharedWeights

CLOUD_FP16_KEEP_FP32 = (*FP16_KEEP_FP32, "CumSum")
GRAPH_TOLERANCE = 5e-2     # per graph: max |fp16 - fp32| / max(1, |fp32|)
LATENT_TOLERANCE = 5e-2    # end to end: the handed-off latents, same measure
CONVERSION_VERSION = 1     # bump when the conversion changes: an older cloud-fp16 folder is rebuilt


@dataclass(frozen=True)
class CloudFp16Check:
    """What the fp16 folder is checked on (see the module docstring)."""

    prompts: tuple[str, ...] = CHECK_PROMPTS[:3]
    presets: tuple[str, ...] = ("none-k10", "paper-k10")
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 1234
    image_size: int = 256   # at most (the model's default size if smaller): the check runs on the CPU provider,
    #                         where SD's full self-attention maps at 512 px take tens of GB
    graph_tolerance: float = GRAPH_TOLERANCE
    latent_tolerance: float = LATENT_TOLERANCE


def range_sum_nodes(model: Any) -> list[str]:
    """The nodes of batch reuse's aligned range sums, kept float32: each ``CumSum``, the cast that
    feeds it (the traced ``.float()``), and what follows it in the same attention module (pad,
    gathers at the starts and stops, the difference, the weights, the renormalisation) up to the
    cast back to the values' type (``cloud/step_modes.py``, ``_gathered_map_attention``)."""
    consumers: dict[str, list[Any]] = {}
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep: set[str] = set()
    for cumsum in (n for n in model.graph.node if n.op_type == "CumSum"):
        scope = cumsum.name.rsplit("/", 1)[0] + "/"
        feed = producer.get(cumsum.input[0])
        if feed is not None and feed.op_type == "Cast":
            keep.add(feed.name)
        todo = [cumsum]
        while todo:
            n = todo.pop()
            if n.name in keep and n is not cumsum:
                continue
            keep.add(n.name)
            for out in n.output:
                todo.extend(c for c in consumers.get(out, ()) if c.op_type != "Cast" and c.name.startswith(scope)
                            and c.name not in keep)
    return sorted(keep)


def drop_fp16_round_trips(model: Any, fp32_nodes: set[str]) -> int:
    """Remove the float16 round trips the converter puts between two float32 nodes (it casts every
    kept-float32 node's output to float16 and back for the next one): such a consumer reads the
    float32 tensor itself. Returns how many round trips were removed."""
    from onnx import TensorProto

    def to(n: Any) -> int | None:
        return next((a.i for a in n.attribute if a.name == "to"), None) if n.op_type == "Cast" else None

    producer = {o: n for n in model.graph.node for o in n.output}
    outputs = {o.name for o in model.graph.output}
    rename: dict[str, str] = {}
    for n in model.graph.node:
        down = producer.get(n.input[0]) if to(n) == TensorProto.FLOAT else None
        if down is None or to(down) != TensorProto.FLOAT16 or n.output[0] in outputs:
            continue
        source = producer.get(down.input[0])
        if source is not None and source.name in fp32_nodes:
            rename[n.output[0]] = down.input[0]
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    while True:   # the casts left without a consumer
        used = {i for n in model.graph.node for i in n.input} | outputs
        dead = [n for n in model.graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        if not dead:
            return len(rename)
        for n in dead:
            model.graph.node.remove(n)


def convert_graph(src: Path, dst: Path) -> None:
    """One fp32 cloud graph (its weights read from beside it) as float16 (see the module docstring)."""
    import onnx

    range_sums = range_sum_nodes(onnx.load_model(str(src), load_external_data=False))
    # By path: the converter's shape inference then works past protobuf's 2 GB (an SD-size mode graph
    # is larger in fp32); it writes a temporary copy of the graph beside ``src`` for that.
    model = fp16_model(str(src), CLOUD_FP16_KEEP_FP32, range_sums)
    fp32_nodes = set(range_sums) | {n.name for n in model.graph.node if n.op_type in CLOUD_FP16_KEEP_FP32}
    drop_fp16_round_trips(model, fp32_nodes)
    save_onnx(model, dst)


def fp16_dir(out: Path) -> Path:
    return out / "cloud-fp16"


def _rel(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    diff = max(float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()) for g, w in zip(got, want))
    return diff / max(1.0, max(float(np.abs(w).max()) for w in want))


# --- the check ------------------------------------------------------------------------------


def compare_graphs(fp32_dir: Path, fp16: Path, n: int = 3, seed: int = 0) -> dict[str, float]:
    """Component name -> max |fp16 - fp32| / max(1, |fp32|) over its outputs, on one random batch."""
    a, b = Manifest.load(fp32_dir), Manifest.load(fp16)
    src = a.source or {}
    mult = int(src.get("latent_multiple", 1))
    rng = np.random.default_rng(seed)
    out: dict[str, float] = {}

    ids = rng.integers(0, 1000, (n, a.text_max_length))
    te = []
    for m in (a, b):
        session = open_session(m.path_of("text_encoder"))
        dtype = np.int64 if session.get_inputs()[0].type == "tensor(int64)" else np.int32  # int32 since issue 26
        te.append(session.run(None, {"input_ids": ids.astype(dtype)}))
    out["text_encoder"] = _rel(te[1], te[0])

    shared = [SharedWeights.from_index(m.root / WEIGHTS, m.root / WEIGHTS_INDEX) for m in (a, b)]
    request = manifest_request_spec(a)   # SDXL family: with the added inputs
    feeds = request.sample(request.dims(n, mult * 3), rng)
    pool: dict[str, np.ndarray] = {}
    if "unet/cross_kv" in a.components:
        sessions = [s.session(m.path_of("unet/cross_kv")) for s, m in zip(shared, (a, b))]
        names = [o.name for o in sessions[0].get_outputs()]
        ref, got = (s.run(names, {"text": feeds["text"]}) for s in sessions)
        out["unet/cross_kv"] = _rel(got, ref)
        pool.update(zip(names, ref))
    pending = list(a.modes)
    while pending:   # writers first, so each mode reads caches the fp32 graphs really wrote on this batch
        name = next((p for p in pending if set(a.modes[p].get("reads", ())) <= set(pool)), pending[0])
        pending.remove(name)
        info = a.modes[name]
        spec = ModeGraphSpec.from_manifest(a, name)
        shapes = spec.shapes(spec.dims(n, mult * 3))
        for r in info.get("reads", ()):   # no graph here writes it: random at the shape the mode reads
            if r not in pool:
                pool[r] = rng.standard_normal(shapes[r]).astype(np.float32)
        sessions = [s.session(m.path_of(info["component"])) for s, m in zip(shared, (a, b))]
        wanted = {i.name for i in sessions[0].get_inputs()}
        feed = {k: v for k, v in {**feeds, **pool}.items() if k in wanted}
        outputs = [o.name for o in sessions[0].get_outputs()]
        ref, got = (s.run(outputs, feed) for s in sessions)
        out[info["component"]] = _rel(got, ref)
        pool.update((k, v) for k, v in zip(outputs, ref) if k != "eps")
    return out


def compare_runs(fp32_dir: Path, fp16: Path, check: CloudFp16Check) -> dict[str, Any]:
    """The cloud steps of the check prompts through OrtEngine on both folders, same seed, per preset."""
    from obclip.cloud.engine_backend import OrtEngine
    from obclip.cloud.modes import plan_specs
    from obclip.cloud.steps import CloudStepRunner
    from obclip.runtime.plan import preset
    from obclip.runtime.protocol import StepsRequest

    engines = [OrtEngine(f) for f in (fp32_dir, fp16)]
    runners = [CloudStepRunner(engine=e) for e in engines]
    m = engines[0].manifest
    multiple = m.vae_scale_factor * int((m.source or {}).get("latent_multiple", 1))
    size = max(multiple, min(m.default_image_size, check.image_size) // multiple * multiple)
    result: dict[str, Any] = {}
    for name in check.presets:
        cfg = preset(name)
        specs = plan_specs(cfg, cfg.switch_step)
        missing = sorted({s.name for s in specs} - set(m.modes))
        if missing:
            result[name] = {"skipped": f"the folder has no graph for {missing}"}
            continue
        request = StepsRequest(tuple(check.prompts), check.seed, check.steps, cfg.switch_step,
                               check.guidance_scale, size, size, acceleration=cfg)
        answers, seconds = [], []
        for r in runners:
            t0 = time.perf_counter()
            answers.append(r.run(request))
            seconds.append(round(time.perf_counter() - t0, 2))
        ref, got = answers
        diff = np.abs(got.latents.astype(np.float64) - ref.latents)
        result[name] = {"cloud_steps": cfg.switch_step, "image_size": size, "latent_max_abs_diff": float(diff.max()),
                        "latent_mean_abs_diff": float(diff.mean()),
                        "latent_rel_diff": _rel([got.latents], [ref.latents]),
                        "prev_x0_rel_diff": _rel([got.prev_x0], [ref.prev_x0]),
                        "seconds": {"fp32": seconds[0], "fp16": seconds[1]}}
    return result


# --- building -------------------------------------------------------------------------------


def _key(fp32_dir: Path, check: CloudFp16Check) -> dict[str, Any]:
    """What an fp16 folder was built from and how: equal keys, nothing to rebuild."""
    return {"fp32_manifest_sha256": sha256_file(fp32_dir / "manifest.json"),
            "conversion_version": CONVERSION_VERSION, "keep_fp32": list(CLOUD_FP16_KEEP_FP32),
            "check": json.loads(json.dumps(asdict(check)))}


def _up_to_date(target: Path, key: Mapping[str, Any]) -> bool:
    try:
        m = Manifest.load(target)
    except (ManifestError, OSError):
        return False
    src = m.source or {}
    return (m.side == "cloud" and m.precision == "fp16" and src.get("export_version") == EXPORT_VERSION
            and src.get("fp16") == key)


def build_cloud_fp16(fp32_dir: Path, out: Path | None = None, check: CloudFp16Check = CloudFp16Check()) -> Manifest:
    """``out``/cloud-fp16 (``out`` defaults to the fp32 folder's parent) from the fp32 cloud folder,
    atomically; refused (nothing written) when a graph or a run differs from fp32 by more than the
    check's tolerances; skipped when an up-to-date one is there."""
    fp32_dir = Path(fp32_dir)
    base = Manifest.load(fp32_dir)
    src = base.source or {}
    if base.side != "cloud" or base.precision != "fp32" or src.get("precision", "fp32") != "fp32":
        raise InputError(f"{fp32_dir} holds {base.side} {base.precision} engines; the cloud fp16 folder is "
                         "built from the fp32 cloud folder (OUT/cloud)")
    target = fp16_dir(fp32_dir.parent if out is None else Path(out))
    key = _key(fp32_dir, check)
    if _up_to_date(target, key):
        print(f"cloud fp16 engines in {target} are up to date for {fp32_dir}")
        return Manifest.load(target)
    t0 = time.perf_counter()
    with staged_folder(target) as work:
        print(f"building fp16 cloud engines from {fp32_dir} -> {target}")
        raw = work / ".raw"
        # The fp16 mode graphs again share one weights file; each converted graph is added and its
        # raw copy deleted before the next, so disk holds one raw graph at a time.
        with SharedWeightsWriter(work) as writer:
            for name, c in base.components.items():
                if name == "text_encoder":
                    convert_graph(fp32_dir / c.path, work / c.path)
                    continue
                stem = Path(c.path).stem
                if c.path != f"unet/{stem}.onnx":
                    raise ArtifactError(f"{fp32_dir}: component {name} at {c.path}, not under unet/; "
                                        "re-export the cloud")
                convert_graph(fp32_dir / c.path, raw / stem / "model.onnx")
                writer.add(stem, raw / stem / "model.onnx")
                shutil.rmtree(raw / stem)
        shutil.rmtree(raw, ignore_errors=True)
        shutil.copytree(fp32_dir / Path(base.tokenizer).parent, work / Path(base.tokenizer).parent)
        paths = {c.path for c in base.components.values()}
        files = {str(f.relative_to(work)): sha256_file(f) for f in sorted(work.rglob("*"))
                 if f.is_file() and str(f.relative_to(work)) not in paths and f.name != "manifest.json"}
        components = {name: replace(c, sha256=sha256_file(work / c.path)) for name, c in base.components.items()}
        manifest = replace(base, components=components, files=files, precision="fp16", variant_check={},
                           source={**src, "precision": "fp16", "fp16": key}, root=work)
        manifest.save(work)
        converted = time.perf_counter() - t0

        diffs = compare_graphs(fp32_dir, work)
        for name, d in diffs.items():
            print(f"  {name:34s} fp16 vs fp32 max|a-b|/max(1,|b|) {d:.2e}")
        bad = {n: d for n, d in diffs.items() if not d <= check.graph_tolerance}
        if bad:
            raise ArtifactError(f"fp16 cloud graphs differ from fp32 by more than {check.graph_tolerance:.0e} "
                                f"(relative): {', '.join(f'{n} {d:.2e}' for n, d in bad.items())}; not written")
        runs = compare_runs(fp32_dir, work, check)
        for name, r in runs.items():
            if "skipped" in r:
                print(f"  {name}: skipped ({r['skipped']})")
            else:
                print(f"  {name}: {r['cloud_steps']} cloud steps, {len(check.prompts)} prompts: latent max abs diff "
                      f"{r['latent_max_abs_diff']:.3g} (relative {r['latent_rel_diff']:.2e}), mean abs diff "
                      f"{r['latent_mean_abs_diff']:.3g}; run {r['seconds']['fp32']} s fp32, {r['seconds']['fp16']} s "
                      "fp16 (onnxruntime CPU)")
        size = lambda f: sum(p.stat().st_size for p in f.rglob("*") if p.is_file())  # noqa: E731
        result = {"precision": "fp16", "fp16_keep_fp32": list(CLOUD_FP16_KEEP_FP32), **asdict(check),
                  "graph_rel_diff": diffs, "runs": runs, "convert_seconds": round(converted, 1),
                  "check_seconds": round(time.perf_counter() - t0 - converted, 1),
                  "weights_bytes": {"fp32": (fp32_dir / WEIGHTS).stat().st_size,
                                    "fp16": (work / WEIGHTS).stat().st_size},
                  "folder_bytes": {"fp32": size(fp32_dir), "fp16": size(work)}}
        bad_runs = {n: r["latent_rel_diff"] for n, r in runs.items()
                    if "skipped" not in r and not r["latent_rel_diff"] <= check.latent_tolerance}
        if bad_runs:
            worst = ", ".join(f"{n} {d:.2e}" for n, d in bad_runs.items())
            raise ArtifactError(f"fp16 cloud steps move the handed-off latents by more than "
                                f"{check.latent_tolerance:.0e} (relative): {worst}; not written")
        modes = {name: {**info, "check_rel_diff": diffs[info["component"]]} for name, info in base.modes.items()}
        components = {name: replace(c, check_max_abs_diff=diffs[name]) for name, c in components.items()}
        replace(manifest, components=components, modes=modes, variant_check=result).save(work)
    print(f"wrote {target / 'manifest.json'} ({result['folder_bytes']['fp16'] / 1e6:.1f} MB, fp32 "
          f"{result['folder_bytes']['fp32'] / 1e6:.1f} MB; {time.perf_counter() - t0:.1f} s)")
    return Manifest.load(target)
