"""The device's side of one request, from prompt to image.

    prepare():  prompt -> oblivious candidates -> StepsRequest bytes (for the cloud)
    finish():   handoff bytes -> keep our own latent + solver state -> T-k device
                steps conditioned on the prompt as typed -> VAE decode
    generate(): both, with the cloud reached through a bytes-in/bytes-out callable
                (in-process today, HTTP in a client later).

The prompt as typed, the index of the real candidate and the image never
leave this module. Everything sent is built from the candidate set and from
options fixed before the real value is looked at.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from obclip.runtime.denoise import denoise
from obclip.runtime.errors import InputError
from obclip.runtime.noise import initial_noise
from obclip.runtime.plan import AccelerationConfig, StepPlan, make_plan
from obclip.runtime.protocol import Handoff, HandoffError, StepsRequest, decode_handoff
from obclip.runtime.solver import (
    DPM_SOLVER,
    LCMConfig,
    Schedule,
    SolverConfig,
    SolverState,
    initial_state,
    make_schedule,
    solver_config,
)

from .engines import DeviceEngines
from .oblivious import CandidateSet, NegativeCheck, ObliviousTransform, TransformConfig, check_negative
from .oblivious.negative import refusal
from .verify import config_for as verify_config_for
from .verify import verify_answer

CloudTransport = Callable[[bytes], "bytes | Handoff"]
"""Request bytes -> the handoff: its bytes (e.g. ``CloudStepRunner.handle`` in-process), or a
``Handoff`` the transport already validated against the request (``ServiceClient``)."""


class Method(str, Enum):
    """The paper's method and its baselines, all run by the same code."""

    OBCLIP = "obclip"            # N candidates, cloud k steps, device T-k steps (private)
    VANILLA_OG = "vanilla-og"    # N candidates, all T steps in the cloud (private, N full runs)
    HYBRID_SD = "hybrid-sd"      # the prompt as typed, cloud k steps (NOT private)
    CLOUD_ONLY = "cloud-only"    # the prompt as typed, all T steps in the cloud (NOT private)
    DEVICE_ONLY = "device-only"  # no request at all, T device steps (private)

    @property
    def private(self) -> bool:
        return self in (Method.OBCLIP, Method.VANILLA_OG, Method.DEVICE_ONLY)


@dataclass(frozen=True)
class GenerationConfig:
    method: Method = Method.OBCLIP
    num_inference_steps: int = 25            # T
    switch_step: int | None = None           # k, for obclip and hybrid-sd (None: the acceleration's k, else 10)
    guidance_scale: float = 7.5
    height: int | None = None                # None: the model's default size
    width: int | None = None
    seed: int | None = None                  # None: a fresh random seed per request
    wire_dtype: str = "float32"              # "float16" halves the handoff
    transform: TransformConfig = field(default_factory=TransformConfig)
    # Server-side accelerations the cloud should use: runtime.plan.preset("paper-k10") or
    # another AccelerationConfig; None: every cloud step a full pass.
    acceleration: AccelerationConfig | None = None
    solver: str = DPM_SOLVER                 # runtime.solver's DPM_SOLVER or LCM, on both sides
    device_timestep_shift: int = 0           # dt: the device UNet sees t + dt on its steps
    # The text of the unconditional rows on both sides ("": the empty prompt). Sent only when the
    # device vouches for every word of it (oblivious/negative.py), else the transform's policy applies.
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", Method(self.method))
        if not isinstance(self.negative_prompt, str) or (self.negative_prompt and not self.negative_prompt.strip()):
            raise InputError(f"negative_prompt={self.negative_prompt!r} must be text, or \"\" for none")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise InputError(f"num_inference_steps={self.num_inference_steps!r} must be an integer >= 1")
        acc = self.acceleration
        if acc is not None and not isinstance(acc, AccelerationConfig):
            raise InputError(f"acceleration must be an AccelerationConfig (e.g. preset('paper-k10')), got {acc!r}")
        if acc is not None:
            if self.method is Method.DEVICE_ONLY:
                raise InputError("a device-only run sends nothing to the cloud; drop the acceleration")
            if acc.switch_step != self.k:
                raise InputError(f"the acceleration is for k={acc.switch_step} cloud steps but method "
                                 f"{self.method.value} runs k={self.k}; choose one for k={self.k}")
        if self.method in (Method.OBCLIP, Method.HYBRID_SD) and not 0 <= self.k <= self.num_inference_steps:
            raise InputError(f"switch_step k={self.k} must be in 0..T={self.num_inference_steps}")
        if self.device_timestep_shift and self.k == 0:
            raise InputError(f"device_timestep_shift dt={self.device_timestep_shift} shifts the device's steps after "
                             "the cloud's, and this run has no cloud steps; leave dt at 0")
        self.plan()   # checks the solver and the device timestep shift

    @property
    def k(self) -> int:
        """Steps the cloud runs for this method."""
        if self.method in (Method.CLOUD_ONLY, Method.VANILLA_OG):
            return self.num_inference_steps
        if self.method is Method.DEVICE_ONLY:
            return 0
        if self.switch_step is not None:
            return self.switch_step
        return self.acceleration.switch_step if self.acceleration is not None else 10

    def plan(self, k: int | None = None) -> StepPlan:
        """The T-step plan of this method: which steps the cloud runs (``k``, default this method's;
        0 when nothing was sent), the solver, the device's shift. The shift dt bridges the switch
        from the cloud's UNet to the device's, so a run with no cloud steps has none."""
        k = self.k if k is None else k
        return make_plan(self.num_inference_steps, k, solver=self.solver,
                         device_timestep_shift=self.device_timestep_shift if k > 0 else 0)


