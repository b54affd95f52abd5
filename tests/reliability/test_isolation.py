"""Tenant isolation on every endpoint of the serving ingress, over real HTTP.

Tenant acme holds a key; globex owns adapters acme must never see, use or delete; the admin owns
a public adapter everyone may use and only the admin may delete. Another tenant's adapter answers
exactly like a name that does not exist (404, same code, same message shape), so a key cannot
probe which names other tenants use. A route that names a tenant in its path answers 403 to any
other tenant's key (the name is the caller's own input: nothing about that tenant is disclosed).
Keys are stored only as SHA-256 hashes (SQLite and Redis scanned for the raw key), and adapter
names that could climb out of a tenant's blob prefix are refused before any store call.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis

from adapter_registry import InvalidName, Registry
from adapter_registry.blobs import BlobStore, LocalBlobStore, S3BlobStore
from adapter_registry.index.redis import RedisIndex
from adapter_registry.keys import hash_key
from adapter_registry.registry import AdapterMeta, Principal
from flora.adapters import AdapterKind
from flora.serve.config import LimitsConfig
from tests.serve.conftest import ADMIN_KEY, MODEL_NAME, Stack, random_adapter_dir
from tests.servers import RedisServer

# requests come back to back over one connection: the rate limit (tests/serve) is not under test
UNLIMITED = LimitsConfig(requests_per_second=10_000, burst=10_000)


class World:
    def __init__(self, stack: Stack, keys: dict[str, str], adapter_dir: Path):
        self.stack, self.keys, self.adapter_dir = stack, keys, adapter_dir
        self.http = httpx.Client(base_url=stack.url, timeout=60)  # one connection, reused

    def call(self, method: str, path: str, who: str | None, **kwargs: Any) -> httpx.Response:
        key = ADMIN_KEY if who == "admin" else self.keys.get(who or "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return self.http.request(method, path, headers=headers, **kwargs)

    def names(self, who: str, path: str = "/v1/adapters", **params: Any) -> set[str]:
        response = self.call("GET", path, who, params=params)
        assert response.status_code == 200, response.text
        return {a.get("name", a.get("id")) for a in response.json()["data"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, micro_dir: Path) -> Iterator[World]:
    """acme owns ``mine``; globex owns ``secret`` (python, user bob) and ``other``; the admin
    owns the public ``pub``."""
    root = tmp_path_factory.mktemp("isolation")
    stack = Stack(root / "stack", micro_dir, UNLIMITED)
    with stack.client(ADMIN_KEY) as admin:
        keys = {name: admin.create_tenant(name)[1] for name in ("acme", "globex")}
        adapter = random_adapter_dir(root / "a", AdapterKind.LORA, 2, 1, stack.model_args)
        admin.register(adapter, "pub")
    with stack.client(keys["acme"]) as acme, stack.client(keys["globex"]) as globex:
        acme.register(adapter, "mine")
        globex.register(adapter, "secret", language="python", user="bob")
        globex.register(adapter, "other")
    world = World(stack, keys, adapter)
    yield world
    world.http.close()
    stack.close()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:400])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    return error


# --- another tenant's adapters do not exist for you ----------------------------------------------
def _generate(path: str, model: str) -> tuple[str, str, dict]:
    if "chat" in path:
        return (
            "POST",
            path,
            {"json": {"model": model, "messages": [{"role": "user", "content": "x"}]}},
        )
    return "POST", path, {"json": {"model": model, "prompt": "x", "max_tokens": 1}}


# (method, path, kwargs) for a name; {name} is replaced by globex's adapter or by a made-up one
BY_NAME = {
    "show": lambda n: ("GET", f"/v1/adapters/{n}", {}),
    "show-version": lambda n: ("GET", f"/v1/adapters/{n}@1", {}),
    "resolve": lambda n: ("GET", "/v1/adapters/resolve", {"params": {"adapter": n}}),
    "resolve-version": lambda n: ("GET", "/v1/adapters/resolve", {"params": {"adapter": f"{n}@1"}}),
    "delete": lambda n: ("DELETE", f"/v1/adapters/{n}", {}),
    "delete-version": lambda n: ("DELETE", f"/v1/adapters/{n}@1", {}),
    "completions": lambda n: _generate("/v1/completions", n),
    "completions-version": lambda n: _generate("/v1/completions", f"{n}@1"),
    "completions-base-prefix": lambda n: _generate("/v1/completions", f"base:{n}"),
    "completions-tenant-slash": lambda n: _generate("/v1/completions", f"globex/{n}"),
    "completions-scope-colon": lambda n: _generate("/v1/completions", f"globex:{n}"),
    "chat": lambda n: _generate("/v1/chat/completions", n),
    "own-route-completions": lambda n: _generate("/tenants/acme/v1/completions", n),
    "own-route-chat": lambda n: _generate("/tenants/acme/v1/chat/completions", n),
}


@pytest.mark.parametrize("route", sorted(BY_NAME))
def test_another_tenants_adapter_answers_like_a_missing_one(world: World, route: str) -> None:
    method, path, kwargs = BY_NAME[route]("secret")
    theirs = world.call(method, path, "acme", **kwargs)
    method, path, kwargs = BY_NAME[route]("nothere")
    missing = world.call(method, path, "acme", **kwargs)
    status = missing.status_code
    assert status in (400, 404), missing.text  # "globex:x" is not even a valid name
    error = error_of(theirs, status)
    expected = missing.json()["error"]
    assert error["code"] == expected["code"] and error["type"] == expected["type"]
    assert error["message"] == expected["message"].replace("nothere", "secret")
    assert "globex" not in error["message"] or "globex" in path + str(kwargs)
    # globex's adapter is untouched, and still serves globex
    assert {"secret", "other"} <= world.names("globex")
    ok = world.call("POST", "/v1/completions", "globex", json={"model": "secret", "prompt": "x"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/v1/adapters", {}),
        ("/v1/adapters", {"include_global": "true"}),
        ("/v1/adapters", {"user": "bob"}),
        ("/v1/adapters", {"language": "python", "include_global": "true"}),
        ("/v1/adapters", {"kind": "lora", "include_global": "true"}),
        ("/v1/models", {}),
        ("/tenants/acme/v1/models", {}),
    ],
)
def test_listings_never_show_another_tenants_adapters(world: World, path: str, params) -> None:
    seen = world.names("acme", path, **params)
    assert not seen & {"secret", "other"}
    if path.endswith("models") or (params.get("include_global") and not params.get("language")):
        assert {"mine", "pub"} <= seen
    response = world.call("GET", path, "acme", params=params)
    assert "globex" not in response.text and "bob" not in response.text


def test_implicit_resolution_never_picks_another_tenants_adapter(world: World) -> None:
    """globex's ``secret`` is for python and user bob: acme asking for both gets its own or base."""
    for params in ({"language": "python", "user": "bob"}, {"user": "bob"}, {"language": "python"}):
        response = world.call("GET", "/v1/adapters/resolve", "acme", params=params)
        assert response.status_code == 200, response.text
        adapter = response.json()["adapter"]
        assert adapter is None or adapter["tenant"] in ("acme", "_global"), adapter
        body = {"model": MODEL_NAME, "prompt": "def f():", "max_tokens": 1} | params
        served = world.call("POST", "/v1/completions", "acme", json=body)
        assert served.status_code == 200
        assert "secret" not in served.headers["x-flora-adapter"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/tenants/globex/v1/completions", {"prompt": "x", "max_tokens": 1}),
        (
            "POST",
            "/tenants/globex/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}]},
        ),
        ("GET", "/tenants/globex/v1/models", None),
        ("POST", "/tenants/nosuchtenant/v1/completions", {"prompt": "x", "max_tokens": 1}),
        ("GET", "/tenants/nosuchtenant/v1/models", None),
    ],
)
def test_another_tenants_path_answers_403(world: World, method: str, path: str, body) -> None:
    """The path names the tenant (the caller's own input), so 403 discloses nothing; a tenant
    that does not exist answers the same 403."""
    response = world.call(method, path, "acme", json=body)
    error = error_of(response, 403)
    assert error["type"] == "permission_error"
    assert "secret" not in response.text and "other" not in response.text


