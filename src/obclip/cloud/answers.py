"""Errors to HTTP answers: the one place that says which status and body each error gets.

Every error answer is JSON, ``{"error": {"code": ..., "message": ...}}`` (plus ``"limit":
{"name", "max", "got"}`` when a configured limit was hit). An obclip error is answered by its
kind (runtime/errors.py), whatever module raised it:

    InputError (the request)       4xx: 422, or the request error's own 4xx (400 not a JSON object,
                                   413 body too large), with its code and any limit hit
    ServiceError (may be retried)  503 with Retry-After
    ArtifactError, any other       500; an error obclip did not raise on purpose is a bug and its
                                   text stays in the server's log ("internal")

The HTTP layer's own answers (404, 405, 408, 415, 431, 499, 504) are made where HTTP decides
them (cloud/http_app.py, cloud/service.py) with an explicit status. Messages never quote a
candidate.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from obclip.runtime.errors import ObclipError, kind_of
from obclip.runtime.protocol import LimitExceeded, ProtocolError, StepsRequest, error_body

INTERNAL_MESSAGE = "the service failed on this request; the failure is logged on the server"


class ErrorAnswer(Exception):
    """An answer other than 200: status, a stable code, a message that never quotes a candidate."""

    def __init__(self, status: int, code: str, message: str, *, limit: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.headers = limit, headers or {}

    @classmethod
    def of(cls, error: BaseException, retry_after_s: int) -> ErrorAnswer:
        """The answer to an error, by its kind (the table in the module docstring)."""
        if isinstance(error, ProtocolError):
            limit = error.limit if isinstance(error, LimitExceeded) else None
            return cls(error.status, error.code, str(error), limit=limit)
        kind = kind_of(error)
        if kind is None or not isinstance(error, ObclipError):
            return cls(500, "internal", INTERNAL_MESSAGE)
        headers = {"Retry-After": str(retry_after_s)} if kind.retryable else None
        return cls(kind.http_status, error.code, str(error), headers=headers)

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.code, self.message, self.limit), status_code=self.status,
                            headers=self.headers)


def describe_request(request: StepsRequest, log_prompts: bool = False) -> str:
    """The request as it may be logged: shape and options; the candidates and the negative prompt (user
    text, protected like the prompt) only with log_prompts."""
    acc = request.acceleration
    text = (f"N={request.n} T={request.num_inference_steps} k={request.switch_step} "
            f"size={request.height}x{request.width} dtype={request.wire_dtype} "
            f"accel={'none' if acc is None else f'r={acc.cache_step},s={acc.skip_step}'} "
            f"solver={request.solver} dt={request.device_timestep_shift}")
    if log_prompts:
        text += f" candidates={list(request.candidates)!r} negative_prompt={request.negative_prompt!r}"
    return text
