"""The onnxruntime engine: the exported step-mode graphs served without torch.

    obclip-serve --backend onnxruntime --engines OUT/cloud [--providers cuda]
    obclip-serve --backend onnxruntime --engines OUT/cloud-fp16 --providers cuda   # float16 graphs

Everything comes from the engines folder (``export/cloud_engines.py``): the
text encoder graph(s) and tokenizer(s), one graph per step mode, and the shared
UNet weights, which are read once (memory-mapped) and handed to every mode
session (``SessionOptions.add_initializer``), so N mode graphs cost one copy
of the weights. The solver is ``runtime/solver.py`` (numpy DPM-Solver++ or LCM) and
the noise ``runtime/noise.py``; the step loop is ``cloud/steps.py``'s, the
same as for torch. The manifest is verified at start (hashes, paths, fields,
export version) and a folder that does not match is refused, never rebuilt.
An fp16 folder (``export/cloud_fp16.py``) is served the same way: same layout,
float32 inputs and outputs, its one weights file holding float16 tensors (on
the CPU provider, which has few float16 kernels, onnxruntime inserts casts).

An SDXL-family folder (the manifest's ``conditioning``) has both text encoders; their hidden states and
pooled ``text_embeds`` come from ``runtime.graphs.TextConditioning`` and the size conditioning
(``time_ids``; LCM-SDXL's ``timestep_cond``) from ``runtime.conditioning``, the code the device runs,
fed to every mode graph one row per text like the hidden states.

A batch of several requests runs each request's rows through the graphs in
turn (the graphs are traced for one request with a dynamic N); its caches are
kept per request under ``r<i>/<name>``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from obclip.runtime.errors import ArtifactError, InputError
from obclip.runtime.graphs import open_text_conditioning
from obclip.runtime.manifest import EXPORT_VERSION, Manifest, ManifestError, ManifestMismatchError
from obclip.runtime.sessions import SessionConfig, ort, resolve_providers
from obclip.runtime.solver import DPM_SOLVER
from obclip.runtime.tokenizer import ClipTokenizer
from obclip.runtime.weights import SharedWeights

from .modes import ALIGN_INPUTS, ModeSpec, TextTokens, TokenAlignment, text_tokens
from .numpy_solver import NumpySolver
from .service_config import DEFAULT_MEMORY


def session_config(providers: str = "cpu", threads: int | None = None, optimization: str = "extended",
                   memory: str = DEFAULT_MEMORY) -> SessionConfig:
    """How the cloud's sessions are opened (``memory``: one of runtime/memory.MEMORY_MODES, which says
    what each is; benchmarks/engine_memory.py --compare measures each, docs/engines.md has the
    numbers). The step modes share one mapped copy of the UNet weights."""
    return SessionConfig.for_memory(memory, providers=resolve_providers(providers), threads=threads,
                                    optimization=optimization, shared_weights=True)


class OrtBatch:
    def __init__(self, engine: OrtEngine, candidates: Sequence[Sequence[str]],
                 alignments: Sequence[TokenAlignment | None], guidance_scale: float,
                 negative_prompts: Sequence[str]):
        self.engine = engine
        self.sizes = [len(c) for c in candidates]
        self.guidance_scale = float(guidance_scale)
        # Each request's text rows: [its negative prompt ("" when none), its candidates].
        texts = [[negative, *c] for negative, c in zip(negative_prompts, candidates)]
        emb, from_text = engine.text([t for group in texts for t in group])
        self.texts: list[np.ndarray] = []
        self.from_text: list[dict[str, np.ndarray]] = []   # SDXL family: text_embeds, one row per text
        o = 0
        for n in self.sizes:
            self.texts.append(emb[o:o + n + 1])
            self.from_text.append({k: v[o:o + n + 1] for k, v in from_text.items()})
            o += n + 1
        # Every added input per request (``latents`` adds those of the image size); SD: none.
        self.added: list[dict[str, np.ndarray]] = [dict(t) for t in self.from_text]
        self.alignments: list[dict[str, np.ndarray]] = []
        for al, n in zip(alignments, self.sizes):
            if al is None:  # every candidate reads the pivot's map as it is
                starts = np.tile(np.arange(engine.manifest.text_max_length, dtype=np.int64), (n, 1))
                tables = (starts, starts + 1, np.ones(starts.shape, np.float32))
            else:
                tables = (np.asarray(al.starts, np.int64), np.asarray(al.stops, np.int64),
                          np.asarray(al.weights, np.float32))
            self.alignments.append(dict(zip(ALIGN_INPUTS, tables)))
        self.guidance = np.array([guidance_scale], np.float32)

    def __enter__(self) -> OrtBatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def latents(self, z: np.ndarray) -> np.ndarray:
        # The size conditioning (SDXL's time_ids) is the image size's, which the latents give exactly
        # (runtime.conditioning, the function the device and the torch backend call).
        f = self.engine.vae_scale_factor
        cond = self.engine.conditioning
        self.added = [{**t, **cond.request_added(n + 1, z.shape[-2] * f, z.shape[-1] * f, self.guidance_scale)}
                      for t, n in zip(self.from_text, self.sizes)]
        return np.ascontiguousarray(z, dtype=np.float32)

    def numpy(self, x: np.ndarray) -> np.ndarray:
        return x

    def run(self, spec: ModeSpec, x: np.ndarray, t: Any,
            caches: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        return self.run_graph(self.engine.mode(spec), spec.name, x, t, caches)

    def run_graph(self, graph: _Graph, name: str, x: np.ndarray, t: Any,
                  caches: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """One call of step mode ``name``'s graph on every request of the batch."""
        engine = self.engine
        eps = np.empty_like(x)
        writes: dict[str, Any] = {}
        wanted = engine.inputs_of(graph.session)
        o = 0
        for r, n in enumerate(self.sizes):
            prefix = f"r{r}/"
            feeds: dict[str, np.ndarray] = {
                "sample": x[o:o + n], "timestep": np.array([t], np.float32), "text": self.texts[r],
                "guidance_scale": self.guidance, **self.alignments[r], **self.added[r]}
            if any(read.startswith("kv/") and prefix + read not in caches for read in graph.reads):
                # cross_kv_once: the texts' K/V once per request, kept with the other caches.
                kv = engine.cross_kv(self.texts[r])
                writes.update({prefix + k: v for k, v in kv.items()})
            for read in graph.reads:
                value = caches.get(prefix + read, writes.get(prefix + read))
                if value is None:
                    raise ArtifactError(f"step mode {name} reads {read}, but no earlier step of this request "
                                        "computed it: the engines' mode table does not match the plan; re-export")
                feeds[read] = value
            outs = graph.session.run(None, {k: v for k, v in feeds.items() if k in wanted}, engine.run_options)
            names = [o_.name for o_ in graph.session.get_outputs()]
            eps[o:o + n] = outs[names.index("eps")]
            for out_name, value in zip(names, outs):
                if out_name != "eps":
                    writes[prefix + out_name] = value
            o += n
        return eps, writes


