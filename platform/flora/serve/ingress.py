"""The HTTP front door: OpenAI-compatible completions for every tenant, the registry's REST API,
health and metrics. Runs inside the Serve ingress deployment, or in-process over any backend.

Every request from every tenant goes to the same replicas; the adapter travels in the request
body (``adapter``), never as a multiplexing key, so the engine batches across tenants.
``model`` selects what serves a request:

* the served model's name (``/v1/models`` lists it) or ``auto``: the registry resolves the
  tenant's adapter from ``user`` and ``language`` (given, or inferred from the prompt), else base;
* ``base``: the base model, no adapter;
* ``name``, ``name@version`` or ``base:name``: that adapter (the tenant's own, else a public one).

Response headers ``x-flora-adapter`` and ``x-flora-adapter-reason`` say what served it and why.

``/readyz`` is 200 only while the registry answers and a replica answered a health ping through
its engine thread within ``ready_window_s`` (:class:`ReplicaHealth`). ``RequestCounter`` counts
every response once in ``flora_requests_total``, with the status actually sent.
"""

# No ``from __future__ import annotations``: FastAPI must see the locally defined dependencies.
import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from adapter_format import ServingLimits
from adapter_registry import (
    AdapterRecord,
    BaseModelSpec,
    Forbidden,
    InvalidName,
    NotFound,
    Principal,
    Registry,
    Unavailable,
)
from adapter_registry.api import (
    build_router,
    client_address,
    declared,
    readiness,
    remember_tenant,
)
from adapter_registry.app import BodySizeLimit, install_error_handlers
from adapter_registry.errors import error_json
from adapter_registry.names import InvalidVersion, check_optional
from flora.engine import SamplingParams
from flora.serve.config import ServeArgs
from flora.serve.errors import InvalidRequest
from flora.serve.health import ReplicaHealth
from flora.serve.limits import TenantLimiter, TooManyRequests
from flora.serve.metrics import ServeMetrics
from flora.serve.openai_types import ChatCompletionRequest, CompletionRequest
from flora.serve.prompting import CHAT_STOP, chat_text, infer_language, render_chat
from flora.serve.request_counter import RequestCounter
from flora.serve.responses import Reply, sse
from flora.serve.wire import GenerateCall, StreamChunk

log = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False, description="a tenant API key")


class Backend(Protocol):
    """Where generation happens: the replicas behind a Ray handle, or an in-process engine."""

    def stream(self, call: GenerateCall) -> AsyncIterator[StreamChunk]: ...

    async def model_info(self) -> dict[str, Any]: ...

    async def ping(self) -> None:
        """Return once a replica answered through its engine thread (the caller bounds the wait)."""
        ...


class Served:
    """The model behind the backend, learned from a replica on first use."""

    def __init__(self, backend: Backend, registry: Registry):
        self.backend, self.registry = backend, registry
        self.info: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> dict[str, Any]:
        async with self._lock:
            if self.info is None:
                info = await self.backend.model_info()
                # adapters for the served model validate against its shapes and limits
                # a replica of an older release reports no limits: the format's own apply
                limits = ServingLimits.model_validate(info.get("limits") or {})
                self.registry.catalog.add(
                    BaseModelSpec.from_hf_config(info["name"], info["config"], limits)
                )
                self.info = info
        return self.info


