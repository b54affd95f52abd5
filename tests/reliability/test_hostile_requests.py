"""Hostile requests at the serving ingress, over real HTTP to a real engine and registry.

Every route that takes a body (completions, chat, the per-tenant completions, adapter upload and
import, tenant creation, key creation) gets oversized bodies with and without Content-Length,
100k-deep JSON, invalid UTF-8, wrong content types and empty bodies; the OpenAI routes also get
out-of-range numbers, prompts at and over the context, out-of-vocabulary token ids, too many stop
strings and Unicode edge cases. Each answer must be an OpenAI-shaped 4xx (never a 5xx), and after
each batch a normal request must still be served with nothing left behind in the engine or the
admission limiter.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

from adapter_registry.formats import CONFIG_FILE, WEIGHTS_FILE
from flora.adapters import AdapterKind
from flora.serve.config import LimitsConfig
from tests.serve.conftest import ADMIN_KEY, Stack, random_adapter_dir

ADAPTER_LIMIT = 1 << 20  # the registry's adapter size limit in this module's stack
# a prompt, a chat, a tenant creation, an import: every route that parses a JSON body
JSON_ROUTES = {
    "completions": ("/v1/completions", "tenant"),
    "chat": ("/v1/chat/completions", "tenant"),
    "tenant-completions": ("/tenants/acme/v1/completions", "tenant"),
    "tenant-chat": ("/tenants/acme/v1/chat/completions", "tenant"),
    "adapter-import": ("/v1/adapters", "tenant"),
    "tenant-create": ("/v1/tenants", "admin"),
}
# key creation reads no body: a declared oversized one is refused, an undeclared one is ignored
BODY_ROUTES = JSON_ROUTES | {"key-create": ("/v1/tenants/acme/keys", "admin")}
GENERATION_ROUTES = ("/v1/completions", "/tenants/acme/v1/completions")

# requests come back to back over one connection: the rate limit (tests/serve) is not under test
UNLIMITED = LimitsConfig(requests_per_second=10_000, burst=10_000)


class World:
    def __init__(self, stack: Stack, key: str, adapter_dir: Path):
        self.stack, self.key, self.adapter_dir = stack, key, adapter_dir
        self.http = httpx.Client(base_url=stack.url, timeout=60)  # one connection, reused

    def headers(self, who: str, content_type: str | None = "application/json") -> dict:
        key = self.key if who == "tenant" else ADMIN_KEY
        headers = {"Authorization": f"Bearer {key}"}
        return headers | ({"Content-Type": content_type} if content_type else {})

    def post(
        self, path: str, who: str = "tenant", *, fresh: bool = False, **kwargs: Any
    ) -> httpx.Response:
        """POST as ``who``; ``fresh`` uses a connection of its own (the server may close one
        that it cut off mid-body)."""
        kwargs["headers"] = kwargs.get("headers") or self.headers(who)
        if fresh:
            return httpx.post(self.stack.url + path, timeout=60, **kwargs)
        return self.http.post(path, **kwargs)

    def complete(self, body: dict, path: str = "/v1/completions") -> httpx.Response:
        """``body`` as JSON, NaN and Infinity included (httpx's ``json=`` refuses them)."""
        return self.post(path, content=json.dumps({"model": "base", "max_tokens": 2} | body))

    def tenants(self) -> list[str]:
        response = self.http.get("/v1/tenants", headers=self.headers("admin"))
        return [t["name"] for t in response.json()]

    @property
    def max_request_bytes(self) -> int:
        return self.stack.args.max_request_bytes

    @property
    def context(self) -> int:
        return self.stack.core.max_model_len


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, micro_dir: Path) -> Iterator[World]:
    """A stack of its own (small adapter limit), tenant acme with the adapter ``py``."""
    root = tmp_path_factory.mktemp("hostile")
    stack = Stack(root / "stack", micro_dir, UNLIMITED, max_adapter_bytes=ADAPTER_LIMIT)
    with stack.client(ADMIN_KEY) as admin:
        _, key = admin.create_tenant("acme")
    adapter = random_adapter_dir(root / "py", AdapterKind.LORA, 2, 1, stack.model_args)
    with stack.client(key) as acme:
        acme.register(adapter, "py")
    world = World(stack, key, adapter)
    yield world
    world.http.close()
    stack.close()


def error_of(response: httpx.Response, *statuses: int) -> dict:
    """The OpenAI-shaped error of a refusal with one of ``statuses``."""
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"], error
    return error


