"""Errors sorted by what the caller must do, not by Python type.

Every error obclip raises on purpose derives from ``ObclipError`` and from exactly one
of four kinds. Each kind has one exit code (the CLIs) and one HTTP status (the service):

=====================  =====================================================  ====  ====
kind                   what the caller does                                    exit  HTTP
=====================  =====================================================  ====  ====
InputError             fix the prompt, option, file or request and run again     2   422
ServiceError           the service failed or was unreachable: may be retried     3   503
UntrustedAnswerError   the server's answer failed verification: never retry,     4   502
                       never resend the request
ArtifactError          an engines folder, manifest or export is missing, stale   5   500
                       or corrupt: rebuild it (python export/build_engines.py)
=====================  =====================================================  ====  ====

Retrying is decided by the kind alone (``retryable``): only a ``ServiceError`` may be sent
again, with the same bytes. An ``InputError`` would be refused again; an
``UntrustedAnswerError`` must not be resent at all.

``InputError`` is also a ``ValueError`` (a bad argument is one, and callers that validate
with ``except ValueError`` keep working). ``UntrustedAnswerError`` is deliberately *not* a
``ValueError``, an ``InputError`` or a ``ServiceError``: an app's ``except ServiceError:
retry`` must never catch it, because a retry tells a tampering server it was noticed.
"""

from __future__ import annotations

from typing import ClassVar


class ObclipError(Exception):
    """The root of every error obclip raises on purpose."""

    exit_code: ClassVar[int] = 1
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False    # may the same request be sent again?
    code: str = "error"                  # a stable name of the error (error bodies, logs, tests)

    def __init__(self, message: str = "", *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InputError(ObclipError, ValueError):
    """The caller's input is invalid: fix it and run again."""

    code = "invalid_input"
    exit_code = 2
    http_status = 422


class ServiceError(ObclipError):
    """The cloud service failed, refused for load, or could not be reached: the same request
    bytes may be sent again later."""

    code = "service_unavailable"
    exit_code = 3
    http_status = 503
    retryable = True


class UntrustedAnswerError(ObclipError):
    """The server's answer failed the device's checks: the whole answer is refused and the
    request must not be sent again."""

    code = "untrusted_answer"
    exit_code = 4
    http_status = 502
    # What a command says first, whatever the details: the user must know nothing was resent.
    summary: ClassVar[str] = "the server's answer failed verification; nothing was resent"


class ArtifactError(ObclipError):
    """An engines folder, manifest or exported graph is missing, stale or corrupt: rebuild it."""

    code = "artifact_error"
    exit_code = 5
    http_status = 500


ERROR_KINDS: tuple[type[ObclipError], ...] = (InputError, ServiceError, UntrustedAnswerError, ArtifactError)


def kind_of(error: BaseException) -> type[ObclipError] | None:
    """The kind (one of ERROR_KINDS) an error belongs to, or None for an error obclip did not raise."""
    for kind in ERROR_KINDS:
        if isinstance(error, kind):
            return kind
    return None
