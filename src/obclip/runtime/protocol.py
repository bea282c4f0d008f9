"""The wire contract between device and cloud (numpy + standard library only).

Everything both sides must agree on lives here and only here: the endpoint
path and media types, the request and handoff formats, the error body, and
the limits a service enforces (``RequestLimits``, violations raise
``LimitExceeded``, which the service answers as a 4xx naming the limit).

Request: canonical JSON (sorted keys, fixed separators, UTF-8), so equal
requests are equal bytes whichever candidate is real.

Response ("handoff"): safetensors bytes holding, per candidate, the latent
after cloud step k and the solver state the device needs to resume exactly
(DPM-Solver++: the last data prediction; LCM needs none, and its last
``denoised`` is sent in the same place, verified like a data prediction but
not read), plus string metadata: format version,
T, k, timesteps, solver counters, guidance, model id, shapes, dtype and the
SHA-256 of the request it answers. ``decode_handoff`` validates all of it
before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import InputError, UntrustedAnswerError
from .options import check_fields, option
from .plan import MAX_TIMESTEP_SHIFT, AccelerationConfig, StepPlan, make_plan
from .solver import DPM_SOLVER, LCM, SOLVER_KINDS

STEPS_PATH = "/v1/steps"                        # POST: request bytes in, handoff bytes out
REQUEST_MEDIA_TYPE = "application/json"
HANDOFF_MEDIA_TYPE = "application/octet-stream"
ERROR_MEDIA_TYPE = "application/json"            # {"error": {"code", "message"[, "limit"]}}

REQUEST_FORMAT = "obclip.steps-request.v1"
HANDOFF_FORMAT = "obclip.handoff.v1"
WIRE_DTYPES = {"float32": np.float32, "float16": np.float16}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16}
# Wire-level sanity bounds (the configurable limits are RequestLimits): classifier-free guidance
# is a non-negative weight; far beyond a few tens it only produces overflow.
MAX_GUIDANCE_SCALE = 100.0
# The handoff's safetensors header, metadata included, is a few kB; anything larger is not ours.
MAX_HANDOFF_HEADER_BYTES = 64 * 1024


class ProtocolError(InputError):
    """Request bytes that do not form a valid request: the sender must fix the request.

    A service answers it with ``status`` (422; 400 for bytes that are not a JSON object) and the
    stable ``code``. A handoff that does not decode is a ``HandoffError`` instead: the two sides
    of the wire call for opposite reactions (fix and resend; never resend)."""

    def __init__(self, message: str, code: str = "invalid_request", status: int = 422):
        super().__init__(message, code=code)
        self.status = status


class LimitExceeded(ProtocolError):
    """A well-formed request over one of the service's limits; the service answers it as
    ``status`` (422, or 413 for the body size) with ``code`` and the ``limit`` object."""

    def __init__(self, code: str, name: str, limit: float, got: float, what: str, status: int = 422):
        super().__init__(f"{what} is {got}, over the server's limit {name}={limit}", code, status)
        self.limit = {"name": name, "max": limit, "got": got}


class HandoffError(UntrustedAnswerError):
    """The cloud's bytes are not a valid answer to our request (format, request hash, N, T, k,
    timesteps, shapes, dtype, non-finite values). Fail closed: the whole answer is refused and
    the request is not sent again, exactly as for a failed verification (device/verify.py)."""

    code = "invalid_handoff"


def error_body(code: str, message: str, limit: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON body of every error answer: ``{"error": {"code", "message"[, "limit"]}}``."""
    err: dict[str, Any] = {"code": code, "message": message}
    if limit is not None:
        err["limit"] = limit
    return {"error": err}