def assert_still_serving(world: World) -> None:
    """A normal request (base and adapter) is served; nothing is left in the engine or limiter."""
    for model in ("base", "py"):
        ok = world.complete({"model": model, "prompt": "def f():", "temperature": 0})
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] >= 1
    stats = asyncio.run(world.stack.core.engine.stats())  # read on the engine thread
    assert not stats["running"] and not stats["waiting"]
    assert world.stack.core.engine.running
    ingress = world.http.get("/healthz")
    assert ingress.status_code == 200
    assert world.stack.app.state.ingress.limiter.in_flight == 0


# --- body size ------------------------------------------------------------------------------------
def _limit(world: World, path: str) -> int:
    return ADAPTER_LIMIT + (1 << 20) if path == "/v1/adapters" else world.max_request_bytes


def _chunks(total: int, size: int = 256 << 10) -> Iterator[bytes]:
    yield b'{"prompt": "'
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"a" * n


@pytest.mark.parametrize("route", sorted(BODY_ROUTES))
def test_declared_oversized_bodies_get_413(world: World, route: str) -> None:
    path, who = BODY_ROUTES[route]
    limit = _limit(world, path)
    response = world.post(path, who, content=b" " * (limit + 1), fresh=True)
    assert f"over {limit} bytes" in error_of(response, 413)["message"]
    # a length far past anything, with no body behind it: refused before a byte is read
    host = urlparse(world.stack.url)
    with socket.create_connection((host.hostname, host.port), timeout=10) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {world.key}\r\nContent-Length: {10**15}\r\n\r\n".encode()
        )
        assert s.recv(64).startswith(b"HTTP/1.1 413")
    assert_still_serving(world)


@pytest.mark.parametrize("route", sorted(JSON_ROUTES))
def test_undeclared_oversized_bodies_are_cut_off_with_413(world: World, route: str) -> None:
    path, who = JSON_ROUTES[route]
    limit = _limit(world, path)
    response = world.post(path, who, content=_chunks(limit + (1 << 20)), fresh=True)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    assert f"over {limit} bytes" in error_of(response, 413)["message"]
    assert_still_serving(world)


def test_a_multipart_upload_without_length_is_cut_off_with_413(world: World) -> None:
    def body() -> Iterator[bytes]:
        yield b'--xyz\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'
        yield from _chunks(ADAPTER_LIMIT + (2 << 20))

    headers = world.headers("tenant", "multipart/form-data; boundary=xyz")
    response = world.post("/v1/adapters", content=body(), headers=headers, fresh=True)
    error_of(response, 413)
    with world.stack.client(world.key) as acme:
        assert [r.name for r in acme.list()] == ["py"]
    assert_still_serving(world)


# --- malformed bodies -----------------------------------------------------------------------------
DEPTH = 100_000
MALFORMED = {
    "nested-arrays": b"[" * DEPTH + b"]" * DEPTH,
    "nested-objects": b'{"a":' * DEPTH + b"1" + b"}" * DEPTH,
    "nested-in-prompt": b'{"model":"base","prompt":' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "invalid-utf8": b'{"model": "base", "prompt": "\xff\xfe\xc3(", "name": "\xff"}',
    "invalid-utf8-overlong": b'{"model": "base", "prompt": "\xc0\xaf", "name": "x"}',
    "truncated": b'{"model": "base", "prompt": "x',
    "empty": b"",
    "not-an-object": b'"just a string"',
    "null": b"null",
    "nan-everywhere": b'{"model": NaN, "prompt": NaN, "name": NaN, "max_tokens": NaN}',
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_json_is_a_400_on_every_route(world: World, case: str) -> None:
    for route, (path, who) in sorted(JSON_ROUTES.items()):
        response = world.post(path, who, content=MALFORMED[case])
        error = error_of(response, 400, 422)
        assert error["type"] == "invalid_request_error", (route, error)
    assert_still_serving(world)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/xml", None],
)
def test_wrong_content_type_is_a_400(world: World, content_type: str | None) -> None:
    body = b'{"model": "base", "prompt": "x", "name": "fresh", "max_tokens": 1}'
    for path, who in JSON_ROUTES.values():
        response = world.post(path, who, content=body, headers=world.headers(who, content_type))
        error_of(response, 400, 415, 422)
    assert world.tenants() == ["acme"]  # nothing was created along the way
    assert_still_serving(world)