class Generation:
    """Turns one OpenAI request into a :class:`GenerateCall`, then into an HTTP response."""

    def __init__(self, app_state: "IngressState", tenant: str, endpoint: str):
        self.state, self.tenant, self.endpoint = app_state, tenant, endpoint

    async def run(self, body: CompletionRequest | ChatCompletionRequest) -> Response:
        state = self.state
        try:
            info = await state.served.get()
        except Exception as e:  # no replica has come up (yet)
            raise Unavailable(f"the model is not ready yet ({type(e).__name__}); retry") from e
        if body.max_tokens is not None and body.max_tokens >= info["max_model_len"]:
            raise InvalidRequest(
                f"max_tokens {body.max_tokens} is over this model's context "
                f"({info['max_model_len']} tokens)",
                param="max_tokens",
            )
        chat = isinstance(body, ChatCompletionRequest)
        code = chat_text(body.messages) if chat else (body.text or "")
        adapter, rule, reason = await self._resolve(body, info["name"], code)
        call = self._call(body, adapter)
        label = adapter.label if adapter else info["name"]
        headers = {"x-flora-adapter": adapter.label if adapter else "base"}
        headers["x-flora-adapter-reason"] = reason
        state.metrics.adapter_used(adapter.id if adapter else None, rule)
        reply = Reply(model=label, chat=chat, want_logprobs=call.params.logprobs is not None)
        try:
            state.limiter.acquire(self.tenant)
        except TooManyRequests as e:  # counted, like every response, by RequestCounter
            retry = {"Retry-After": str(e.retry_after)}
            return _error_response(429, e.message, "rate_limited", retry)
        state.metrics.in_flight.inc()
        try:
            stream = state.backend.stream(call)
            first = await anext(stream)
        except BaseException:
            self._done(None)
            raise
        if first.error is not None:
            await stream.aclose()
            self._observe(first)
            self._done(None)
            return _error_response(
                first.error.status, first.error.message, first.error.code, headers
            )
        if body.stream:
            return StreamingResponse(
                self._events(reply, first, stream),
                media_type="text/event-stream",
                headers=headers | {"Cache-Control": "no-cache"},
            )
        return await self._collect(reply, first, stream, headers)

    def _call(
        self, body: CompletionRequest | ChatCompletionRequest, adapter: AdapterRecord | None
    ) -> GenerateCall:
        """What the replica needs: prompt, sampling parameters, the resolved adapter, tenant."""
        chat = isinstance(body, ChatCompletionRequest)
        logprobs = body.logprobs  # completions: how many alternatives
        if chat:  # chat: a flag, and top_logprobs says how many
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = SamplingParams(
            max_tokens=body.max_tokens or self.state.args.max_tokens_default,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=tuple(body.stops) + ((CHAT_STOP,) if chat else ()),
            logprobs=logprobs,
        )
        return GenerateCall(
            request_id=f"{self.tenant}-{uuid.uuid4().hex[:16]}",
            tenant=self.tenant,
            prompt=render_chat(body.messages) if chat else body.text,
            prompt_ids=None if chat or body.token_ids is None else tuple(body.token_ids),
            params=params,
            adapter=adapter,
        )

    async def _collect(
        self,
        reply: Reply,
        first: StreamChunk,
        stream: AsyncIterator[StreamChunk],
        headers: dict[str, str],
    ) -> Response:
        """A whole (non-streamed) answer, within the request timeout."""
        timeout = self.state.args.request_timeout_s
        try:
            async with asyncio.timeout(timeout):
                chunk = first
                while True:
                    self._observe(chunk)
                    if chunk.error is not None:
                        error = chunk.error
                        return _error_response(error.status, error.message, error.code, headers)
                    reply.add(chunk)
                    if chunk.finish_reason:
                        break
                    chunk = await anext(stream)
        except TimeoutError:
            message = f"the request ran past {timeout:g}s and was cancelled"
            return _error_response(504, message, "timeout", headers)
        finally:
            await stream.aclose()
            self._done(reply)
        return JSONResponse(reply.body(), headers=headers)

    async def _events(
        self, reply: Reply, first: StreamChunk, stream: AsyncIterator[StreamChunk]
    ) -> AsyncIterator[str]:
        """SSE events; leaving early (a client that disconnects) cancels the engine request."""
        try:
            chunk, is_first = first, True
            while True:
                self._observe(chunk)
                if (error := chunk.error) is not None:  # the 200 is sent: it goes in the stream
                    kind = "invalid_request_error" if error.status < 500 else "server_error"
                    self.state.metrics.stream_error(self.tenant, error.code)
                    yield sse(error_json(error.message, error.code, kind))
                    break
                reply.add(chunk)
                yield reply.event(chunk, is_first)
                is_first = False
                if chunk.finish_reason:
                    break
                chunk = await anext(stream)
            yield sse("[DONE]")
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
            self._done(reply)

    def _observe(self, chunk: StreamChunk) -> None:
        """Engine reports that ride on chunks: a replica's stats, or that it died."""
        metrics = self.state.metrics
        if chunk.stats is not None and chunk.replica is not None:
            metrics.replica_stats(chunk.replica, chunk.stats)
        if chunk.lost_replica:
            metrics.replica_lost(chunk.lost_replica)

    def _done(self, reply: Reply | None) -> None:
        """Release the tenant's slot and record the generation (exactly once per admitted
        request); the response's status is counted by :class:`RequestCounter`."""
        state = self.state
        state.limiter.release(self.tenant)
        state.metrics.in_flight.dec()
        if reply is not None:
            ttft = reply.first_token_at - reply.started if reply.first_token_at else None
            state.metrics.generation(
                self.tenant,
                reply.prompt_tokens,
                reply.completion_tokens,
                ttft,
                reply.time_per_token,
            )

    async def _resolve(self, body: Any, served_name: str, code: str) -> tuple[Any, str, str]:
        """``(record or None, rule, reason)`` for the request's ``model``."""
        model = body.model
        principal = Principal(self.tenant)
        registry = self.state.registry
        call = asyncio.to_thread
        check_optional(body.user, "user")  # bad names are 400s whatever the model
        check_optional(body.language, "language")
        if model == "base":
            return None, "base", "base model: requested"
        if model in (served_name, "auto", ""):
            language = body.language or infer_language(code)
            resolution = await call(registry.resolve, principal, user=body.user, language=language)
            return resolution.adapter, resolution.rule, resolution.reason
        name = model.removeprefix("base:")
        try:
            record = await call(registry.get, principal, name)
        except InvalidVersion as e:  # "x@²": a malformed request, not a model that may exist
            raise InvalidRequest(e.message, param="model") from e
        except (NotFound, InvalidName) as e:
            raise NotFound(
                f"the model {model!r} does not exist; GET /v1/models lists what you can use",
                param="model",
            ) from e
        return record, "explicit", f"{record.label}: named in the request"