def parse_error_body(body: bytes) -> tuple[str, str] | None:
    """(code, message) of an error body, or None when the body is not one (e.g. a proxy's page)."""
    try:
        err = json.loads(body.decode("utf-8"))["error"]
        code, message = err["code"], err["message"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(code, str) or not isinstance(message, str):
        return None
    return code, message


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


@dataclass(frozen=True)
class StepsRequest:
    """What the device asks of the cloud: run steps 0..k-1 on every candidate.

    Nothing here may depend on which candidate is real: the candidate list is
    in canonical order and the options are chosen before the real value is
    looked at.

    What is derived from a request is derived once per object: its canonical bytes, their
    SHA-256 and its step plan (built, and so checked, when the request is made).
    """

    candidates: tuple[str, ...]
    seed: int
    num_inference_steps: int
    switch_step: int
    guidance_scale: float
    height: int
    width: int
    wire_dtype: str = "float32"
    # Server-side accelerations for the cloud steps; None: every step a full pass.
    acceleration: AccelerationConfig | None = None
    # -- the solver and the device timestep shift (left out of the bytes at their defaults) --
    solver: str = DPM_SOLVER            # runtime.solver's DPM_SOLVER or LCM, on both sides
    device_timestep_shift: int = 0      # dt: the device's UNet sees t + dt (the cloud does not use it)
    # -- end of the solver block --
    # The text of the unconditional rows, the same for every candidate ("": the empty prompt, left
    # out of the bytes). The device sends one only when it vouches for every word (docs/privacy.md).
    negative_prompt: str = ""
    format: str = field(default=REQUEST_FORMAT)

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))
        if isinstance(self.acceleration, dict):
            try:
                object.__setattr__(self, "acceleration", AccelerationConfig.from_dict(self.acceleration))
            except (TypeError, ValueError) as e:
                raise ProtocolError(f"bad acceleration: {e}") from None
        self.validate()
        try:
            _ = self.plan
        except ValueError as e:
            raise ProtocolError(f"no step plan for this request: {e}") from None

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ProtocolError(msg)

        need(self.format == REQUEST_FORMAT, f"request format {self.format!r} is not {REQUEST_FORMAT!r}")
        need(len(self.candidates) >= 1, "request has no candidates; send at least one")
        need(all(isinstance(c, str) and c.strip() for c in self.candidates),
             "every candidate must be a non-empty string")
        for i, c in enumerate(self.candidates):
            try:
                c.encode("utf-8")
            except UnicodeEncodeError:
                # json.loads lets a lone surrogate escape (\\ud800) through; tokenizers refuse it.
                raise ProtocolError(f"candidate {i} is not valid Unicode text (it holds a lone surrogate "
                                    "code point); send UTF-8 text") from None
        need(len(set(self.candidates)) == len(self.candidates), "candidates must be distinct")
        negative = self.negative_prompt
        need(isinstance(negative, str), f"negative_prompt must be a string (\"\" for none), got "
             f"{type(negative).__name__}")
        need(negative == "" or bool(negative.strip()),
             "negative_prompt is only whitespace; send text, or leave the field out for none")
        try:
            negative.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("negative_prompt is not valid Unicode text (it holds a lone surrogate code "
                                "point); send UTF-8 text") from None
        for name in ("seed", "num_inference_steps", "switch_step", "height", "width"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool), f"{name} must be an integer, got {v!r}")
        need(0 <= self.seed < 2**63, f"seed {self.seed} must be in [0, 2**63)")
        need(self.num_inference_steps >= 1, f"num_inference_steps {self.num_inference_steps} must be >= 1")
        need(1 <= self.switch_step <= self.num_inference_steps,
             f"switch_step k={self.switch_step} must be in 1..T={self.num_inference_steps} "
             "(k = 0 is a device-only run and sends no request)")
        need(self.height > 0 and self.width > 0, f"image size {self.height}x{self.width} must be positive")
        need(isinstance(self.guidance_scale, (int, float)) and not isinstance(self.guidance_scale, bool)
             and math.isfinite(self.guidance_scale), f"guidance_scale {self.guidance_scale!r} must be a finite number")
        need(0.0 <= self.guidance_scale <= MAX_GUIDANCE_SCALE,
             f"guidance_scale {self.guidance_scale!r} must be in [0, {MAX_GUIDANCE_SCALE:g}]")
        need(self.wire_dtype in WIRE_DTYPES, f"wire_dtype {self.wire_dtype!r} must be one of {sorted(WIRE_DTYPES)}")
        need(self.acceleration is None or isinstance(self.acceleration, AccelerationConfig),
             f"acceleration must be an AccelerationConfig or null, got {type(self.acceleration).__name__}")
        if self.acceleration is not None:
            need(self.acceleration.switch_step == self.switch_step,
                 f"acceleration is for k={self.acceleration.switch_step} but the request has "
                 f"switch_step k={self.switch_step}; they must agree")
        need(isinstance(self.solver, str) and self.solver in SOLVER_KINDS,
             f"solver {self.solver!r} must be one of {list(SOLVER_KINDS)}")
        shift = self.device_timestep_shift
        need(isinstance(shift, int) and not isinstance(shift, bool), f"device_timestep_shift must be an integer, "
             f"got {shift!r}")
        need(abs(shift) <= MAX_TIMESTEP_SHIFT,
             f"device_timestep_shift {shift} must be in [-{MAX_TIMESTEP_SHIFT}, {MAX_TIMESTEP_SHIFT}]")

    @property
    def n(self) -> int:
        return len(self.candidates)

    @cached_property
    def plan(self) -> StepPlan:
        """The T-step plan of this request (its cloud steps run on the server)."""
        acceleration = self.acceleration or AccelerationConfig.none(self.switch_step)
        return make_plan(self.num_inference_steps, self.switch_step, acceleration, solver=self.solver,
                         device_timestep_shift=self.device_timestep_shift)

    @cached_property
    def _canonical(self) -> bytes:
        d = asdict(self)
        d["candidates"] = list(self.candidates)
        d["guidance_scale"] = float(self.guidance_scale)
        d["acceleration"] = None if self.acceleration is None else self.acceleration.to_dict()
        # Fields added after v1 are left out at their default, so such a request has the same bytes
        # (and hash) as before and an older peer reads it.
        for name, default in _REQUEST_OMITTED_AT_DEFAULT.items():
            if d[name] == default:
                del d[name]
        return canonical_json(d)

    @cached_property
    def _sha256(self) -> str:
        return hashlib.sha256(self._canonical).hexdigest()

    def to_bytes(self) -> bytes:
        return self._canonical

    @classmethod
    def from_bytes(cls, data: bytes) -> StepsRequest:
        """Parse and validate request bytes; every defect is a ProtocolError naming it."""
        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints over the digit limit
            raise ProtocolError(f"request is not UTF-8 JSON: {e}", "malformed_json", 400) from None
        except RecursionError:
            raise ProtocolError("request is not UTF-8 JSON: nested too deeply", "malformed_json", 400) from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"request must be a JSON object, got {type(obj).__name__}", "malformed_json", 400)
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise ProtocolError(f"request has unknown fields {sorted(unknown)}; known: {sorted(known)}")
        missing = known - set(obj) - {"wire_dtype", "acceleration", "format", *_REQUEST_OMITTED_AT_DEFAULT}
        if missing:
            raise ProtocolError(f"request is missing fields {sorted(missing)}")
        if not isinstance(obj["candidates"], list):
            raise ProtocolError("candidates must be a list of strings")
        try:
            return cls(**obj)
        except ProtocolError:
            raise
        except (TypeError, ValueError, OverflowError, RecursionError) as e:  # e.g. a list where a number belongs
            raise ProtocolError(f"a request field has the wrong type: {e}") from None

    def sha256(self) -> str:
        return self._sha256