# --- numbers and parameters -----------------------------------------------------------------------
BAD_PARAMETERS = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"max_tokens": 1e400}, "max_tokens"),  # json: Infinity
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 1e308}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.0000001}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"n": 10**20}, "n"),
    ({"n": 0}, "n"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"seed": 10**400}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop": ["x"] * 10_000}, "stop"),
    ({"stop": 5}, "stop"),
    ({"presence_penalty": float("inf")}, "penalty"),
]
NON_FINITE = [b"NaN", b"Infinity", b"-Infinity"]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_out_of_range_parameters_are_400s_naming_the_field(world: World, route: str) -> None:
    chat = route.endswith("chat/completions")
    base = {"messages": [{"role": "user", "content": "x"}]} if chat else {"prompt": "x"}
    for extra, field in BAD_PARAMETERS:
        response = world.complete(base | extra, route)
        assert field in error_of(response, 400)["message"], (extra, response.text)
    for number in NON_FINITE:
        for field in (b"max_tokens", b"temperature", b"top_p", b"seed", b"n"):
            body = b'{"prompt": "x", "messages": [{"role": "user", "content": "x"}], "%s": %s}'
            response = world.post(route, content=body % (field, number))
            error_of(response, 400)
    bad_logprobs = [{"logprobs": True, "top_logprobs": 6}, {"logprobs": True, "top_logprobs": -1}]
    if not chat:
        bad_logprobs = [{"logprobs": 6}, {"logprobs": -1}, {"logprobs": 10**30}]
    for extra in bad_logprobs:
        error = error_of(world.complete(base | extra, route), 400)
        assert "logprobs" in error["message"], error
    assert_still_serving(world)


def test_parameters_at_their_limits_are_served(world: World) -> None:
    for extra in (
        {"seed": 2**64 - 1, "temperature": 1.0},
        {"seed": -(2**63), "temperature": 1.0},
        {"logprobs": 5},
        {"stop": ["a", "b", "c", "d"]},
        {"top_k": 10**12, "temperature": 1.0},  # more than the vocabulary: keeps all
        {"top_p": 1e-300, "temperature": 1.0},  # the single most likely token
        {"temperature": 2.0},
        {"max_tokens": world.context - 2},
    ):
        response = world.complete({"prompt": "x", "max_tokens": 2} | extra)
        assert response.status_code == 200, (extra, response.text)
    assert_still_serving(world)


# --- the context limit ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", GENERATION_ROUTES)
def test_prompts_at_the_context_are_served_and_over_it_refused(world: World, path: str) -> None:
    context = world.context
    # prompt + max_tokens == context: served, and it never runs past the context
    body = {"prompt": [1] * (context - 4), "max_tokens": 4, "temperature": 0}
    usage = world.complete(body, path).json()["usage"]
    assert usage["prompt_tokens"] == context - 4 and usage["total_tokens"] <= context
    # one token of room: served with at most one token
    body = {"prompt": [1] * (context - 1), "max_tokens": 1, "temperature": 0}
    assert world.complete(body, path).json()["usage"]["total_tokens"] <= context
    # prompt + max_tokens over the context: served, but cut at the context (finish_reason
    # "length"), as docs/reliability.md says; the request never gets more than the context
    body = {"prompt": [1] * (context - 2), "max_tokens": 50, "temperature": 0, "stop": None}
    answer = world.complete(body, path).json()
    assert answer["usage"]["total_tokens"] <= context
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")
    # a prompt that fills the context (as ids or text): 400 naming the limit
    for prompt in ([1] * context, [1] * (4 * context), "x " * (4 * context)):
        error = error_of(world.complete({"prompt": prompt}, path), 400)
        assert f"context is {context} tokens" in error["message"], error
    # max_tokens that alone fills the context: 400 naming it
    error = error_of(world.complete({"prompt": "x", "max_tokens": context}, path), 400)
    assert f"({context} tokens)" in error["message"] and error["param"] == "max_tokens"
    long_chat = {"messages": [{"role": "user", "content": "x " * (4 * context)}]}
    error = error_of(
        world.post(path.replace("completions", "chat/completions"), json=long_chat), 400
    )
    assert f"context is {context} tokens" in error["message"]
    assert_still_serving(world)


def test_token_arrays_outside_the_vocabulary_are_400s(world: World) -> None:
    vocab = world.stack.model_args.vocab_size
    for prompt in ([vocab], [-1], [1, 2, 2**70], [2**63], [10**400]):
        error = error_of(world.complete({"prompt": prompt}), 400)
        assert "vocabulary" in error["message"] or "prompt" in error["message"], error
    for prompt in ([], [[1, 2]], [1.5], [1, "a"], [None], {"a": 1}):
        error_of(world.complete({"prompt": prompt}), 400)
    assert world.complete({"prompt": [vocab - 1, 0]}).status_code == 200
    assert_still_serving(world)