class IngressState:
    def __init__(self, registry: Registry, backend: Backend, args: ServeArgs):
        self.registry, self.backend, self.args = registry, backend, args
        self.served = Served(backend, registry)
        self.metrics = ServeMetrics()
        self.limiter = TenantLimiter(args.limits)
        self.health = ReplicaHealth(backend, args.ready_ping_timeout_s, args.ready_window_s)


def _error_response(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        kind = "rate_limit_error"
    if status == 503:  # a replica shutting down or unavailable: retrying soon can succeed
        headers = {"Retry-After": str(math.ceil(Unavailable.retry_after))} | (headers or {})
    return JSONResponse(error_json(message, code, kind), status_code=status, headers=headers)


# the refusals the OpenAI routes answer, declared so the OpenAPI spec matches the API
_GENERATION_ERRORS = declared(
    {
        400: "bad request (a malformed adapter version, a bad parameter)",
        401: "missing or invalid API key",
        403: "the admin key, or another tenant's key",
        404: "no such adapter",
        413: "request body too large",
        429: "rate or concurrency limit; see Retry-After",
    }
)
# with "stream": true the answer is server-sent events
_GENERATED = _GENERATION_ERRORS | {200: {"content": {"text/event-stream": {}}}}


class KnowTheModel:
    """Uploads validate against the served model's shapes and limits: learn them first.

    Pure ASGI (not ``@app.middleware``, whose ``BaseHTTPMiddleware`` re-streams every response
    body through a memory channel: a cost on every token of every stream)."""

    def __init__(self, app: ASGIApp, served: Served):
        self.app, self.served = app, served

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] == "/v1/adapters"
        ):
            with contextlib.suppress(Exception):  # no replica yet: the upload says so (422)
                async with asyncio.timeout(30):
                    await self.served.get()
        await self.app(scope, receive, send)


