"""The torch engine: step modes run by ``step_modes.run_mode`` on a loaded model, diffusers' DPM-Solver++
(LCM: the runtime's numpy solver on the torch rows, since diffusers' LCMScheduler draws its injected
noise from torch's generator, and ObCLIP's must be the request's shared numpy noise).

With ``compile_mode`` set (``obclip-serve --compile``), each step mode is wrapped once in
``torch.compile``; torch keeps one compiled graph per input shape (N, image size, batch
composition), and with ``"reduce-overhead"`` on CUDA each is replayed as a CUDA graph, so a
small batch is no longer bound by kernel launches. The first request of each mode and shape
compiles (the service's ``compile_warmup`` does that before serving).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler

from obclip.runtime.errors import InputError
from obclip.runtime.solver import DPM_SOLVER, LCM, make_schedule, solver_config

from .models import TextToLatentModel
from .modes import ModeSpec, TextTokens, TokenAlignment, text_tokens
from .numpy_solver import NumpySolver
from .step_modes import AlignmentTensors, ModeInputs, processors_installed, run_mode

# Compiled graphs per engine (modes x shapes) before torch falls back to running eagerly.
COMPILED_GRAPHS_LIMIT = 512
# torch.compile's backend when compiling (inductor: generated kernels, CUDA graphs under "reduce-overhead").
COMPILE_BACKEND = "inductor"


def make_scheduler(model: TextToLatentModel, num_inference_steps: int,
                   kind: str = DPM_SOLVER) -> DPMSolverMultistepScheduler | LCMScheduler:
    """diffusers' scheduler of solver ``kind`` (DPM-Solver++ or LCM) for the model's scheduler config,
    checked against the runtime's numpy schedule so the two sides cannot drift apart."""
    ours = make_schedule(solver_config(kind, model.scheduler_config), num_inference_steps)
    scheduler_class = LCMScheduler if kind == LCM else DPMSolverMultistepScheduler
    scheduler = scheduler_class.from_config(model.scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device="cpu")
    if not np.array_equal(scheduler.timesteps.numpy().astype(np.int64), ours.timesteps):
        raise InputError("diffusers and runtime.solver disagree on the timestep schedule for "
                         f"{model.scheduler_config}; use a model whose scheduler runtime/solver.py "
                         "reproduces, or extend runtime/solver.py")
    return scheduler


@torch.no_grad()
def guided_eps(unet: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor,
               guidance_scale: float) -> torch.Tensor:
    """One plain classifier-free-guided UNet evaluation (diffusers' own forward) for a batch of latents.

    Rows are [unconditional x N, conditional x N]. The reference hybrid run uses it.
    """
    latent_in = torch.cat([x, x])
    eps = unet(latent_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_uncond, eps_cond = eps.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


class TorchSolver:
    def __init__(self, scheduler: DPMSolverMultistepScheduler):
        if "sde" in str(scheduler.config.get("algorithm_type", "")):
            raise InputError("the cloud steps need a deterministic DPM-Solver++ (algorithm_type dpmsolver++)")
        self.scheduler = scheduler
        self.timesteps = tuple(int(t) for t in scheduler.timesteps)

    def timestep(self, index: int) -> torch.Tensor:
        return self.scheduler.timesteps[index]

    def step(self, eps: torch.Tensor, x: torch.Tensor, noise: np.ndarray | None = None) -> torch.Tensor:
        if noise is not None:
            raise InputError("DPM-Solver++ injects no noise")
        t = self.scheduler.timesteps[self.scheduler.step_index or 0]
        return self.scheduler.step(eps, t, x).prev_sample

    def state(self) -> tuple[np.ndarray, int, int]:
        s = self.scheduler
        return s.model_outputs[-1].float().cpu().numpy(), int(s.lower_order_nums), int(s.step_index)


class TorchNumpySolver:
    """runtime.solver's update (``NumpySolver``) on torch rows: for LCM, whose injected noise must be
    the request's shared numpy noise. Timesteps from diffusers' scheduler (checked equal to ours)."""

    def __init__(self, scheduler: LCMScheduler, solver: NumpySolver):
        self.scheduler, self.solver = scheduler, solver
        self.timesteps = solver.timesteps

    def timestep(self, index: int) -> torch.Tensor:
        return self.scheduler.timesteps[index]

    def step(self, eps: torch.Tensor, x: torch.Tensor, noise: np.ndarray | None) -> torch.Tensor:
        out = self.solver.step(eps.float().cpu().numpy(), x.float().cpu().numpy(), noise)
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype)

    def state(self) -> tuple[np.ndarray, int, int]:
        return self.solver.state()