class _Graph:
    def __init__(self, session: ort.InferenceSession, reads: Sequence[str], writes: Sequence[str]):
        self.session, self.reads, self.writes = session, tuple(reads), tuple(writes)


class OrtEngine:
    """An exported cloud engines folder as a step engine (torch-free)."""

    def __init__(self, engines: str | Path, providers: str = "cpu", threads: int | None = None,
                 model_id: str | None = None, optimization: str = "extended", memory: str = DEFAULT_MEMORY):
        folder = Path(engines)
        manifest = Manifest.load(folder)   # fields, paths and every file's hash
        src = manifest.source or {}
        if manifest.side != "cloud":
            raise ManifestMismatchError(f"{folder} holds {manifest.side} engines; --engines needs the cloud "
                                        "folder (OUT/cloud from python export/build_engines.py --cloud-model ...)")
        if src.get("export_version") != EXPORT_VERSION:
            raise ManifestMismatchError(f"{folder} was exported by export version {src.get('export_version')!r}, "
                                        f"this runtime needs {EXPORT_VERSION}; re-export the cloud engines")
        if model_id is not None and manifest.model_id != model_id:
            raise ManifestMismatchError(f"{folder} was exported from {manifest.model_id!r}, not {model_id!r}; "
                                        "re-export for this model")
        if not manifest.modes:
            raise ManifestMismatchError(f"{folder}/manifest.json lists no step modes; re-export the cloud engines")
        self.manifest = manifest
        self.model_id = manifest.model_id
        self.scheduler_config = manifest.scheduler_config
        self.text_max_length = manifest.text_max_length
        self.vae_scale_factor = manifest.vae_scale_factor
        self.default_image_size = manifest.default_image_size
        self.latent_multiple = int(src.get("latent_multiple", 1))
        config = session_config(providers, threads, optimization, memory)
        self.providers, self.memory, self.optimization = config.providers, memory, optimization
        self.run_options = config.run_options()   # every mode and cross_kv run passes these
        self.tokenizer_json = (folder / manifest.tokenizer).read_text()
        self.tokenizer = ClipTokenizer(folder / manifest.tokenizer, manifest.text_max_length, manifest.pad_token_id,
                                       json=self.tokenizer_json)
        # The UNet's family (SDXL: two text encoders, pooled text and size conditioning as added inputs).
        self.conditioning = manifest.unet_conditioning()
        # The text encoder(s) run once per request: onnxruntime's default graph optimisations.
        text_config = replace(config, optimization=None, prepacking=True)
        self.text = open_text_conditioning(manifest, text_config, self.tokenizer)
        self.text_encoder = self.text.encoders[0]
        self._weights = SharedWeights.from_index(folder / "unet" / "weights.bin", folder / "unet" / "weights.json")
        self._graphs: dict[str, _Graph] = {}
        for name, info in manifest.modes.items():
            session = self._weights.session(manifest.path_of(info["component"]), config)
            self._graphs[name] = _Graph(session, info.get("reads", ()), info.get("writes", ()))
        self._cross_kv = None
        if "unet/cross_kv" in manifest.components:
            self._cross_kv = self._weights.session(manifest.path_of("unet/cross_kv"), config)
        self.geometry = manifest.geometry(source="the exported cloud graphs")
        self._inputs: dict[int, set[str]] = {}
        self.warmed: dict[str, float] = {}   # graph -> seconds of its warm-up call (warm())

    # -- what the step loop and the service ask --------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.geometry.latent_shape(height, width)

    def text_tokens(self, texts: Sequence[str]) -> list[TextTokens]:
        return text_tokens(self.tokenizer.backend, texts, self.text_max_length, self.manifest.pad_token_id)

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """[B, L, D] hidden states of the prompts, the UNet's text conditioning."""
        return self.text(prompts)[0]

    def batch(self, candidates: Sequence[Sequence[str]], alignments: Sequence[TokenAlignment | None],
              guidance_scale: float, negative_prompts: Sequence[str]) -> OrtBatch:
        if any(negative_prompts) and not self.conditioning.guided:
            raise InputError(f"{self.model_id} takes the guidance scale as an embedding (LCM) and runs no "
                             "unconditional rows, so a negative prompt would change nothing; leave it out")
        return OrtBatch(self, candidates, alignments, guidance_scale, negative_prompts)

    def solver(self, num_inference_steps: int, kind: str = DPM_SOLVER) -> NumpySolver:
        return NumpySolver(self.scheduler_config, num_inference_steps, kind)

    # -- warm-up ----------------------------------------------------------------------------------
    def warm(self, candidates: int, height: int, width: int) -> dict[str, float]:
        """One call of every graph (text encoder, cross_kv, each step mode) on dummy inputs of
        ``candidates`` candidates at ``height`` x ``width``, so no request pays a session's first
        run (its allocations and kernel set-up). A mode's cache inputs come from the outputs of modes
        warmed before it, so modes run in the order their reads allow. Outputs are thrown away.
        Returns, and keeps in ``self.warmed``, the seconds each graph took."""
        warmed: dict[str, float] = {}
        t0 = time.perf_counter()
        batch = self.batch([["a photo"] * candidates], [None], 7.5, [""])
        warmed["text_encoder"] = time.perf_counter() - t0
        x = batch.latents(np.zeros((candidates, *self.latent_shape(height, width)), np.float32))
        if self._cross_kv is not None:
            t0 = time.perf_counter()
            caches = {f"r0/{k}": v for k, v in self.cross_kv(batch.texts[0]).items()}
            warmed["unet/cross_kv"] = time.perf_counter() - t0
        else:
            caches = {}
        pending = dict(self._graphs)
        while pending:
            ready = [name for name, g in pending.items()
                     if all(r.startswith("kv/") or f"r0/{r}" in caches for r in g.reads)]
            if not ready:
                raise ArtifactError(f"the cloud engines in {self.manifest.root}: step modes {sorted(pending)} read "
                                    "caches no mode writes; the mode table is inconsistent, re-export")
            for name in ready:
                t0 = time.perf_counter()
                _, writes = batch.run_graph(pending.pop(name), name, x, 999.0, caches)
                warmed[name] = time.perf_counter() - t0
                caches.update(writes)
        self.warmed = warmed
        return warmed

    # -- graphs ------------------------------------------------------------------------------------
    def mode(self, spec: ModeSpec) -> _Graph:
        try:
            return self._graphs[spec.name]
        except KeyError:
            raise ManifestError(f"the cloud engines in {self.manifest.root} have no graph for step mode "
                                f"{spec.name!r} (they have {sorted(self._graphs)}); re-export with "
                                "python export/build_engines.py --cloud-modes all") from None

    def cross_kv(self, text: np.ndarray) -> dict[str, np.ndarray]:
        if self._cross_kv is None:
            raise ManifestError(f"the cloud engines in {self.manifest.root} have no cross_kv graph; re-export")
        names = [o.name for o in self._cross_kv.get_outputs()]
        return dict(zip(names, self._cross_kv.run(names, {"text": text}, self.run_options)))

    def inputs_of(self, session: ort.InferenceSession) -> set[str]:
        key = id(session)
        if key not in self._inputs:
            self._inputs[key] = {i.name for i in session.get_inputs()}
        return self._inputs[key]