# --- Unicode --------------------------------------------------------------------------------------
SERVED_TEXT = {
    "nul": "a\u0000b",
    "astral-pair": "\ud83d\ude00 smile",  # a valid surrogate pair (JSON-escaped): U+1F600
    "bidi-override": "\u202eevil\u202c",
    "bom-and-zero-width": "\ufeff\u200bx\u200d",
    "noncharacter": "x\uffff\ufffe",
    "combining": "e" + "\u0301" * 40,
}
REFUSED_TEXT = {
    "lone-high": "a\ud800b",
    "lone-low": "\udc00",
    "reversed-pair": "\ude00\ud83d",
}


def _escaped(value: dict) -> bytes:
    """JSON with every non-ASCII character as a \\u escape, as hostile clients send lone
    surrogates (raw bytes cannot hold them; the escapes can)."""
    return json.dumps(value, ensure_ascii=True).encode("ascii")


@pytest.mark.parametrize("where", ["prompt", "chat", "stop"])
def test_unicode_edge_cases_are_served_or_refused_never_500(world: World, where: str) -> None:
    def body(text: str) -> tuple[str, bytes]:
        if where == "prompt":
            return "/v1/completions", _escaped({"model": "base", "prompt": text, "max_tokens": 2})
        if where == "chat":
            chat = {"messages": [{"role": "user", "content": text}], "max_tokens": 2}
            return "/v1/chat/completions", _escaped(chat)
        return "/v1/completions", _escaped({"prompt": "x", "stop": [text], "max_tokens": 2})

    for case, text in SERVED_TEXT.items():
        path, content = body(text)
        response = world.post(path, content=content)
        assert response.status_code == 200, (case, response.text)
    for case, text in REFUSED_TEXT.items():
        path, content = body(text)
        response = world.post(path, content=content)
        if where == "stop":  # never tokenised: a stop string that cannot match, served
            assert response.status_code in (200, 400), (case, response.text)
            continue
        assert "surrogate" in error_of(response, 400)["message"], case
    for stream in (True,):  # the streamed path refuses before its first event
        path, content = body(REFUSED_TEXT["lone-high"])
        if where != "stop":
            payload = content[:-1] + b', "stream": true}'
            assert world.post(path, content=payload).status_code == 400, stream
    assert_still_serving(world)


HOSTILE_NAMES = ["a\u0000b", "a\ud800", "\u0430cme", "ａｃｍｅ", "a/b", "..", "a b", "A" * 65]


def test_unicode_and_path_tricks_in_names_are_400s(world: World) -> None:
    for name in HOSTILE_NAMES:
        for path, body in (
            ("/v1/tenants", {"name": name}),
            ("/v1/completions", {"model": "base", "prompt": "x", "user": name}),
            ("/v1/completions", {"model": "base", "prompt": "x", "language": name}),
            ("/v1/adapters", {"name": name, "uri": "s3://bucket/p"}),
        ):
            who = "admin" if path == "/v1/tenants" else "tenant"
            response = world.post(path, who, content=_escaped(body))
            error_of(response, 400)
        response = world.post("/v1/completions", content=_escaped({"model": name, "prompt": "x"}))
        error_of(response, 404)  # an unknown model, whatever its spelling
    assert world.tenants() == ["acme"]
    assert_still_serving(world)


def test_hostile_multipart_uploads_are_refused(world: World) -> None:
    config = (world.adapter_dir / CONFIG_FILE).read_bytes()
    weights = (world.adapter_dir / WEIGHTS_FILE).read_bytes()
    files = {"config": ("c", config), "weights": ("w", weights)}
    headers = {"Authorization": f"Bearer {world.key}"}
    url = world.stack.url + "/v1/adapters"
    cases = [
        ({"name": "x"}, {"config": ("c", b"\xff\xfe"), "weights": ("w", weights)}),
        ({"name": "x"}, {"config": ("c", b"[" * DEPTH + b"]" * DEPTH), "weights": ("w", weights)}),
        ({"name": "x"}, {"config": ("c", config), "weights": ("w", b"\0" * 64)}),
        ({"name": "x"}, {"config": ("c", config)}),
        ({"name": "../acme"}, files),
        ({"name": "x"}, {"name": ("n", b"x"), **files}),  # more files than allowed
    ]
    for fields, upload in cases:
        response = httpx.post(url, data=fields, files=upload, headers=headers, timeout=60)
        error_of(response, 400, 413, 422)
    with world.stack.client(world.key) as acme:
        assert [r.name for r in acme.list()] == ["py"]
    assert_still_serving(world)
