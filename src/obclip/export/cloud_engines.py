"""Export the cloud side: its text encoder and one ONNX graph per step mode, sharing one weights file.

    python export/build_engines.py --cloud-model DIR --out OUT      # OUT/cloud/
    ... --cloud-precision fp16                                      # also OUT/cloud-fp16/ (export/cloud_fp16.py)

Every mode graph is ``cloud.step_modes.run_mode`` traced for one spec
(``cloud.modes.ModeSpec``): the same definition the torch backend runs, so
there is no second implementation to drift. Layout of ``OUT/cloud``::

    manifest.json            side "cloud": components (every file hashed), the mode table
    text_encoder/model.onnx  input_ids -> last_hidden_state, pooler_output (SDXL family: also the
                             penultimate hidden state; text_encoder_2/ and tokenizer_2/ beside it,
                             the device export's definitions, ``onnx_export.text_encoder_exports``)
    unet/<mode>.onnx         one graph per mode; every weight is external data in ...
    unet/weights.bin         ... one file all mode graphs share (each tensor once, 4 KiB aligned)
    unet/weights.json        canonical weight name -> offset, dtype, shape (so the runtime can
                             hand onnxruntime one copy for every session)
    unet/cross_kv.onnx       text -> kv/<module>.k|v (only if an exported mode projects K/V once)
    tokenizer/tokenizer.json

Mode graph inputs: ``sample`` [N, C, h, w], ``timestep`` [1] (float32),
``text`` [N + 1, L, D] (the empty prompt, then the candidates), for an SDXL-family UNet its added
inputs one row per text like ``text`` (``text_embeds`` [N + 1, P], ``time_ids`` [N + 1, 6], LCM-SDXL's
``timestep_cond`` [N + 1, E]; ``runtime.conditioning``, the manifest's ``conditioning`` names the family),
``guidance_scale`` [1], for batch reuse ``align_starts``, ``align_stops`` [N, L]
(int64) and ``align_weights`` [N, L] (``modes.TokenAlignment``), then the cache tensors it reads; outputs ``eps``
[N, C, h, w] then the cache tensors it writes (names in ``cloud/modes.py``).
N, h and w are dynamic (h and w multiples of the UNet's total upsampling).

Exporter: the classic TorchScript one (``dynamo=False``), as for the device.
The tracer specialises the Python control flow of a mode (which blocks run,
which caches are read) exactly once per spec, which is what one graph per mode
wants, and keeps the shape arithmetic dynamic; the dynamo exporter would need
every data-independent branch rewritten and dynamic-shape constraints for N,
h and w, for no gain in the graph.

Each graph is run once in onnxruntime, loaded the way the runtime loads it
(shared weights), against the torch definition on a random batch of another N
and size than the traced one; the max abs difference is printed and recorded,
and an export that differs by more than the tolerance is refused. The folder is
built beside the target and moved into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from obclip.cloud.layouts import rows_for
from obclip.cloud.models import TextToLatentModel, load_text_to_latent, model_schema
from obclip.cloud.modes import ALIGN_INPUTS, ModeSpec, plan_specs, spec_to_dict
from obclip.cloud.step_modes import (
    AlignmentTensors,
    ModeInputs,
    cross_kv,
    processors_installed,
    run_mode,
    unet_conditioning,
)
from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.manifest import EXPORT_VERSION, Component, Manifest, ManifestError, sha256_file
from obclip.runtime.plan import AccelerationConfig, SkipVariant, StepMode, preset
from obclip.runtime.weights import SharedWeights

from .onnx_export import export_component, max_rel_diff, text_encoder_exports, to_torch, trace
from .specs import ModeGraphSpec, cross_kv_spec, request_spec
from .staging import TOKENIZER_2, family_fields, model_fingerprint, model_label, staged_folder

WEIGHTS = "unet/weights.bin"
WEIGHTS_INDEX = "unet/weights.json"
_ALIGN = 4096          # weight offsets, so onnxruntime can map them
_MIN_SHARED = 1024     # bytes: smaller initializers (shapes, scalars) stay inside each graph


def export_configs(which: str, guided: bool = True) -> list[AccelerationConfig]:
    """The acceleration settings whose step modes are exported.

    ``presets``: none-k<k>, paper-k5 and paper-k10, each with and without the exact
    extras (alone and together), lean-k10, paper-lcm-k4, and paper-k5/k10 without batch reuse (the paper's
    "+ cache" ablation row, which ``benchmarks/latency.py`` times). ``all`` adds DeepCache, block skip without the
    attention cache, the attention cache without block skip, no batch reuse, and the
    further options of docs/method.md 7.7 (refresh in reuse mode, frozen guidance, DeepCache's
    shallowest branch, a pivot-only step 0). ``guided=False`` (a guidance-embedding UNet, LCM-SDXL, which
    has no unconditional rows): without the options that change those rows (merged step-0 unconditional
    rows, frozen guidance, pivot-only steps), which ``layouts.rows_for`` refuses for such a model."""
    base = [AccelerationConfig.none(5), preset("paper-k5"), preset("paper-k10")]
    if which == "all":
        p = preset("paper-k10")
        base += [p.replace(skip_variant=SkipVariant.DEEPCACHE), p.replace(attention_cache=False),
                 p.replace(block_skip=False), p.replace(batch_reuse=False),
                 p.replace(attention_cache=False, skip_variant=SkipVariant.DEEPCACHE),
                 p.replace(refresh_every=2, refresh_mode="reuse"), p.replace(frozen_guidance="skip"),
                 p.replace(frozen_guidance="cached"),
                 p.replace(skip_variant=SkipVariant.DEEPCACHE, frozen_guidance="skip"),
                 p.replace(skip_variant=SkipVariant.DEEPCACHE_SHALLOW),
                 p.replace(skip_variant=SkipVariant.DEEPCACHE_SHALLOW, attention_cache=False),
                 p.replace(pivot_only_steps=1)]
    elif which != "presets":
        raise InputError(f"--modes must be presets or all, got {which!r}")
    out = []
    for c in base:
        for kv, merge in ((False, False), (True, False), (False, True), (True, True)):
            out.append(c.replace(cross_kv_once=kv, merge_step0_uncond=merge))
    out += [preset("lean-k10"), preset("paper-lcm-k4"), preset("paper-k5").replace(batch_reuse=False),
            preset("paper-k10").replace(batch_reuse=False)]
    return out if guided else [c for c in out if all(runs_unguided(s) for s in plan_specs(c, c.switch_step))]


def runs_unguided(spec: ModeSpec) -> bool:
    """Whether a guidance-embedding UNet (no unconditional rows) can run the spec (``layouts.rows_for``)."""
    try:
        rows_for(spec, None, torch.zeros(1), guided=False)
    except InputError:
        return False
    return True


def export_specs(which: str, guided: bool = True) -> list[ModeSpec]:
    specs: list[ModeSpec] = []
    for c in export_configs(which, guided):
        for s in plan_specs(c, c.switch_step):
            if s not in specs:
                specs.append(s)
    return specs


# --- the traced modules ---------------------------------------------------------------


class ModeGraph(torch.nn.Module):
    """``run_mode`` for one spec and one request, with flat tensor inputs and outputs (what the exporter traces)."""

    def __init__(self, unet: Any, spec: ModeGraphSpec):
        super().__init__()
        self.unet, self.spec = unet, spec
        self.added = unet_conditioning(unet).added_inputs
        self.reads = [n for n in spec.input_names if n in spec.traced]
        self.writes = [n for n in spec.output_names if n in spec.traced]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        given = dict(zip(self.spec.input_names, tensors))   # the spec's inputs, in its order
        alignment = None
        if self.spec.mode.aligned:
            alignment = (AlignmentTensors(*(given[n] for n in ALIGN_INPUTS)),)
        inputs = ModeInputs(x=given["sample"], timestep=given["timestep"], text=given["text"],
                            guidance_scale=given["guidance_scale"], sizes=None, alignment=alignment,
                            added={n: given[n] for n in self.added})
        eps, writes = run_mode(self.unet, self.spec.mode, inputs, {n: given[n] for n in self.reads})
        return (eps, *(writes[n] for n in self.writes))


class CrossKVGraph(torch.nn.Module):
    def __init__(self, unet: Any, names: list[str]):
        super().__init__()
        self.unet, self.names = unet, names

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
        kv = cross_kv(self.unet, text)
        return tuple(kv[n] for n in self.names)


class _Recorder(dict):
    """A cache mapping that records which names a mode reads."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.used.add(key)
        return super().__getitem__(key)


