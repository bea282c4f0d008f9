"""Tracing a torch module to ONNX from its graph spec, and checking the file against torch.

The exporter is the classic TorchScript one (``dynamo=False``): the tracer specialises the Python
control flow of a module once, which is what one graph per component (and per step mode) wants,
and keeps the shape arithmetic dynamic along the spec's dynamic axes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from obclip.runtime.conditioning import TEXT_EMBEDS, TIMESTEP_COND
from obclip.runtime.errors import ArtifactError
from obclip.runtime.manifest import Component, sha256_file
from obclip.runtime.sessions import open_session

from .specs import GraphSpec, text_encoder_spec

OPSET = 17


class TextEncoderModule(torch.nn.Module):
    """A CLIP text encoder with optimum's outputs: input_ids -> last_hidden_state, pooler_output (a
    ``CLIPTextModelWithProjection``, SDXL's second encoder: text_embeds) and, with ``penultimate``, the
    second-to-last layer's hidden states (what an SDXL-family UNet is conditioned on)."""

    def __init__(self, text_encoder: Any, penultimate: bool = False):
        super().__init__()
        self.text_encoder, self.penultimate = text_encoder, penultimate

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.text_encoder(input_ids, output_hidden_states=self.penultimate, return_dict=True)
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
        if self.penultimate:
            return out.last_hidden_state, pooled, out.hidden_states[-2]
        return out.last_hidden_state, pooled


def text_encoder_exports(lm: Any) -> list[tuple[TextEncoderModule, GraphSpec]]:
    """The text encoder graph(s) of a ``TextToLatentModel`` with their specs: SD's one, or the SDXL
    family's ``text_encoder`` and ``text_encoder_2`` (projected ``text_embeds``), both with their
    penultimate hidden states. The cloud and the device export the same ones."""
    length = int(lm.tokenizer.model_max_length)
    first = lm.text_encoder.config
    if lm.conditioning.text_encoders == 1:
        return [(TextEncoderModule(lm.text_encoder),
                 text_encoder_spec(length, int(first.hidden_size), int(first.vocab_size)))]
    second = lm.text_encoder_2.config
    return [(TextEncoderModule(lm.text_encoder, penultimate=True),
             text_encoder_spec(length, int(first.hidden_size), int(first.vocab_size), penultimate=True)),
            (TextEncoderModule(lm.text_encoder_2, penultimate=True),
             text_encoder_spec(length, int(second.hidden_size), int(second.vocab_size), name="text_encoder_2",
                               pooled=TEXT_EMBEDS, pooled_dim=int(second.projection_dim), penultimate=True))]


class UNetModule(torch.nn.Module):
    """diffusers' UNet2DConditionModel as a graph: sample, timestep, encoder_hidden_states and the
    family's added inputs (``Conditioning.added_inputs``, in that order) -> out_sample."""

    def __init__(self, unet: Any, added: Sequence[str] = ()):
        super().__init__()
        self.unet, self.added = unet, tuple(added)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *added: torch.Tensor) -> Any:
        given = dict(zip(self.added, added))
        timestep_cond = given.pop(TIMESTEP_COND, None)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                         added_cond_kwargs=given or None, return_dict=False)[0]


class VaeDecoderModule(torch.nn.Module):
    """A VAE's decoder: latent_sample -> sample."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> Any:
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoderModule(torch.nn.Module):
    """A VAE's encoder, as diffusers' ONNX pipelines take it: sample (image in [-1, 1]) -> latent_sample,
    the posterior's mode (deterministic: the pipeline scales it by the VAE's factor itself)."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, sample: torch.Tensor) -> Any:
        return self.vae.encode(sample, return_dict=False)[0].mode()


def to_torch(feeds: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}


def trace(module: torch.nn.Module, spec: GraphSpec, feeds: Mapping[str, torch.Tensor], path: Path) -> float:
    """Write ``module`` traced on ``feeds`` (the spec's inputs, in order) to ``path``; returns seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python branch on a shape; the check against torch is what counts.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(feeds[n] for n in spec.input_names), str(path),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    return time.perf_counter() - t0


def max_rel_diff(got: list[np.ndarray], want: list[np.ndarray]) -> tuple[float, float]:
    """(max |got - want| over all outputs, max(1, max |want|)): the check's difference and its scale."""
    diff = max(float(np.abs(g.astype(np.float64) - w.astype(np.float64)).max()) for g, w in zip(got, want))
    return diff, max(1.0, max(float(np.abs(w).max()) for w in want))


def export_component(module: torch.nn.Module, spec: GraphSpec, folder: Path, sample: Mapping[str, np.ndarray],
                     check: Mapping[str, np.ndarray], tolerance: float, resave: bool = False) -> Component:
    """Trace ``module`` on ``sample`` into ``folder/<spec.name>/model.onnx``, run the file in onnxruntime
    on ``check`` (another batch and size) against torch, and refuse it when they differ by more than
    ``tolerance`` x max(1, |torch|). ``resave``: save the graph again through onnxruntime with no
    optimisation (a large graph's weights in one model.onnx.data instead of the exporter's file per
    tensor), so the file stays the exported graph and every optimiser can still work on it."""
    from .device_variants import optimise_onnx

    path = folder / spec.name / "model.onnx"
    exported = trace(module, spec, to_torch(sample), path)
    if resave:
        optimise_onnx(path, level="disabled")
    session = open_session(path)
    with torch.no_grad():
        want = module(*to_torch(check).values())
    want = want if isinstance(want, tuple) else (want,)
    got = session.run(spec.output_names, dict(check))
    diff, scale = max_rel_diff(got, [w.numpy() for w in want])
    print(f"  {spec.name:13s} exported in {exported:5.1f} s, {path.stat().st_size / 1e6:8.1f} MB, "
          f"onnxruntime vs torch max abs diff {diff:.2e}")
    if not diff <= tolerance * scale:
        raise ArtifactError(f"{spec.name}: ONNX output differs from torch by {diff:.3e} (> {tolerance * scale:.1e}); "
                            "the export is wrong, not saved")
    return Component(path=f"{spec.name}/model.onnx", format="onnx", inputs=tuple(spec.input_names),
                     outputs=tuple(spec.output_names), sha256=sha256_file(path), check_max_abs_diff=diff)
