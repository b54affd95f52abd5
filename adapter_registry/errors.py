"""Typed registry errors, each carrying the HTTP status and a stable code the API returns.

The API layer turns any :class:`RegistryError` into OpenAI-shaped error JSON; anything else is a
bug and answers 500. Keeping the status here means the CLI, the client and the Serve ingress all
agree on what a failure means.
"""

from __future__ import annotations


def error_json(
    message: str, code: str, kind: str = "invalid_request_error", param: str | None = None
) -> dict:
    """OpenAI's error shape, shared by every FLoRA Serve endpoint."""
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


class ApiError(Exception):
    """An HTTP refusal: ``status`` is the HTTP status, ``code`` a machine-readable reason.

    The HTTP layer (:func:`adapter_registry.app.install_error_handlers`, used by the registry's
    app and the Serve ingress) answers every one in OpenAI's error shape. The registry's own
    failures are :class:`RegistryError`; the ingress's refusals that are not about the registry
    subclass this directly (``flora.serve.errors``)."""

    status = 400
    code = "invalid_request"
    kind = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def to_json(self) -> dict:
        return error_json(self.message, self.code, self.kind, self.param)


class RegistryError(ApiError):
    """The registry's failures (names, adapters, keys, backends), each with its status."""


class InvalidName(RegistryError):
    status = 400
    code = "invalid_name"


class InvalidAdapter(RegistryError):
    """The files are not an adapter this registry accepts (format, shapes, values)."""

    status = 422
    code = "invalid_adapter"


class AdapterTooLarge(RegistryError):
    status = 413
    code = "adapter_too_large"


class NotFound(RegistryError):
    """Also what a tenant sees for another tenant's adapter: existence is not disclosed."""

    status = 404
    code = "not_found"


class Conflict(RegistryError):
    status = 409
    code = "conflict"


class Unauthorized(RegistryError):
    status = 401
    code = "invalid_api_key"
    kind = "authentication_error"


class TooManyFailedKeys(RegistryError):
    """This client sent too many bad API keys; ``retry_after`` seconds until it may try again."""

    status = 429
    code = "too_many_failed_keys"
    kind = "rate_limit_error"

    def __init__(self, retry_after: float):
        super().__init__(
            f"too many invalid API keys from this client; retry after {retry_after:.0f} s"
        )
        self.retry_after = retry_after


class Forbidden(RegistryError):
    status = 403
    code = "forbidden"
    kind = "permission_error"


class Unavailable(RegistryError):
    """A backing service (Redis, S3) is down; retrying later can succeed."""

    status = 503
    code = "backend_unavailable"
    kind = "server_error"
    retry_after = 2.0  # seconds, the 503's Retry-After


class IntegrityError(RegistryError):
    """Downloaded bytes do not match the recorded sha256: never load them."""

    status = 502
    code = "integrity_error"
    kind = "server_error"
