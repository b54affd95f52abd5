"""Every HTTP response of the ingress counted once, with the status actually sent."""

from __future__ import annotations

import asyncio
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flora.serve.metrics import ServeMetrics

# the endpoint label of flora_requests_total: a fixed set, whatever path a client sends
_ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/v1/models": "models",
    "/healthz": "health",
    "/readyz": "health",
    "/metrics": "metrics",
    "/v1/base-models": "tenants",
}
_OPENAI = ("completions", "chat", "models")  # the routes also served under /tenants/{tenant}
_TENANT_PREFIX = re.compile(r"/tenants/[^/]+(?=/v1/)")


def endpoint_of(scope: Scope) -> str:
    """completions, chat, models, adapters, tenants, health, metrics, or other."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    if prefix := _TENANT_PREFIX.match(path):
        endpoint = _ENDPOINTS.get(path[prefix.end() :])
        return endpoint if endpoint in _OPENAI else "other"
    if path in _ENDPOINTS:
        return _ENDPOINTS[path]
    for route, endpoint in (("/v1/adapters", "adapters"), ("/v1/tenants", "tenants")):
        if path == route or path.startswith(route + "/"):
            return endpoint
    return "other"


class RequestCounter:
    """``flora_requests_total{tenant,endpoint,status}``: every HTTP response once, with the
    status actually sent (seen in ``http.response.start``), whichever layer answered: a
    pre-admission refusal (401, 400, 404, 413, 429), a route, or a failure while rendering.

    Installed outermost (only Starlette's ServerErrorMiddleware is outside it): an exception
    that escapes before a response started counts as the 500 that middleware then sends; one
    after the start (a stream's 200 went out) counts in ``flora_stream_errors_total``; a request
    cancelled before any response (the client left) counts as 499. The tenant is whoever the
    auth dependencies authenticated (``scope["state"]["tenant"]``), else ``none``.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})  # the dict behind request.state
        endpoint = endpoint_of(scope)
        status: int | None = None
        client_gone = False

        def tenant() -> str | None:  # set by the auth dependency once it authenticated
            who = state.get("tenant")
            return who if isinstance(who, str) else None

        def count(sent: int) -> None:
            self.metrics.request_done(tenant(), endpoint, sent)

        async def counted(message: Message) -> None:
            nonlocal status, client_gone
            if message["type"] == "http.response.start" and status is None:
                status = message["status"]
                count(status)
            try:
                await send(message)
            except BaseException:
                client_gone = True
                raise

        try:
            await self.app(scope, receive, counted)
        except asyncio.CancelledError:
            if status is None:
                count(499)
            raise
        except BaseException:
            if status is None:
                count(500)
            elif not client_gone:
                self.metrics.stream_error(tenant(), "internal_error")
            raise