# Request fields left out of the canonical bytes at their default value (and optional when parsed).
_REQUEST_OMITTED_AT_DEFAULT: dict[str, Any] = {"solver": DPM_SOLVER, "device_timestep_shift": 0, "negative_prompt": ""}


# Image side when nothing better is known (no model loaded, e.g. the in-process step runner);
# a service uses RequestLimits.for_model, which defaults to twice the model's native size.
FALLBACK_MAX_IMAGE_SIZE = 1024
# Default cost budget, in cloud steps of a full-size batch: max_candidates candidates at the
# model's native size for this many cloud steps (or a quarter of them at twice the native size).
DEFAULT_COST_STEPS = 50


def request_cost(request: StepsRequest, latent_shape: Callable[[int, int], Sequence[int]]) -> int:
    """What one request costs the model: UNet rows (2N: unconditional and conditional) x latent
    pixels x cloud steps k. Time and peak memory of a step scale with rows x pixels."""
    _, h, w = latent_shape(request.height, request.width)
    return 2 * request.n * int(h) * int(w) * request.switch_step


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of a service; checked before any model work, in the order of
    what each costs the server. The one definition of the limits, for the service and the
    in-process step runner alike. ``None`` fields are resolved for the loaded model by
    ``for_model`` (a service does that once the model is loaded)."""

    max_candidates: int = option(32, "N, candidates per request", ge=1)
    max_steps: int = option(1000, "T, num_inference_steps", ge=1)
    max_switch_step: int = option(100, "k, cloud steps per request", ge=1)
    max_image_size: int | None = option(None, "height and width in pixels (default: twice the model's native "
                                        "size)", ge=1)
    max_prompt_chars: int = option(1024, "characters per candidate", ge=1)
    max_prompt_tokens: int | None = option(None, "tokens per candidate, start/end included (default: the text "
                                           "encoder's context)", ge=1)
    max_body_bytes: int = option(256 * 1024, "bytes of the request body", ge=1)
    # Cost budget: 2N x latent pixels x k (request_cost). Bounds a request's time and memory.
    max_cost: int | None = option(None, "cost budget per request, 2N x latent pixels x k (default: "
                                  "max_candidates candidates at the model's native size for "
                                  f"{DEFAULT_COST_STEPS} cloud steps); bounds a request's time and memory", ge=1)
    max_guidance_scale: float = option(50.0, "classifier-free guidance scale", ge=0, le=MAX_GUIDANCE_SCALE)

    def __post_init__(self) -> None:
        check_fields(self)

    def for_model(self, native_size: int, latent_shape: Callable[[int, int], Sequence[int]]) -> RequestLimits:
        """These limits with the model-dependent defaults filled in: image side up to twice the
        model's native size, cost budget of max_candidates at the native size for
        DEFAULT_COST_STEPS cloud steps. Explicit values are kept."""
        _, h, w = latent_shape(native_size, native_size)
        cost = 2 * self.max_candidates * int(h) * int(w) * DEFAULT_COST_STEPS
        return replace(self, max_image_size=self.max_image_size or 2 * native_size,
                       max_cost=self.max_cost or cost)

    def check_body(self, size: int) -> None:
        if size > self.max_body_bytes:
            raise LimitExceeded("body_too_large", "max_body_bytes", self.max_body_bytes, size,
                                "the request body in bytes", status=413)

    def check(self, request: StepsRequest, count_tokens: Callable[[str], int] | None = None,
              context: int | None = None,
              latent_shape: Callable[[int, int], Sequence[int]] | None = None) -> None:
        """Raise LimitExceeded for the first limit the request is over. ``count_tokens(text)``
        (the model's tokenizer, start/end included) and its ``context`` add the token limit;
        ``latent_shape(height, width)`` (the model's) adds the cost budget."""
        if request.n > self.max_candidates:
            raise LimitExceeded("too_many_candidates", "max_candidates", self.max_candidates, request.n,
                                "the number of candidates N")
        if request.num_inference_steps > self.max_steps:
            raise LimitExceeded("too_many_steps", "max_steps", self.max_steps, request.num_inference_steps,
                                "num_inference_steps T")
        if request.switch_step > self.max_switch_step:
            raise LimitExceeded("too_many_cloud_steps", "max_switch_step", self.max_switch_step,
                                request.switch_step, "switch_step k (cloud steps)")
        side = max(request.height, request.width)
        max_side = self.max_image_size or FALLBACK_MAX_IMAGE_SIZE
        if side > max_side:
            raise LimitExceeded("image_too_large", "max_image_size", max_side, side, "the image side")
        if request.guidance_scale > self.max_guidance_scale:
            raise LimitExceeded("guidance_too_large", "max_guidance_scale", self.max_guidance_scale,
                                request.guidance_scale, "guidance_scale")
        if latent_shape is not None and self.max_cost is not None:
            cost = request_cost(request, latent_shape)
            if cost > self.max_cost:
                raise LimitExceeded("request_too_costly", "max_cost", self.max_cost, cost,
                                    "the request's cost 2N x latent pixels x k (lower N, the image size or k)")
        chars = [len(c) for c in request.candidates]
        worst = max(range(len(chars)), key=chars.__getitem__)
        if chars[worst] > self.max_prompt_chars:
            raise LimitExceeded("prompt_too_long", "max_prompt_chars", self.max_prompt_chars, chars[worst],
                                f"candidate {worst} in characters")
        # The negative prompt is encoded like a candidate: the same limits.
        if len(request.negative_prompt) > self.max_prompt_chars:
            raise LimitExceeded("prompt_too_long", "max_prompt_chars", self.max_prompt_chars,
                                len(request.negative_prompt), "the negative prompt in characters")
        if count_tokens is not None:
            bounds = [x for x in (context, self.max_prompt_tokens) if x is not None]
            if bounds:
                max_tokens = min(bounds)
                tokens = [count_tokens(c) for c in request.candidates]
                worst = max(range(len(tokens)), key=tokens.__getitem__)
                if tokens[worst] > max_tokens:
                    raise LimitExceeded("prompt_too_long", "max_prompt_tokens", max_tokens, tokens[worst],
                                        f"candidate {worst} in tokens (start/end included)")
                negative = count_tokens(request.negative_prompt) if request.negative_prompt else 0
                if negative > max_tokens:
                    raise LimitExceeded("prompt_too_long", "max_prompt_tokens", max_tokens, negative,
                                        "the negative prompt in tokens (start/end included)")


@dataclass(frozen=True)
class Handoff:
    """The cloud's answer: per-candidate latents after step k and solver state."""

    latents: np.ndarray          # [N, C, h, w], float32 after decoding
    prev_x0: np.ndarray          # [N, C, h, w]: data prediction of step k-1
    lower_order_nums: int
    step_index: int              # == k
    timesteps: tuple[int, ...]   # the cloud's full schedule, all T steps
    request_sha256: str
    cloud_model: str
    metadata: dict[str, str]
    wire_size: int = 0           # bytes on the wire


def encode_handoff(request: StepsRequest, latents: np.ndarray, prev_x0: np.ndarray, *,
                   lower_order_nums: int, step_index: int, timesteps: Sequence[int] | np.ndarray,
                   cloud_model: str) -> bytes:
    """Cloud side: latents + solver state -> safetensors bytes in the request's wire dtype."""
    dtype = WIRE_DTYPES[request.wire_dtype]
    latents = np.ascontiguousarray(latents, dtype=dtype)
    prev_x0 = np.ascontiguousarray(prev_x0, dtype=dtype)
    if latents.shape != prev_x0.shape or latents.ndim != 4 or latents.shape[0] != request.n:
        raise ValueError(f"handoff tensors must both be [N={request.n}, C, h, w]; got {latents.shape}, {prev_x0.shape}")
    meta = {
        "format": HANDOFF_FORMAT,
        "request_sha256": request.sha256(),
        "n": str(request.n),
        "num_inference_steps": str(request.num_inference_steps),
        "switch_step": str(request.switch_step),
        "step_index": str(int(step_index)),
        "lower_order_nums": str(int(lower_order_nums)),
        "timesteps": json.dumps([int(t) for t in timesteps]),
        "guidance_scale": repr(float(request.guidance_scale)),
        "latent_shape": json.dumps(list(latents.shape[1:])),
        "dtype": request.wire_dtype,
        "cloud_model": cloud_model,
    }
    return _canonical_header(st_save({"latents": latents, "prev_x0": prev_x0}, metadata=meta))


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors bytes with the JSON header's keys sorted.

    The safetensors writer emits metadata in hash order, so equal handoffs
    would otherwise differ byte for byte. Same content, same length: the header
    is padded back to its original size, so data offsets are unchanged.
    """
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(canonical) > n:  # cannot happen for the writer's compact JSON; keep its bytes if it does
        return data
    return data[:8] + canonical.ljust(n, b" ") + data[8 + n:]


def _read_header(data: bytes) -> dict[str, Any]:
    """safetensors layout: u64 little-endian header length, JSON header, raw data.
    (safetensors.numpy.load drops __metadata__, so the header is read here.)"""
    if len(data) < 8:
        raise HandoffError(f"handoff is {len(data)} bytes; too short to hold a safetensors header (truncated?)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise HandoffError(f"handoff header claims {n} bytes but only {len(data) - 8} follow (truncated?)")
    if n > MAX_HANDOFF_HEADER_BYTES:
        raise HandoffError(f"handoff header is {n} bytes, over the {MAX_HANDOFF_HEADER_BYTES} a handoff needs")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise HandoffError(f"handoff header is not JSON: {e}") from None
    except RecursionError:
        raise HandoffError("handoff header is not JSON: nested too deeply") from None
    if not isinstance(header, dict):
        raise HandoffError("handoff header is not a JSON object")
    body = len(data) - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            meta = info
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise HandoffError("handoff __metadata__ is not an object of strings")
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and 0 <= o <= body for o in offsets) and offsets[0] <= offsets[1]):
            raise HandoffError(f"handoff tensor {_short(name)} has no valid data_offsets within the "
                                f"{body} data bytes (truncated?)")
    return header


def _short(value: object, limit: int = 80) -> str:
    """repr of a value from the wire, cut short: error messages must stay readable."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def decode_handoff(data: bytes, request: StepsRequest, expected_latent_shape: tuple[int, int, int],
                   expected_timesteps: Sequence[int] | np.ndarray | None = None) -> Handoff:
    """Device side: parse and validate the cloud's bytes against our own request. Any defect of
    the bytes is a HandoffError naming it (never another exception type)."""
    header = _read_header(data)
    meta: dict[str, str] = header.get("__metadata__") or {}

    def field_(key: str) -> str:
        if key not in meta:
            raise HandoffError(f"handoff metadata lacks {key!r}")
        return meta[key]

    def int_field(key: str) -> int:
        text = field_(key)
        if not re.fullmatch(r"-?[0-9]{1,18}", text):
            raise HandoffError(f"handoff metadata {key!r}={_short(text)} is not an integer")
        return int(text)

    if field_("format") != HANDOFF_FORMAT:
        raise HandoffError(f"handoff format {_short(meta['format'])} is not {HANDOFF_FORMAT!r}; "
                            "the cloud and device versions differ, update one of them")
    if field_("request_sha256") != request.sha256():
        raise HandoffError("handoff answers a different request (request_sha256 mismatch)")
    checks = {"n": request.n, "num_inference_steps": request.num_inference_steps,
              "switch_step": request.switch_step, "step_index": request.switch_step}
    for key, want in checks.items():
        got = int_field(key)
        if got != want:
            raise HandoffError(f"handoff {key}={got}, expected {want}")
    lower_order_nums = int_field("lower_order_nums")
    if not 0 <= lower_order_nums <= request.switch_step:
        raise HandoffError(f"handoff lower_order_nums={lower_order_nums} out of range 0..{request.switch_step}")
    if request.solver == LCM and lower_order_nums != 0:
        raise HandoffError(f"handoff lower_order_nums={lower_order_nums} for the lcm solver, which keeps no "
                           "multistep counter (always 0)")
    if field_("dtype") != request.wire_dtype:
        raise HandoffError(f"handoff dtype {_short(meta['dtype'])}, requested {request.wire_dtype!r}")
    try:
        raw_steps = json.loads(field_("timesteps"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raw_steps = None
    if not (isinstance(raw_steps, list) and all(type(t) is int and 0 <= t < 2**31 for t in raw_steps)):
        raise HandoffError("handoff timesteps are not a JSON list of integers in [0, 2**31)")
    timesteps = tuple(raw_steps)
    if len(timesteps) != request.num_inference_steps:
        raise HandoffError(f"handoff has {len(timesteps)} timesteps, expected T={request.num_inference_steps}")
    if expected_timesteps is not None and tuple(int(t) for t in expected_timesteps) != timesteps:
        raise HandoffError(f"the cloud's timestep schedule {list(timesteps)} differs from the device's "
                            f"{[int(t) for t in expected_timesteps]}: their scheduler configs disagree")

    want_shape = [request.n, *(int(d) for d in expected_latent_shape)]
    want_dtype = WIRE_DTYPES[request.wire_dtype]
    for name in ("latents", "prev_x0"):
        info = header.get(name)
        if not isinstance(info, dict):
            raise HandoffError(f"handoff lacks tensor {name!r}")
        if info.get("shape") != want_shape:
            raise HandoffError(f"handoff {name} shape {_short(info.get('shape'))} != expected {want_shape}")
        if _ST_DTYPES.get(info.get("dtype")) is not want_dtype:  # type: ignore[arg-type]
            raise HandoffError(f"handoff {name} dtype {_short(info.get('dtype'))} != requested {request.wire_dtype}")
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise HandoffError(f"handoff bytes are not valid safetensors: {_short(str(e), 200)}") from None
    out = {}
    for name in ("latents", "prev_x0"):
        if name not in tensors:
            raise HandoffError(f"handoff lacks tensor {name!r}")
        arr = tensors[name].astype(np.float32)
        if not np.isfinite(arr).all():
            raise HandoffError(f"handoff {name} holds non-finite values (NaN or inf)")
        out[name] = arr
    return Handoff(
        latents=out["latents"], prev_x0=out["prev_x0"], lower_order_nums=lower_order_nums,
        step_index=request.switch_step, timesteps=timesteps, request_sha256=meta["request_sha256"],
        cloud_model=meta.get("cloud_model", ""), metadata=dict(meta), wire_size=len(data),
    )
