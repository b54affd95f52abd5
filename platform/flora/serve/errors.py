"""The serving API's own refusals (not about the registry), in the HTTP layer's vocabulary."""

from __future__ import annotations

from adapter_registry.errors import ApiError


class InvalidRequest(ApiError):
    """A completion the ingress refuses as sent (400): a parameter, a malformed version."""

    status = 400
    code = "invalid_request"