@dataclass(frozen=True)
class PreparedRequest:
    """Everything decided before the cloud is asked. Device-only fields are marked."""

    prompt: str                               # DEVICE ONLY: as typed
    real_index: int                           # DEVICE ONLY
    candidate_set: CandidateSet | None        # None for non-private methods and device-only
    request: StepsRequest | None              # None when k == 0: nothing is sent
    seed: int
    height: int
    width: int
    # DEVICE ONLY: whether the negative prompt may be sent (None: none given, or a method that is not private)
    negative_check: NegativeCheck | None = None

    @property
    def request_bytes(self) -> bytes | None:
        return None if self.request is None else self.request.to_bytes()


@dataclass
class GenerationResult:
    image: np.ndarray                         # [H, W, 3] uint8
    latent: np.ndarray                        # [1, C, h, w] final latent
    prepared: PreparedRequest
    timings: dict[str, float]                 # seconds: cloud, device_steps, decode
    bytes_sent: int
    bytes_received: int

    def save_png(self, path: str | os.PathLike[str]) -> None:
        from PIL import Image

        Image.fromarray(self.image).save(path, format="PNG")


def _members(handoff: Handoff, indices: list[int]) -> tuple[np.ndarray, SolverState]:
    """The latents and solver state of the given members of a verified handoff, to resume from."""
    return handoff.latents[indices], SolverState(step_index=handoff.step_index,
                                                 lower_order_nums=handoff.lower_order_nums,
                                                 prev_x0=handoff.prev_x0[indices])