@dataclass
class _Example:
    """A random single-request batch (the request inputs every mode graph takes) and the caches every
    mode may read, at one N and latent side."""

    n: int
    side: int
    feeds: dict[str, torch.Tensor]       # sample, timestep, text, added inputs, guidance_scale, alignment tables
    caches: dict[SkipVariant, dict[str, torch.Tensor]]   # per skip variant: a full step that writes everything
    kv: dict[str, torch.Tensor]
    added: tuple[str, ...] = ()          # the UNet's added inputs (``Conditioning.added_inputs``)

    @property
    def inputs(self) -> ModeInputs:
        f = self.feeds
        return ModeInputs(x=f["sample"], timestep=f["timestep"], text=f["text"], guidance_scale=f["guidance_scale"],
                          sizes=None, alignment=(AlignmentTensors(*(f[n] for n in ALIGN_INPUTS)),),
                          added={n: f[n] for n in self.added})


def _request_spec(lm: TextToLatentModel) -> ModeGraphSpec:
    return request_spec(lm.latent_channels, int(lm.tokenizer.model_max_length), _text_dim(lm),
                        lm.conditioning.added_widths(), lm.default_image_size)


def _text_dim(lm: TextToLatentModel) -> int:
    """The UNet's text width (SDXL family: both encoders' hidden states side by side)."""
    return int(lm.unet.config.cross_attention_dim)