def build_ingress_app(registry: Registry, backend: Backend, args: ServeArgs) -> FastAPI:
    """The whole HTTP API over ``backend``."""
    state = IngressState(registry, backend, args)
    app = FastAPI(
        title="FLoRA Serve",
        version="1",
        description="OpenAI-compatible completions where every request runs through its "
        "tenant's own adapter, batched together with every other tenant's.",
    )
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=args.max_request_bytes,
        per_path={"/v1/adapters": registry.max_adapter_bytes + (1 << 20)},
    )
    app.include_router(build_router(registry))
    app.state.ingress = state

    app.add_middleware(KnowTheModel, served=state.served)

    # added last, so outside every other middleware: it sees what each of them answers
    app.add_middleware(RequestCounter, metrics=state.metrics)

    def tenant_of(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> str:
        key = credentials.credentials if credentials else None
        principal = registry.authenticate(key, client_address(request))
        remember_tenant(request, principal.tenant)  # the metrics' tenant label
        if principal.is_admin:
            raise Forbidden("completions need a tenant's API key, not the admin key")
        return principal.tenant

    Tenant = Annotated[str, Depends(tenant_of)]

    def path_tenant(tenant: str, caller: Tenant) -> str:
        if tenant != caller:
            raise Forbidden(f"this API key does not belong to tenant {tenant!r}")
        return caller

    PathTenant = Annotated[str, Depends(path_tenant)]

    def openai_routes(prefix: str, caller: Any, tag: str) -> None:
        """The OpenAI routes under ``prefix``; ``caller`` resolves the tenant."""

        @app.post(f"{prefix}/v1/completions", tags=[tag], responses=_GENERATED)
        async def completions(body: CompletionRequest, tenant: caller) -> Response:
            return await Generation(state, tenant, "completions").run(body)

        @app.post(f"{prefix}/v1/chat/completions", tags=[tag], responses=_GENERATED)
        async def chat(body: ChatCompletionRequest, tenant: caller) -> Response:
            return await Generation(state, tenant, "chat").run(body)

        @app.get(f"{prefix}/v1/models", tags=[tag], responses=_GENERATION_ERRORS)
        async def models(tenant: caller) -> dict[str, Any]:
            return await _models(state, tenant)

    openai_routes("", Tenant, "openai")
    openai_routes("/tenants/{tenant}", PathTenant, "per-tenant")

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "not ready"}})
    async def readyz(response: Response) -> dict[str, str]:
        """200 when the registry's index and store answer and a replica answered a health ping
        within ``ready_window_s``; else 503, each part saying why."""
        status = await asyncio.to_thread(readiness, registry, response)
        ready, status["replica"] = await state.health.check()
        if not ready:
            response.status_code = 503
        try:
            async with asyncio.timeout(10):
                status["model"] = (await state.served.get())["name"]
        except Exception as e:  # no replica yet, or it failed to start
            status["model"] = f"not ready: {type(e).__name__}: {e}"[:300]
            response.status_code = 503
        return status

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        responses={
            401: {"description": "invalid API key"},
            429: {"description": "too many invalid API keys from this client (Retry-After)"},
            403: {"description": "admin key required"},
        },
    )
    def metrics(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Response:
        """Prometheus metrics (their labels name tenants, so they need the admin key)."""
        key = credentials.credentials if credentials else None
        principal = registry.authenticate(key, client_address(request))
        remember_tenant(request, principal.tenant)
        if not principal.is_admin:
            raise Forbidden("metrics need the admin key")
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _models(state: IngressState, tenant: str) -> dict[str, Any]:
    info = await state.served.get()
    created = int(time.time())
    data: list[dict[str, Any]] = [
        {"id": info["name"], "object": "model", "created": created, "owned_by": "flora-serve"},
        {"id": "base", "object": "model", "created": created, "owned_by": "flora-serve"},
    ]
    records = await asyncio.to_thread(state.registry.list, Principal(tenant), include_global=True)
    # a tenant's own adapter shadows a public one of that name (the one `model` selects), so
    # the public one is not listed: every id appears once and means what it serves
    own = {r.name for r in records if r.tenant == tenant}
    for r in records:
        if r.tenant != tenant and r.name in own:
            continue
        data.append(
            {
                "id": r.name,
                "object": "model",
                "created": int(r.created_at),
                "owned_by": tenant if r.tenant == tenant else "public",
                "parent": info["name"],
                "version": r.version,
                "kind": r.kind.value,
                "rank": r.rank,
                "language": r.language,
                "user": r.user,
            }
        )
    return {"object": "list", "data": data}