class DevicePipeline:
    def __init__(self, engines: DeviceEngines):
        self.engines = engines
        # DPM-Solver++'s config (the default solver); solver(kind) gives any solver's.
        self.solver_config = SolverConfig.from_scheduler_config(engines.manifest.scheduler_config)
        self._transforms: dict[TransformConfig, ObliviousTransform] = {}
        self.verify_config = verify_config_for(engines.manifest)  # checks on every cloud answer

    def solver(self, kind: str) -> SolverConfig | LCMConfig:
        """The config of solver ``kind`` for the device model's scheduler config."""
        return solver_config(kind, self.engines.manifest.scheduler_config)

    def schedule(self, config: GenerationConfig) -> Schedule:
        """The T-step schedule of the config's solver (the cloud's must be the same)."""
        return make_schedule(self.solver(config.solver), config.num_inference_steps)

    def _transform(self, config: TransformConfig) -> ObliviousTransform:
        # The model's own schema (from its manifest) unless the caller names one.
        if config.schema_path is None and self.engines.manifest.schema is not None:
            config = dataclasses.replace(config, schema_path=self.engines.manifest.schema)
        if config not in self._transforms:
            self._transforms[config] = ObliviousTransform(config)
        return self._transforms[config]

    def prepare(self, prompt: str, config: GenerationConfig) -> PreparedRequest:
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty; type what the image should show")
        size = self.engines.manifest.default_image_size
        height, width = config.height or size, config.width or size
        self.engines.latent_shape(height, width)  # validates the size before anything is sent
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        tokenizer = self.engines.tokenizer
        k = config.k
        # The schedule and the shifted device timesteps are checked before anything is sent.
        schedule = self.schedule(config)
        for step in config.plan().device_steps:
            schedule.model_timestep(step.index, step.timestep_shift)

        # The negative prompt is one text for every candidate: its length tells nothing of which is real.
        negative = config.negative_prompt
        if negative:
            tokenizer.check_fits([negative], what="the negative prompt")
        candidate_set, negative_check, sent_negative = None, None, ""
        if config.method in (Method.OBCLIP, Method.VANILLA_OG):
            transform = self._transform(config.transform)
            candidate_set = transform(prompt)
            candidates, real_index = candidate_set.candidates, candidate_set.real_index
            if negative:
                # The prompt's policy, decided on the negative prompt's words alone (never on the real value).
                negative_check = check_negative(negative, transform)
                if not negative_check.vouched and config.transform.unprotected == "refuse":
                    raise refusal(negative_check)
                sent_negative = negative_check.sendable or ""
            if candidate_set.device_only or (negative_check is not None and not negative_check.vouched):
                # A word the device cannot vouch for: nothing is sent, the device runs all T steps.
                k, real_index = 0, 0
            else:
                # Refusals are decided on the whole candidate set, never on the real one alone.
                tokenizer.check_fits(list(candidates), what="a candidate prompt")
                if sent_negative:
                    tokenizer.check_fits([sent_negative], what="the negative prompt")
        else:
            candidates, real_index = (prompt,), 0
            if not config.method.private:
                tokenizer.check_fits([prompt])  # sent as typed: it must fit the cloud's encoder
                sent_negative = negative        # NOT private: the negative prompt goes as typed too
        # The prompt as typed is checked only through its candidate set (refusing on its own length
        # would depend on the real wording); the device's own encoding truncates it like SD does.

        request = None
        if k > 0:
            request = StepsRequest(candidates=candidates, seed=seed, num_inference_steps=config.num_inference_steps,
                                   switch_step=k, guidance_scale=float(config.guidance_scale),
                                   height=height, width=width, wire_dtype=config.wire_dtype,
                                   acceleration=config.acceleration, solver=config.solver,
                                   device_timestep_shift=config.device_timestep_shift,
                                   negative_prompt=sent_negative)
        return PreparedRequest(prompt=prompt, real_index=real_index, candidate_set=candidate_set,
                               request=request, seed=seed, height=height, width=width,
                               negative_check=negative_check)

    def finish(self, prepared: PreparedRequest, answer: bytes | Handoff | None, config: GenerationConfig,
               on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Resume from the cloud's handoff (or from z_T when k = 0); return the final latent."""
        engines = self.engines
        latent_shape = engines.latent_shape(prepared.height, prepared.width)
        schedule = self.schedule(config)

        if prepared.request is None:
            x = initial_noise(prepared.seed, (1, *latent_shape))
            state = initial_state()
        else:
            if answer is None:
                raise InputError("this request ran cloud steps, so finish() needs the cloud's handoff")
            handoff = self._handoff(answer, prepared.request, latent_shape, schedule)
            x, state = _members(handoff, [prepared.real_index])
        # Nothing sent (k = 0 or a device-only outcome): the device runs every step.
        k = 0 if prepared.request is None else prepared.request.switch_step
        return self._device_steps(x, state, [prepared.prompt], schedule, config, k, prepared.seed, on_step)

    def finish_candidates(self, prepared: PreparedRequest, answer: bytes | Handoff, config: GenerationConfig,
                          indices: list[int]) -> np.ndarray:
        """Final latents [len(indices), C, h, w]: the given candidates of one answered request, each
        finished as if it were the real one (conditioned on its own text), in one batch.

        For evaluation only (benchmarks/quality.py scores every candidate, as the server could if it
        finished them all); a generation never calls it. Row for row the same steps as finish().
        """
        if prepared.request is None or prepared.candidate_set is None:
            raise InputError("finish_candidates needs an ObCLIP request that ran cloud steps")
        cands = prepared.candidate_set.candidates
        bad = [i for i in indices if not 0 <= i < len(cands)]
        if bad or not indices:
            raise InputError(f"candidate indices {bad or indices} out of range 0..{len(cands) - 1}")
        latent_shape = self.engines.latent_shape(prepared.height, prepared.width)
        schedule = self.schedule(config)
        handoff = self._handoff(answer, prepared.request, latent_shape, schedule)
        x, state = _members(handoff, indices)
        return self._device_steps(x, state, [cands[i] for i in indices], schedule, config,
                                  prepared.request.switch_step, prepared.seed)

    def _device_steps(self, x: np.ndarray, state: SolverState, prompts: list[str], schedule: Schedule,
                      config: GenerationConfig, k: int, seed: int,
                      on_step: Callable[[int, int], None] | None = None) -> np.ndarray:
        """The device steps after the cloud's k on rows x (one per prompt), classifier-free guided
        (runtime.denoise)."""
        engines = self.engines
        plan = config.plan(k)
        if not plan.device_steps:
            return x
        # The device conditions its own steps on the prompt and the negative prompt exactly as typed.
        # SDXL family: the size conditioning is the image size's, which the latents give exactly.
        f = engines.manifest.vae_scale_factor
        text, added = engines.condition([config.negative_prompt, *(self._fit(p) for p in prompts)],
                                        x.shape[-2] * f, x.shape[-1] * f, config.guidance_scale)
        return denoise(engines.unet, text, x, state, schedule, self.solver(config.solver),
                       [step.index for step in plan.device_steps], config.guidance_scale, on_step,
                       seed=seed, timestep_shift=plan.device_timestep_shift, added=added)

    def _fit(self, prompt: str) -> str:
        """The longest prefix of the prompt (whole words) within the text encoder's context:
        what SD's own tokenizer keeps when it truncates. Only the device's encoding uses it."""
        tokenizer = self.engines.tokenizer
        if tokenizer.count(prompt) <= tokenizer.max_length:
            return prompt
        words = prompt.split(" ")
        lo, hi = 0, len(words)  # the first lo words fit, the first hi do not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if tokenizer.count(" ".join(words[:mid])) <= tokenizer.max_length else (lo, mid)
        return " ".join(words[:lo])

    def _handoff(self, answer: bytes | Handoff, request: StepsRequest, latent_shape: tuple[int, int, int],
                 schedule: Schedule) -> Handoff:
        """Bytes are decoded and validated here; a Handoff the transport decoded is checked only
        for what the transport could not know: that it answers this request at this latent shape
        on the device's own timestep schedule. Either way every member's latent and solver state
        is then verified (device/verify.py) before the device reads its own: a failure refuses the
        whole answer, identically whichever member is real, and is never retried."""
        handoff = DevicePipeline._decoded(answer, request, latent_shape, schedule.timesteps)
        verify_answer(handoff, schedule, request.switch_step, self.verify_config, request.guidance_scale)
        return handoff

    @staticmethod
    def _decoded(answer: bytes | Handoff, request: StepsRequest, latent_shape: tuple[int, int, int],
                 timesteps: np.ndarray) -> Handoff:
        if isinstance(answer, (bytes, bytearray, memoryview)):
            return decode_handoff(bytes(answer), request, latent_shape, timesteps)
        if not isinstance(answer, Handoff):
            raise TypeError(f"the cloud transport returned {type(answer).__name__}; expected bytes or a Handoff")
        if answer.request_sha256 != request.sha256():
            raise HandoffError("handoff answers a different request (request_sha256 mismatch)")
        want = (request.n, *latent_shape)
        if answer.latents.shape != want or answer.prev_x0.shape != want:
            raise HandoffError(f"handoff latents have shape {list(answer.latents.shape)}, expected {list(want)}")
        if tuple(int(t) for t in timesteps) != answer.timesteps:
            raise HandoffError(f"the cloud's timestep schedule {list(answer.timesteps)} differs from the "
                                f"device's {[int(t) for t in timesteps]}: their scheduler configs disagree")
        return answer

    def generate(self, prompt: str, cloud: CloudTransport | None, config: GenerationConfig = GenerationConfig(),
                 on_step: Callable[[int, int], None] | None = None) -> GenerationResult:
        prepared = self.prepare(prompt, config)
        timings = {"cloud": 0.0}
        answer: bytes | Handoff | None = None
        if prepared.request is not None:
            if cloud is None:
                raise InputError(f"method {config.method.value} with k={config.k} needs a cloud to send the request to")
            t0 = time.perf_counter()
            answer = cloud(prepared.request.to_bytes())
            timings["cloud"] = time.perf_counter() - t0
        received = 0 if answer is None else answer.wire_size if isinstance(answer, Handoff) else len(answer)
        t0 = time.perf_counter()
        latent = self.finish(prepared, answer, config, on_step)
        timings["device_steps"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        image = self.engines.decode(latent)[0]
        timings["decode"] = time.perf_counter() - t0
        return GenerationResult(
            image=image, latent=latent, prepared=prepared, timings=timings,
            bytes_sent=len(prepared.request_bytes or b""), bytes_received=received,
        )



def describe_sent(result: GenerationResult, config: GenerationConfig) -> list[str]:
    """Lines saying what the server received, for the CLIs (demo and client)."""
    req = result.prepared.request
    cset = result.prepared.candidate_set
    negative = result.prepared.negative_check
    if req is None and cset is not None and cset.device_only:
        return [f"the server received nothing: {cset.message}"]
    if req is None and negative is not None and not negative.vouched:
        return [f"the server received nothing; the image is generated on the device alone: {negative.reason}"]
    if req is None:
        return ["the server received nothing (device-only run)"]
    lines = [f"the server received {req.n} candidate(s):"] + [f"  - {c}" for c in req.candidates]
    if req.negative_prompt:
        lines.append(f"  and the negative prompt, the same for every candidate: {req.negative_prompt}")
    if cset is not None and not cset.protected:
        lines.append(f"  note: {cset.message}")
    if cset is not None:  # --unprotected unsafe-send: words the device could not vouch for, sent as typed
        lines += [f"  WARNING: {w}" for w in cset.warnings]
    if not config.method.private:
        lines.append(f"  (method {config.method.value} is NOT private: the server saw the prompt as typed)")
    return lines