def _example(lm: TextToLatentModel, n: int, side: int, seed: int) -> _Example:
    unet = lm.unet
    spec = _request_spec(lm)
    feeds = to_torch(spec.sample(spec.dims(n, side), np.random.default_rng(seed)))
    x, text = feeds["sample"], feeds["text"]
    added = lm.conditioning.added_inputs
    guided = lm.conditioning.guided
    with torch.no_grad():
        caches = {}
        for variant in SkipVariant:
            # the guidance residual exists for guided UNets only (frozen guidance)
            writer = ModeSpec(StepMode.FULL, variant, write_attention=True, write_skip=True, write_residual=guided)
            _, w = run_mode(unet, writer, ModeInputs(x=x * 0.9, timestep=torch.tensor([801.0]), text=text,
                                                     guidance_scale=feeds["guidance_scale"],
                                                     added={a: feeds[a] for a in added}), {})
            caches[variant] = w
        kv = cross_kv(unet, text)
    return _Example(n, side, feeds, caches, kv, added)


def _cache_pool(ex: _Example, spec: ModeSpec) -> dict[str, torch.Tensor]:
    pool = dict(ex.caches[spec.skip_variant])
    if spec.cross_kv_once:
        pool.update(ex.kv)
    return pool


def mode_io(unet: Any, spec: ModeSpec, ex: _Example) -> tuple[list[str], list[str]]:
    """(cache names the spec reads, cache names it writes), by running it once."""
    rec = _Recorder(_cache_pool(ex, spec))
    with torch.no_grad():
        _, writes = run_mode(unet, spec, ex.inputs, rec)
    return sorted(rec.used), sorted(writes)


def _cache_shapes(unet: Any, spec: ModeSpec, ex: _Example, reads: list[str], writes: list[str]) -> dict:
    pool = _cache_pool(ex, spec)
    with torch.no_grad():
        _, written = run_mode(unet, spec, ex.inputs, pool)
    return {n: list((pool[n] if n in pool else written[n]).shape) for n in (*reads, *writes)}