# --- admin-only routes ----------------------------------------------------------------------------
ADMIN_ROUTES = [
    ("POST", "/v1/tenants", {"name": "intruder"}),
    ("GET", "/v1/tenants", None),
    ("POST", "/v1/tenants/globex/keys", None),
    ("POST", "/v1/tenants/acme/keys", None),  # not even for itself
    ("POST", "/v1/tenants/intruder/keys", None),
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_refuse_tenant_keys_and_anonymous_callers(
    world: World, method: str, path: str, body
) -> None:
    keys_before = _key_hashes(world)
    error_of(world.call(method, path, "acme", json=body), 403)
    error_of(world.call(method, path, None, json=body), 401)
    assert _key_hashes(world) == keys_before  # no key was issued, no tenant created
    tenants = world.call("GET", "/v1/tenants", "admin").json()
    assert sorted(t["name"] for t in tenants) == ["acme", "globex"]


def test_completions_refuse_the_admin_key(world: World) -> None:
    body = {"model": "pub", "prompt": "x", "max_tokens": 1}
    for path in ("/v1/completions", "/tenants/acme/v1/completions"):
        error_of(world.call("POST", path, "admin", json=body), 403)


def test_metrics_name_tenants_only_for_the_admin(world: World) -> None:
    world.call("POST", "/v1/completions", "globex", json={"prompt": "x", "max_tokens": 1})
    response = world.call("GET", "/metrics", "acme")
    assert response.status_code == 403 and "globex" not in response.text
    assert 'tenant="globex"' in world.call("GET", "/metrics", "admin").text


# --- keys are stored as hashes only ---------------------------------------------------------------
def _key_hashes(world: World) -> set[str]:
    with sqlite3.connect(world.stack.registry.index.path) as db:  # type: ignore[attr-defined]
        return {h for (h,) in db.execute("SELECT hash FROM api_keys")}


def test_the_sqlite_index_holds_only_key_hashes(world: World) -> None:
    more = world.call("POST", "/v1/tenants/acme/keys", "admin").json()["api_key"]
    keys = [*world.keys.values(), more, ADMIN_KEY]
    path = Path(world.stack.registry.index.path)  # type: ignore[attr-defined]
    with sqlite3.connect(path) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        values = [
            str(v)
            for table in tables
            for row in db.execute(f'SELECT * FROM "{table}"')
            for v in row
        ]
    stored = "\n".join(values)
    for key in keys:
        assert key not in stored
        assert key.removeprefix("flr_") not in stored
    assert {hash_key(k) for k in keys[:-1]} <= set(values)
    for file in path.parent.glob(path.name + "*"):  # the database, its WAL and journal
        raw = file.read_bytes()
        assert not any(k.encode() in raw for k in keys), file


def test_the_redis_index_holds_only_key_hashes(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    try:
        index = RedisIndex(server.url, namespace=f"iso-{uuid.uuid4().hex[:6]}:")
        registry = Registry(index, LocalBlobStore(tmp_path / "blobs"), admin_key=ADMIN_KEY)
        _, first = registry.create_tenant("acme")
        keys = [first, registry.add_key("acme"), registry.add_key("acme")]
        assert registry.authenticate(keys[1]).tenant == "acme"
        client = redis.Redis.from_url(server.url)
        stored: list[bytes] = []
        for name in client.scan_iter(count=1000):
            stored.append(name)
            kind = client.type(name)
            if kind == b"string":
                stored.append(client.get(name))
            elif kind == b"hash":
                stored.extend(b for pair in client.hgetall(name).items() for b in pair)
            elif kind == b"set":
                stored.extend(client.smembers(name))
            elif kind == b"zset":
                stored.extend(client.zrange(name, 0, -1))
            elif kind == b"list":
                stored.extend(client.lrange(name, 0, -1))
        dump = b"\n".join(stored)
        assert stored
        for key in [*keys, ADMIN_KEY]:
            assert key.encode() not in dump
        assert all(hash_key(k).encode() in dump for k in keys)
        index.close()
    finally:
        server.stop()


# --- names cannot leave the tenant's prefix ------------------------------------------------------
ESCAPING_NAMES = [
    "..",
    "../globex/secret",
    "a/../../globex",
    "a/b",
    "/abs",
    "a%2Fb",
    "%2e%2e",
    "a\\b",
    "a\u2215b",  # division slash
    "a\uff0fb",  # fullwidth solidus
    "\uff0e\uff0e",  # fullwidth full stops
    "\u0430cme",  # Cyrillic a
    "a\u0000b",
    "a:b",
    "_global",
    ".hidden",
    "A",
    "a" * 65,
    "",
]


class RecordingStore(BlobStore):
    """The real store, with every call that would touch it written down."""

    def __init__(self, inner: BlobStore):
        self.inner, self.url, self.calls = inner, inner.url, []

    def uri(self, *args: Any) -> str:
        self.calls.append(("uri", args))
        return self.inner.uri(*args)

    def put(self, *args: Any) -> str:
        self.calls.append(("put", args))
        return self.inner.put(*args)

    def get(self, *args: Any) -> None:
        self.calls.append(("get", args))
        self.inner.get(*args)

    def delete(self, *args: Any) -> None:
        self.calls.append(("delete", args))
        self.inner.delete(*args)

    def ping(self) -> None:
        self.inner.ping()


@pytest.fixture
def recorded(world: World) -> Iterator[RecordingStore]:
    registry = world.stack.registry
    store, registry.blobs = registry.blobs, RecordingStore(registry.blobs)
    try:
        yield registry.blobs  # type: ignore[misc]
    finally:
        registry.blobs = store


def test_escaping_names_are_refused_before_any_store_call(world: World, recorded) -> None:
    registry = world.stack.registry
    files = {
        "config": ("adapter_config.json", (world.adapter_dir / "adapter_config.json").read_bytes()),
        "weights": ("w", (world.adapter_dir / "adapter_model.safetensors").read_bytes()),
    }
    principal = Principal("acme")
    for name in ESCAPING_NAMES:
        for who in ("acme", "admin"):
            upload = world.call("POST", "/v1/adapters", who, data={"name": name}, files=files)
            error_of(upload, 400)
            imported = world.call(
                "POST", "/v1/adapters", who, json={"name": name, "uri": "s3://elsewhere/a"}
            )
            error_of(imported, 400)
        for call in (
            lambda n: registry.register(principal, AdapterMeta(n), b"{}", b""),
            lambda n: registry.import_uri(principal, AdapterMeta(n), "s3://elsewhere/a"),
            lambda n: registry.delete(principal, n),
            lambda n: registry.get(principal, n),
            lambda n: registry.versions(principal, n),
            lambda n: registry.create_tenant(n),
        ):
            with pytest.raises(InvalidName):
                call(name)
        quoted = httpx.URL(world.stack.url).copy_with(raw_path=b"/v1/adapters/" + _quote(name))
        for method in ("GET", "DELETE"):
            answer = world.http.request(
                method, quoted, headers={"Authorization": f"Bearer {world.keys['acme']}"}
            )
            # 307: the empty name is the listing's path with a slash
            assert answer.status_code in (307, 400, 404, 405), (name, method, answer.text)
    assert recorded.calls == []
    blobs = Path(world.stack.registry.blobs.inner.root)  # type: ignore[attr-defined]
    assert {p.name for p in blobs.iterdir() if not p.name.startswith(".")} <= {
        "acme",
        "globex",
        "_global",
    }
    assert {"secret", "other"} <= world.names("globex")


def _quote(name: str) -> bytes:
    return quote(name, safe="/%").encode("ascii")


@pytest.mark.parametrize("name", ["py", "a.b", "a-b_c", "x" * 64, "0"])
def test_s3_keys_stay_under_the_tenant_prefix(name: str) -> None:
    """Valid names map to ``{prefix}/{tenant}/{name}/{version}``: one segment each, no dots."""
    store = S3BlobStore.__new__(S3BlobStore)  # no client needed to derive keys
    store.bucket, store.prefix = "bucket", "adapters"
    uri = store.uri("acme", name, 3)
    assert uri == f"s3://bucket/adapters/acme/{name}/3"
    assert ".." not in uri and uri.count("/") == 6


# --- public adapters ------------------------------------------------------------------------------
def test_public_adapters_serve_everyone_and_only_the_admin_deletes_them(world: World) -> None:
    """Runs on a public adapter of its own (``shared``), so test order does not matter."""
    with world.stack.client(ADMIN_KEY) as admin:
        admin.register(world.adapter_dir, "shared")
    body = {"model": "shared", "prompt": "x", "max_tokens": 1}

    def owner(tenant: str) -> str:
        params = {"adapter": "shared"}
        return world.call("GET", "/v1/adapters/resolve", tenant, params=params).json()["adapter"][
            "tenant"
        ]

    for tenant in ("acme", "globex"):
        models = world.call("GET", "/v1/models", tenant).json()["data"]
        assert [m["owned_by"] for m in models if m["id"] == "shared"] == ["public"]
        served = world.call("POST", "/v1/completions", tenant, json=body)
        assert served.status_code == 200 and served.headers["x-flora-adapter"] == "shared@1"
        assert owner(tenant) == "_global"
        for ref in ("shared", "shared@1"):  # not theirs: exactly like a missing name
            error_of(world.call("DELETE", f"/v1/adapters/{ref}", tenant), 404)
    # a tenant's own "shared" shadows the public one for that tenant only, and replaces nothing
    with world.stack.client(world.keys["acme"]) as acme:
        acme.register(world.adapter_dir, "shared")
    assert owner("acme") == "acme" and owner("globex") == "_global"
    models = world.call("GET", "/v1/models", "acme").json()["data"]
    assert [m["owned_by"] for m in models if m["id"] == "shared"] == ["acme"]  # listed once
    assert world.call("DELETE", "/v1/adapters/shared", "acme").status_code == 200
    assert owner("acme") == "_global"  # the public one is still there
    # the admin deletes it: gone for everyone, refused by name (never a silent base fall-back)
    assert world.call("DELETE", "/v1/adapters/shared", "admin").status_code == 200
    for tenant in ("acme", "globex"):
        assert "shared" not in world.names(tenant, "/v1/models")
        error_of(world.call("POST", "/v1/completions", tenant, json=body), 404)
