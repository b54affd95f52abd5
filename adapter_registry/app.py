"""A standalone registry server: the router plus OpenAI-shaped errors and a body-size cap.

``install_error_handlers`` and ``BodySizeLimit`` are public so the Serve ingress gives the
same answers for the same mistakes.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapter_registry.api import build_router, readiness
from adapter_registry.errors import (
    AdapterTooLarge,
    ApiError,
    TooManyFailedKeys,
    Unavailable,
    error_json,
)
from adapter_registry.registry import Registry

log = logging.getLogger(__name__)


def _error(
    status: int, message: str, code: str, kind: str = "invalid_request_error"
) -> JSONResponse:
    return JSONResponse(error_json(message, code, kind), status_code=status)


def _validation_message(errors: list) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": {"message", "type", "code", "param"}}``; no 500 for bad input."""

    @app.exception_handler(ApiError)
    async def registry_error(_: Request, e: ApiError) -> JSONResponse:
        headers = None
        if isinstance(e, TooManyFailedKeys | Unavailable):  # clients back off, then retry
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
        return JSONResponse(e.to_json(), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(list(e.errors())), "invalid_request")

    @app.exception_handler(ValidationError)
    async def body_invalid(_: Request, e: ValidationError) -> JSONResponse:
        return _error(400, _validation_message(e.errors()), "invalid_request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        if isinstance(e.__cause__, ApiError):
            # FastAPI turns anything raised while it reads a JSON body into a 400 "error parsing
            # the body"; BodySizeLimit raises inside that read, and its 413 must survive.
            return await registry_error(request, e.__cause__)
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error(e.status_code, str(e.detail), f"http_{e.status_code}", kind)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal error; it has been logged", "internal_error", "server_error")


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not they declare a length.

    ``per_path`` gives some paths their own limit: the Serve ingress lets adapter uploads carry
    adapter-sized bodies but keeps completions small, since a prompt is parsed, then tokenised
    on the engine's thread, before the context check can refuse it.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None):
        self.app, self.max_bytes, self.per_path = app, max_bytes, per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            response = _error(
                413,
                f"request body over {limit} bytes (Content-Length {declared.decode()[:20]})",
                "request_too_large",
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise AdapterTooLarge(f"request body over {limit} bytes")
            return message

        await self.app(scope, counted, send)


def create_app(registry: Registry) -> FastAPI:
    app = FastAPI(
        title="FLoRA Serve adapter registry",
        version="1",
        description="Per-tenant LoRA / FLoRA / IA3 adapters for one StarCoder base model.",
    )
    install_error_handlers(app)
    app.include_router(build_router(registry))
    app.add_middleware(BodySizeLimit, max_bytes=registry.max_adapter_bytes + (1 << 20))

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(response: Response) -> dict[str, str]:
        return readiness(registry, response)

    app.state.registry = registry
    return app