def _feeds(graph: ModeGraph, ex: _Example) -> dict[str, torch.Tensor]:
    """The graph's inputs on an example, in input order: the request's, then the caches it reads."""
    pool = _cache_pool(ex, graph.spec.mode)
    return {n: ex.feeds[n] if n in ex.feeds else pool[n] for n in graph.spec.input_names}


# --- one weights file for every graph ---------------------------------------------------


class SharedWeightsWriter:
    """Writes mode graphs one at a time into ``folder/unet/<name>.onnx`` with their large
    initializers as external data in one ``weights.bin``, each distinct tensor stored once under
    a content-derived name. One graph at a time, so an exporter can delete each raw trace as soon
    as it is added (a full-size UNet trace holds every weight; fifteen of them do not fit on disk)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index: dict[str, list] = {}   # name -> [offset, dtype, shape]
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        self._out = open(folder / WEIGHTS, "wb")

    def add(self, name: str, src: Path) -> Path:
        model = onnx.load(str(src))
        rename: dict[str, str] = {}
        keep = []
        kept_names: set[str] = set()
        for init in model.graph.initializer:
            array = numpy_helper.to_array(init)
            data = np.ascontiguousarray(array).tobytes()
            if len(data) < _MIN_SHARED:
                keep.append(init)
                kept_names.add(init.name)
                continue
            digest = hashlib.sha256(data + f"{array.dtype.str}{array.shape}".encode()).hexdigest()
            canonical = f"w.{digest[:24]}"
            rename[init.name] = canonical
            if canonical not in self.index:
                self._out.write(b"\0" * (-self._out.tell() % _ALIGN))
                self.index[canonical] = [self._out.tell(), array.dtype.str, list(array.shape)]
                self._out.write(data)
            if canonical in kept_names:
                continue   # the same tensor twice in one graph: one initializer
            ext = onnx.TensorProto(name=canonical, data_type=init.data_type, dims=list(array.shape),
                                   data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", Path(WEIGHTS).name), ("offset", str(self.index[canonical][0])),
                               ("length", str(len(data)))):
                entry = ext.external_data.add()
                entry.key, entry.value = key, value
            keep.append(ext)
            kept_names.add(canonical)
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        for node in model.graph.node:
            for i, inp in enumerate(node.input):
                if inp in rename:
                    node.input[i] = rename[inp]
        path = self.folder / "unet" / f"{name}.onnx"
        onnx.save(model, str(path))
        return path

    def close(self) -> dict[str, list]:
        """Finish ``weights.bin`` and write its index; returns the index."""
        if not self._out.closed:
            self._out.close()
            (self.folder / WEIGHTS_INDEX).write_text(json.dumps(self.index, sort_keys=True))
        return self.index

    def __enter__(self) -> SharedWeightsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._out.close()   # the staged folder is discarded; no index for a half-written file


# --- the export -----------------------------------------------------------------------


def _rel_diff(got: list[np.ndarray], want: list[torch.Tensor]) -> float:
    diff, scale = max_rel_diff(got, [w.numpy() for w in want])
    return diff / scale


def _latent_multiple(unet: Any) -> int:
    return int(2 ** unet.num_upsamplers)


def build_cloud_engines(model: str, out: Path, *, modes: str | Sequence[ModeSpec] = "presets",
                        tolerance: float = 1e-4,
                        precision: str = "fp32") -> Manifest:
    """Export the cloud model at ``model`` into ``out``/cloud, atomically; graphs already exported
    there for the same model files, precision and export version are reused, not re-traced."""
    if precision != "fp32":
        raise InputError("the cloud model is traced in fp32 only; the fp16 folder is converted from it: "
                         "export.cloud_fp16.build_cloud_fp16 (--cloud-precision fp16)")
    lm = load_text_to_latent(model)
    lm.unet.eval()
    target = out / "cloud"
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = model_fingerprint(Path(model)) if Path(model).is_dir() else model
    guided = lm.conditioning.guided
    specs = export_specs(modes, guided) if isinstance(modes, str) else list(modes)
    if not guided:
        refused = [s.name for s in specs if not runs_unguided(s)]
        if refused:
            raise InputError(f"{model} is a guidance-embedding UNet (LCM) with no unconditional rows; the step modes "
                             f"{refused} change those rows (merge_step0_uncond, frozen_guidance, pivot_only_steps) "
                             "and cannot be exported for it; leave those options off")
    previous = _reusable(target, fingerprint, precision)
    with_kv = any(s.cross_kv_once for s in specs)   # cross_kv_once modes read the K/V graph's outputs
    needed = {s.name for s in specs} | ({"cross_kv"} if with_kv else set())
    if previous and needed <= set(previous):
        print(f"cloud engines in {target} are up to date for {model}")
        return Manifest.load(target)
    t_start = time.perf_counter()
    with staged_folder(target) as work:
        print(f"exporting cloud model {model} -> {target} ({len(specs)} step modes)")
        rng = np.random.default_rng(0)
        length, text_dim = int(lm.tokenizer.model_max_length), _text_dim(lm)
        # The text encoder(s) as the device exports them (SDXL family: both, penultimate states, pooled).
        comps = {spec.name: export_component(module, spec, work, spec.sample({"batch": 1}, rng),
                                             spec.sample({"batch": 3}, rng), tolerance)
                 for module, spec in text_encoder_exports(lm)}
        (work / "tokenizer").mkdir()
        lm.tokenizer.backend_tokenizer.save(str(work / "tokenizer" / "tokenizer.json"))
        if lm.tokenizer_2 is not None:
            (work / TOKENIZER_2).parent.mkdir()
            lm.tokenizer_2.backend_tokenizer.save(str(work / TOKENIZER_2))

        m = _latent_multiple(lm.unet)
        modes_table: dict[str, dict] = {}
        raw = work / ".raw"
        with processors_installed(lm.unet):
            trace_ex = _example(lm, 2, 2 * m, seed=1)
            check_ex = _example(lm, 3, 3 * m, seed=2)
            graphs = {}
            for spec in specs:
                reads, writes = mode_io(lm.unet, spec, trace_ex)
                # cache shapes at the traced N and size (the specs scale them: TensorRT profiles, checks)
                shapes = _cache_shapes(lm.unet, spec, trace_ex, reads, writes)
                graph_spec = ModeGraphSpec.build(spec, reads, writes, shapes, lm.latent_channels, length, text_dim,
                                                 trace_ex.n, trace_ex.side, lm.conditioning.added_widths(),
                                                 lm.default_image_size)
                graphs[spec.name] = ModeGraph(lm.unet, graph_spec)
                modes_table[spec.name] = {"component": f"unet/{spec.name}", "spec": spec_to_dict(spec),
                                          "reads": reads, "writes": writes, "shapes": shapes}
            kv_names = sorted(trace_ex.kv)
            kv_spec = cross_kv_spec({n: list(v.shape) for n, v in trace_ex.kv.items()}, length, text_dim)
            # Each trace goes into the shared weights file as soon as it is made and its raw copy
            # (every weight again) is deleted, so disk holds at most one raw trace at a time.
            with SharedWeightsWriter(work) as writer:
                for name, graph in graphs.items():
                    if name in previous:
                        writer.add(name, previous[name])
                        print(f"  {name:28s} up to date, reused")
                        continue
                    secs = trace(graph, graph.spec, _feeds(graph, trace_ex), raw / name / "model.onnx")
                    writer.add(name, raw / name / "model.onnx")
                    shutil.rmtree(raw / name)
                    print(f"  {name:28s} traced in {secs:5.1f} s")
                if with_kv:
                    if "cross_kv" in previous:
                        writer.add("cross_kv", previous["cross_kv"])
                    else:
                        trace(CrossKVGraph(lm.unet, kv_names), kv_spec, {"text": trace_ex.feeds["text"]},
                              raw / "cross_kv" / "model.onnx")
                        writer.add("cross_kv", raw / "cross_kv" / "model.onnx")
                        shutil.rmtree(raw / "cross_kv")
            shutil.rmtree(raw, ignore_errors=True)

            # The check: the files as the runtime opens them, against the torch definition.
            shared = SharedWeights.from_index(work / WEIGHTS, work / WEIGHTS_INDEX)
            for name, graph in graphs.items():
                path = work / "unet" / f"{name}.onnx"
                session = shared.session(path)
                feeds = _feeds(graph, check_ex)
                with torch.no_grad():
                    want = list(graph(*feeds.values()))
                wanted_inputs = {i.name for i in session.get_inputs()}
                got = session.run(graph.spec.output_names, {k: v.numpy() for k, v in feeds.items()
                                                            if k in wanted_inputs})
                diff = _rel_diff(got, want)
                print(f"  {name:28s} onnxruntime vs torch max|a-b|/max(1,|b|) {diff:.2e}")
                if not diff <= tolerance:
                    raise ArtifactError(f"step mode {name}: the ONNX graph differs from torch by {diff:.3e} "
                                        f"(> {tolerance:.1e}); the export is wrong, not saved")
                comps[f"unet/{name}"] = Component(path=f"unet/{name}.onnx", format="onnx",
                                                  inputs=tuple(graph.spec.input_names),
                                                  outputs=tuple(graph.spec.output_names),
                                                  sha256=sha256_file(path), check_max_abs_diff=diff)
                modes_table[name]["check_rel_diff"] = diff
            if with_kv:
                path = work / "unet" / "cross_kv.onnx"
                session = shared.session(path)
                text = check_ex.feeds["text"]
                got = session.run(kv_names, {"text": text.numpy()})
                with torch.no_grad():
                    want_kv = cross_kv(lm.unet, text)
                diff = _rel_diff(got, [want_kv[n] for n in kv_names])
                print(f"  {'cross_kv':28s} onnxruntime vs torch max|a-b|/max(1,|b|) {diff:.2e}")
                if not diff <= tolerance:
                    raise ArtifactError(f"cross_kv differs from torch by {diff:.3e}; the export is wrong, not saved")
                comps["unet/cross_kv"] = Component(path="unet/cross_kv.onnx", format="onnx", inputs=("text",),
                                                   outputs=tuple(kv_names), sha256=sha256_file(path),
                                                   check_max_abs_diff=diff)
            del shared

        c = lm.latent_channels
        manifest = Manifest(
            side="cloud", model_id=model_label(model), components=comps, tokenizer="tokenizer/tokenizer.json",
            text_max_length=int(length), pad_token_id=int(lm.tokenizer.pad_token_id),
            latent_channels=c, vae_scale_factor=lm.vae_scale_factor, vae_scaling_factor=lm.vae_scaling_factor,
            default_image_size=lm.default_image_size, scheduler_config=dict(lm.scheduler_config),
            schema=model_schema(model), modes=modes_table,
            files={rel: sha256_file(work / rel) for rel in (WEIGHTS, WEIGHTS_INDEX, "tokenizer/tokenizer.json",
                                                            *([TOKENIZER_2] if lm.tokenizer_2 is not None else []))},
            source={"model": str(model), "fingerprint": fingerprint, "precision": precision,
                    "export_version": EXPORT_VERSION, "latent_multiple": m, "trace_n": trace_ex.n,
                    "trace_latent": trace_ex.side, "text_dim": text_dim},
            **family_fields(lm),
        )
        manifest.save(work)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"wrote {target / 'manifest.json'} ({size / 1e6:.1f} MB, {time.perf_counter() - t_start:.1f} s)")
    return Manifest.load(target)


def _reusable(target: Path, fingerprint: str, precision: str) -> dict[str, Path]:
    """Graphs in an existing export of the same model files, precision and export version: name -> path."""
    try:
        m = Manifest.load(target)
    except (ManifestError, OSError):
        return {}
    src = m.source or {}
    if (m.side != "cloud" or src.get("fingerprint") != fingerprint or src.get("precision") != precision
            or src.get("export_version") != EXPORT_VERSION):
        return {}
    out = {name: m.path_of(info["component"]) for name, info in m.modes.items()}
    if "unet/cross_kv" in m.components:
        out["cross_kv"] = m.path_of("unet/cross_kv")
    return out
