"""Honest health and complete metrics (issue 14).

* ``/readyz`` turns 503, saying why, when no replica answered a health ping (a round trip
  through its engine thread) within the window, and 200 again once one does; ``/healthz`` stays
  fast all along. Before, ``/readyz`` only read a cached ``model_info`` and stayed 200 while the
  only replica was frozen.
* ``flora_requests_total{tenant,endpoint,status}`` counts every response once with the status
  actually sent, refusals before admission and failures while rendering included; errors inside
  a stream whose 200 already went out count in ``flora_stream_errors_total{tenant,code}``.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter_registry import BaseModelCatalog, Registry
from adapter_registry.blobs import LocalBlobStore
from adapter_registry.index.sqlite import SqliteIndex
from flora.model import ModelArgs
from flora.serve import responses
from flora.serve.backends import LocalBackend
from flora.serve.config import LimitsConfig, ServeArgs
from flora.serve.ingress import IngressState, build_ingress_app
from flora.serve.wire import GenerateCall, StreamChunk
from tests.serve.conftest import ADMIN_KEY, MODEL_NAME, Stack
from tests.servers import http_server

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"model": "base", "prompt": "def f(x):", "max_tokens": 2}


@contextmanager
def ingress(stack: Stack, **overrides: Any) -> Iterator[tuple[str, IngressState]]:
    """A second ingress over ``stack``'s registry and replica, with other ServeArgs."""
    args = ServeArgs.model_validate(stack.args.model_dump() | overrides)
    app = build_ingress_app(stack.registry, LocalBackend(stack.core), args)
    with http_server(app) as url:
        yield url, app.state.ingress


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def requests_total(url: str) -> Counter:
    """``flora_requests_total`` as {(tenant, endpoint, status): count}."""
    text = httpx.get(url + "/metrics", headers=ADMIN, timeout=30).text
    found: Counter = Counter()
    for match in re.finditer(r"^flora_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match[1]))
        found[(labels["tenant"], labels["endpoint"], labels["status"])] = int(float(match[2]))
    return found


def scraped(url: str, metric: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", headers=ADMIN, timeout=30).text
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(metric + "{")
    }


# --- /readyz ------------------------------------------------------------------------------------
def test_readyz_fails_while_the_engine_is_frozen_and_recovers(stack: Stack):
    timeout_s, window_s = 0.5, 2.0
    with ingress(stack, ready_ping_timeout_s=timeout_s, ready_window_s=window_s) as (url, state):
        assert (state.health.timeout_s, state.health.window_s) == (timeout_s, window_s)
        ready = httpx.get(url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.json()["replica"] == "ok" and ready.json()["model"] == MODEL_NAME

        thaw = threading.Event()
        stack.core.engine.call(lambda: thaw.wait(60))  # the engine thread, frozen for real
        try:
            frozen_at = time.monotonic()
            healthz: list[float] = []
            while True:
                started = time.monotonic()
                assert httpx.get(url + "/healthz", timeout=5).json() == {"status": "ok"}
                healthz.append(time.monotonic() - started)
                ready = httpx.get(url + "/readyz", timeout=30)
                if ready.status_code == 503:
                    break
                assert ready.status_code == 200, ready.text
                assert time.monotonic() - frozen_at < window_s + timeout_s + 3, ready.text
                time.sleep(0.1)
            assert time.monotonic() - frozen_at >= window_s  # one slow ping does not flip it
            why = ready.json()["replica"]
            assert "no replica answered a health ping" in why and "within 0.5s" in why, why
            assert ready.json()["index"] == "ok" and ready.json()["store"] == "ok"
            assert max(healthz) < 1.0, healthz  # liveness never waits on the engine
        finally:
            thaw.set()

        deadline = time.monotonic() + 10
        while (ready := httpx.get(url + "/readyz", timeout=30)).status_code != 200:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.1)
        assert ready.json()["replica"] == "ok"
    # the timed-out pings left the engine loop running: it still serves
    assert stack.core.engine.running
    key = stack.registry.create_tenant("after-freeze")[1]
    answer = httpx.post(stack.url + "/v1/completions", json=BODY, headers=bearer(key), timeout=60)
    assert answer.status_code == 200, answer.text


def test_readyz_says_so_when_the_engine_stopped(tmp_path: Path, micro_dir: Path):
    own = Stack(tmp_path, micro_dir)
    try:
        with ingress(own, ready_ping_timeout_s=0.5, ready_window_s=0.5) as (url, _):
            assert httpx.get(url + "/readyz", timeout=30).status_code == 200
            own.core.engine.shutdown()
            time.sleep(0.6)
            ready = httpx.get(url + "/readyz", timeout=30)
            assert ready.status_code == 503, ready.text
            assert "EngineStoppedError" in ready.json()["replica"], ready.text
    finally:
        own.close()


# --- flora_requests_total -------------------------------------------------------------------------
def test_every_response_is_counted_once_with_the_status_sent(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
):
    """401, 400, 403, 404, 413, 429 and a 500 while rendering, beside 200s streamed or not.

    No real request makes the renderer fail: the engine's output is JSON-safe by construction
    (token text is ``str``, log-probabilities come from finite logits; the non-finite ones a
    numerically broken adapter would give are refused by the replica). So the 500 comes from the
    smallest patch that reaches the real renderer: ``Reply.body`` returns a NaN, which
    ``JSONResponse`` (``allow_nan=False``) refuses, after the request has finished.
    """
    acme = stack.registry.create_tenant("metrics-acme")[1]
    globex = stack.registry.create_tenant("metrics-globex")[1]
    limits = LimitsConfig(requests_per_second=0.001, burst=3)
    with ingress(stack, limits=limits, max_request_bytes=2048) as (url, _):

        def post(key: str | None, body: Any, path: str = "/v1/completions") -> httpx.Response:
            headers = bearer(key) if key else {}
            if isinstance(body, bytes):
                headers["Content-Type"] = "application/json"
                return httpx.post(url + path, content=body, headers=headers, timeout=60)
            return httpx.post(url + path, json=body, headers=headers, timeout=60)

        before = requests_total(url)
        statuses = [
            post("flr_wrong", BODY).status_code,  # 401: no tenant
            post(ADMIN_KEY, BODY).status_code,  # 403: the admin is no tenant
            post(acme, BODY | {"max_tokens": -1}).status_code,  # 400: a bad field
            post(acme, b'{"model": "base", "prompt": ').status_code,  # 400: not JSON
            post(acme, BODY | {"model": "nope"}).status_code,  # 404: unknown model
            post(acme, BODY | {"prompt": "x" * 4096}).status_code,  # 413
            post(acme, BODY).status_code,  # 200
            post(acme, BODY | {"stream": True}).status_code,  # 200, streamed
            post(globex, BODY).status_code,  # 200
            post(globex, BODY).status_code,  # 200
            post(globex, BODY).status_code,  # 200
            post(globex, BODY).status_code,  # 429: over the burst
            httpx.get(url + "/metrics", headers=bearer(globex)).status_code,  # 403
            httpx.get(url + "/nowhere").status_code,  # 404
            httpx.get(url + "/healthz").status_code,
        ]
        assert statuses == [401, 403, 400, 400, 404, 413, *[200] * 5, 429, 403, 404, 200]
        # a 500 while rendering a finished request (it was counted as a 200 before)
        with monkeypatch.context() as patch:
            patch.setattr(responses.Reply, "body", lambda self: {"logprob": float("nan")})
            broken = post(acme, BODY | {"max_tokens": 1})
        assert broken.status_code == 500, broken.text
        assert broken.json()["error"]["code"] == "internal_error"
        counted = requests_total(url) - before

    a, g = "metrics-acme", "metrics-globex"
    assert counted == Counter(
        {
            ("none", "completions", "401"): 1,
            ("none", "completions", "403"): 1,
            (a, "completions", "400"): 1,
            # the body is parsed before the API key is checked: nobody was authenticated yet
            ("none", "completions", "400"): 1,
            (a, "completions", "404"): 1,
            ("none", "completions", "413"): 1,  # refused before anything was read
            (a, "completions", "200"): 2,
            (g, "completions", "200"): 3,
            (g, "completions", "429"): 1,
            (g, "metrics", "403"): 1,
            ("none", "other", "404"): 1,
            ("none", "health", "200"): 1,
            (a, "completions", "500"): 1,
            ("none", "metrics", "200"): 1,  # the first scrape
        }
    ), counted


def test_endpoints_are_labelled_by_route(stack: Stack):
    key = stack.registry.create_tenant("labels")[1]
    with ingress(stack) as (url, _):
        before = requests_total(url)
        chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert httpx.post(url + "/tenants/labels/v1/chat/completions", json=chat,
                          headers=bearer(key), timeout=60).status_code == 200  # fmt: skip
        assert httpx.get(url + "/v1/models", headers=bearer(key)).status_code == 200
        assert httpx.get(url + "/v1/adapters", headers=bearer(key)).status_code == 200
        assert httpx.get(url + "/v1/adapters/nope", headers=bearer(key)).status_code == 404
        assert httpx.get(url + "/v1/tenants", headers=ADMIN).status_code == 200
        assert httpx.get(url + "/readyz", timeout=30).status_code == 200
        counted = requests_total(url) - before
    assert counted == Counter(
        {
            ("labels", "chat", "200"): 1,
            ("labels", "models", "200"): 1,
            ("labels", "adapters", "200"): 1,
            ("labels", "adapters", "404"): 1,
            ("none", "tenants", "200"): 1,
            ("none", "health", "200"): 1,
            ("none", "metrics", "200"): 1,
        }
    ), counted


# --- errors inside a stream -----------------------------------------------------------------------
class _Backend:
    """A replica that sends one token, then ``then``: an error chunk, or an exception.

    A stand-in, not a real replica: an error *after* tokens went out needs a replica that
    fails mid-stream on cue (tests/e2e and the slow fault runs kill real ones; engine errors
    come at a request's first step, before its 200)."""

    def __init__(self, micro_dir: Path, then: StreamChunk | Exception):
        self.then = then
        config = ModelArgs.from_dir(micro_dir).to_hf_config()
        # "limits": {} is the default adapter limits
        self.info = {"name": MODEL_NAME, "config": config, "max_model_len": 128, "limits": {}}

    async def stream(self, call: GenerateCall) -> AsyncIterator[StreamChunk]:
        yield StreamChunk(token_ids=(7,), text="x", prompt_tokens=3, completion_tokens=1)
        if isinstance(self.then, Exception):
            raise self.then
        yield self.then

    async def model_info(self) -> dict[str, Any]:
        return self.info

    async def ping(self) -> None:
        return None


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (422, "adapter_numerical_error", "invalid_request_error"),
        (400, "adapter_not_servable", "invalid_request_error"),
        (503, "unavailable", "server_error"),
    ],
)
def test_errors_inside_a_stream_are_typed_by_status_and_counted_apart(
    tmp_path: Path, micro_dir: Path, status: int, code: str, kind: str
):
    registry = Registry(SqliteIndex(tmp_path / "index.sqlite3"), LocalBlobStore(tmp_path / "b"),
                        BaseModelCatalog(), admin_key=ADMIN_KEY)  # fmt: skip
    key = registry.create_tenant("acme")[1]
    error = StreamChunk.failure(status, code, "the adapter broke")
    app = build_ingress_app(registry, _Backend(micro_dir, error), ServeArgs(model=str(micro_dir)))
    with http_server(app) as url:
        answer = httpx.post(url + "/v1/completions", json=BODY | {"stream": True},
                            headers=bearer(key), timeout=60)  # fmt: skip
        assert answer.status_code == 200
        events = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        sent = json.loads(events[-2])["error"]
        assert (sent["type"], sent["code"]) == (kind, code), sent
        assert requests_total(url)[("acme", "completions", "200")] == 1
        errors = scraped(url, "flora_stream_errors_total")
        assert errors == {f'flora_stream_errors_total{{code="{code}",tenant="acme"}}': 1.0}


def test_an_exception_after_the_200_counts_as_a_stream_error(tmp_path: Path, micro_dir: Path):
    registry = Registry(SqliteIndex(tmp_path / "index.sqlite3"), LocalBlobStore(tmp_path / "b"),
                        BaseModelCatalog(), admin_key=ADMIN_KEY)  # fmt: skip
    key = registry.create_tenant("acme")[1]
    backend = _Backend(micro_dir, RuntimeError("the replica broke mid-stream"))
    app = build_ingress_app(registry, backend, ServeArgs(model=str(micro_dir)))
    with http_server(app) as url:
        with contextlib.suppress(httpx.HTTPError):  # the stream ends early, however it shows
            httpx.post(url + "/v1/completions", json=BODY | {"stream": True},
                       headers=bearer(key), timeout=60).read()  # fmt: skip
        assert requests_total(url)[("acme", "completions", "200")] == 1
        assert requests_total(url)[("acme", "completions", "500")] == 0
        errors = scraped(url, "flora_stream_errors_total")
        assert errors == {'flora_stream_errors_total{code="internal_error",tenant="acme"}': 1.0}