class TorchBatch:
    def __init__(self, engine: TorchEngine, candidates: Sequence[Sequence[str]],
                 alignments: Sequence[TokenAlignment | None], guidance_scale: float,
                 negative_prompts: Sequence[str]):
        self.engine, self.candidates, self.guidance_scale = engine, candidates, float(guidance_scale)
        self.alignments, self.negative_prompts = alignments, list(negative_prompts)
        self._installed: Any = None

    def __enter__(self) -> TorchBatch:
        model = self.engine.model
        # A compiled graph would specialise on a Python float: the scale goes in as a tensor there.
        self.guidance: float | torch.Tensor = (
            self.guidance_scale if self.engine.compile_mode is None
            else torch.tensor([self.guidance_scale], device=model.unet.device, dtype=model.unet.dtype))
        # One text-encoder call for every request: [cands of request 0, ..., cands of request R-1, then
        # each distinct negative prompt ("" when none)], reordered to [negative, cands] per request.
        self.sizes = tuple(len(c) for c in self.candidates)
        negatives = list(dict.fromkeys(self.negative_prompts))
        texts = [c for cands in self.candidates for c in cands]
        first_negative = len(texts)
        texts += negatives
        with torch.no_grad():
            emb, from_text = model.encode_texts(texts)
        order, o = [], 0
        for n, negative in zip(self.sizes, self.negative_prompts):
            order += [first_negative + negatives.index(negative), *range(o, o + n)]
            o += n
        self.text = emb[order]
        self.texts = [texts[i] for i in order]
        self.from_text = {name: value[order] for name, value in from_text.items()}
        self.added: dict[str, torch.Tensor] = {}
        self.alignment = tuple(None if al is None else AlignmentTensors.partitioned(al, emb.device)
                               for al in self.alignments)
        self._installed = processors_installed(model.unet)
        self._installed.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        installed, self._installed = self._installed, None
        if installed is not None:
            installed.__exit__(*exc)

    def latents(self, z: np.ndarray) -> torch.Tensor:
        model = self.engine.model
        # The size conditioning (SDXL's time_ids) is the image size's, which the latents give exactly.
        f = model.vae_scale_factor
        self.added = model.added_inputs(self.texts, self.from_text, z.shape[-2] * f, z.shape[-1] * f,
                                        self.guidance_scale)
        return torch.from_numpy(z).to(device=model.unet.device, dtype=model.unet.dtype)

    @torch.no_grad()
    def run(self, spec: ModeSpec, x: torch.Tensor, t: Any,
            caches: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs = ModeInputs(x=x, timestep=t, text=self.text, guidance_scale=self.guidance,
                            sizes=self.sizes, alignment=self.alignment, added=self.added)
        return self.engine.run_mode(spec, inputs, caches)

    def numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.float().cpu().numpy()


class TorchEngine:
    """A loaded ``TextToLatentModel`` as a step engine."""

    def __init__(self, model: TextToLatentModel, compile_mode: str | None = None, compile_backend: str | None = None):
        self.model = model
        self.model_id = model.model_id
        self.scheduler_config = model.scheduler_config
        self.compile_mode, self.compile_backend = compile_mode, compile_backend or COMPILE_BACKEND
        self._compiled: dict[ModeSpec, Callable[..., Any]] = {}
        if compile_mode is not None:
            # Every mode compiles run_mode's one code object, and torch counts its graphs per code
            # object (8 by default, then it runs eagerly): allow one per mode and shape a service meets.
            import torch._dynamo.config as dynamo

            dynamo.recompile_limit = max(dynamo.recompile_limit, COMPILED_GRAPHS_LIMIT)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, COMPILED_GRAPHS_LIMIT)

    def run_mode(self, spec: ModeSpec, inputs: ModeInputs,
                 caches: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``step_modes.run_mode`` on this model: eager, or the mode's compiled graph."""
        if self.compile_mode is None:
            return run_mode(self.model.unet, spec, inputs, caches)
        fn = self._compiled.get(spec)
        if fn is None:
            fn = torch.compile(functools.partial(run_mode, self.model.unet, spec), mode=self.compile_mode,
                               backend=self.compile_backend)
            self._compiled[spec] = fn
        torch.compiler.cudagraph_mark_step_begin()
        eps, writes = fn(inputs, caches)
        # A CUDA graph's outputs live in its memory pool and are overwritten by its next replay, while
        # the caches are read steps later (and eps after the next mode ran): they are copied out.
        return eps.clone(), {name: value.clone() for name, value in writes.items()}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.model.latent_shape(height, width)

    def text_tokens(self, texts: Sequence[str]) -> list[TextTokens]:
        tok = self.model.tokenizer
        return text_tokens(tok.backend_tokenizer, texts, tok.model_max_length, tok.pad_token_id)

    def batch(self, candidates: Sequence[Sequence[str]], alignments: Sequence[TokenAlignment | None],
              guidance_scale: float, negative_prompts: Sequence[str]) -> TorchBatch:
        if any(negative_prompts) and not self.model.conditioning.guided:
            raise InputError(f"{self.model_id} takes the guidance scale as an embedding (LCM) and runs no "
                             "unconditional rows, so a negative prompt would change nothing; leave it out")
        return TorchBatch(self, candidates, alignments, guidance_scale, negative_prompts)

    def solver(self, num_inference_steps: int, kind: str = DPM_SOLVER) -> TorchSolver | TorchNumpySolver:
        scheduler = make_scheduler(self.model, num_inference_steps, kind)
        if kind == LCM:
            return TorchNumpySolver(scheduler, NumpySolver(self.scheduler_config, num_inference_steps, kind))
        return TorchSolver(scheduler)
