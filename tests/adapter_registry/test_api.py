"""The REST API through a real HTTP server on both backends: authentication, tenants, uploads and
imports, listing / showing / deleting / resolving, tenant isolation, every refused upload leaving
nothing behind, body-size limits, the OpenAPI schema, health probes, and the ``flora`` CLI."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from adapter_registry import Registry
from adapter_registry.blobs import LocalBlobStore, S3BlobStore
from adapter_registry.client import RegistryClient
from adapter_registry.errors import Forbidden, InvalidName, NotFound
from adapter_registry.formats import CONFIG_FILE, WEIGHTS_FILE
from adapter_registry.index.redis import RedisIndex
from adapter_registry.index.sqlite import SqliteIndex
from adapter_registry.names import GLOBAL
from adapter_registry.records import AdapterRecord
from tests.adapter_registry.conftest import (
    ADMIN_KEY,
    MAX_BYTES,
    PREFIX,
    adapter_bytes,
    adapter_tensors,
    unique,
    write_adapter,
)

FLORA = adapter_bytes("flora", 2)
FLORA_CLI = Path(sys.executable).parent / "flora"
BODY_LIMIT = MAX_BYTES + (1 << 20)  # what create_app lets through BodySizeLimit


# --- helpers --------------------------------------------------------------------------------------
def upload(
    http: httpx.Client, name: str, files: tuple[bytes, bytes] = FLORA, **fields: str
) -> httpx.Response:
    config, weights = files
    return http.post(
        "/v1/adapters",
        data={"name": name, **fields},
        files={"config": (CONFIG_FILE, config), "weights": (WEIGHTS_FILE, weights)},
    )


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The OpenAI-shaped error of ``response``, after checking its status and shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def flora_weights(change: Callable[[dict[str, np.ndarray]], None]) -> bytes:
    tensors = adapter_tensors("flora", 2)
    change(tensors)
    return save(tensors)


def stored(registry: Registry, tenant: str) -> list[str]:
    """Everything of ``tenant`` in the index (any status) and in the blob store."""
    found = [r.id for r in registry.index.list(tenant)]
    if isinstance(registry.blobs, LocalBlobStore):
        found += [str(p) for p in (registry.blobs.root / tenant).rglob("*") if p.is_file()]
    else:
        assert isinstance(registry.blobs, S3BlobStore)
        prefix = f"{registry.blobs.prefix}/{tenant}/"
        listing = registry.blobs.client.list_objects_v2(Bucket=registry.blobs.bucket, Prefix=prefix)
        found += [o["Key"] for o in listing.get("Contents", [])]
    return found


def index_dump(registry: Registry) -> bytes:
    """Every byte the index holds: the SQLite files, or every Redis key and value."""
    if isinstance(registry.index, SqliteIndex):
        files = registry.index.path.parent.glob(registry.index.path.name + "*")  # -wal, -shm too
        return b"".join(f.read_bytes() for f in files)
    assert isinstance(registry.index, RedisIndex)
    client, out = registry.index.client, []
    for key in client.scan_iter(match=registry.index.ns + "*"):
        out.append(key)
        kind = client.type(key)
        if kind == "string":
            out.append(client.get(key))
        elif kind == "hash":
            out.extend(f"{k}={v}" for k, v in client.hgetall(key).items())
        elif kind == "set":
            out.extend(client.smembers(key))
    return "\n".join(out).encode()


@pytest.fixture
def anonymous(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=30) as http:
        yield http


# --- authentication and tenants -------------------------------------------------------------------
ROUTES = [
    ("GET", "/v1/adapters"),
    ("POST", "/v1/adapters"),
    ("GET", "/v1/adapters/py"),
    ("DELETE", "/v1/adapters/py@1"),
    ("GET", "/v1/adapters/resolve"),
    ("GET", "/v1/base-models"),
    ("GET", "/v1/tenants"),
    ("POST", "/v1/tenants/acme/keys"),
]


def test_every_route_needs_a_valid_key(anonymous: httpx.Client, acme: RegistryClient):
    for method, path in ROUTES:
        error = error_of(anonymous.request(method, path), 401, "invalid_api_key")
        assert error["type"] == "authentication_error"
        assert "missing API key" in error["message"]
        for header in (f"Bearer {ADMIN_KEY}x", "Bearer flr_not-a-key", f"Basic {ADMIN_KEY}"):
            response = anonymous.request(method, path, headers={"Authorization": header})
            error = error_of(response, 401, "invalid_api_key")
            assert error["type"] == "authentication_error", (method, path, header)
    assert acme.list() == []  # a valid tenant key gets in


def test_tenant_keys_cannot_use_admin_routes(acme: RegistryClient, admin: RegistryClient):
    for response in (
        acme.http.post("/v1/tenants", json={"name": "evil"}),
        acme.http.get("/v1/tenants"),
        acme.http.post("/v1/tenants/acme/keys"),
    ):
        error = error_of(response, 403, "forbidden")
        assert error["type"] == "permission_error" and "admin key" in error["message"]
    assert [t["name"] for t in admin.http.get("/v1/tenants").json()] == ["acme"]


def test_tenants_are_created_once_with_a_key_stored_only_as_a_hash(
    admin: RegistryClient, server: str, registry: Registry, tmp_path: Path
):
    response = admin.http.post("/v1/tenants", json={"name": "initech"})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["tenant"]["name"] == "initech" and body["api_key"].startswith("flr_")
    key = body["api_key"]
    with RegistryClient(server, key) as initech:
        assert initech.list() == []
        assert initech.register(write_adapter(tmp_path / "a"), "py").id == "initech/py@1"
    assert [t["name"] for t in admin.http.get("/v1/tenants").json()] == ["initech"]

    error = error_of(admin.http.post("/v1/tenants", json={"name": "initech"}), 409, "conflict")
    assert "initech" in error["message"]
    for bad in ("Initech", "a/b", "", "x" * 65, GLOBAL, "a..b"):
        error_of(admin.http.post("/v1/tenants", json={"name": bad}), 400, "invalid_name")
    error_of(admin.http.post("/v1/tenants", json={}), 400, "invalid_request")
    error_of(admin.http.post("/v1/tenants", json={"name": 7}), 400, "invalid_request")

    second = admin.http.post("/v1/tenants/initech/keys")
    assert second.status_code == 201
    other_key = second.json()["api_key"]
    with RegistryClient(server, other_key) as initech:
        assert [r.id for r in initech.list()] == ["initech/py@1"]
    error_of(admin.http.post("/v1/tenants/nobody/keys"), 404, "not_found")

    dump = index_dump(registry)
    for k in (key, other_key):
        assert hashlib.sha256(k.encode()).hexdigest().encode() in dump  # the hash is kept...
        assert k.removeprefix("flr_").encode() not in dump  # ...never the key
    assert ADMIN_KEY.encode() not in dump


# --- adapters -------------------------------------------------------------------------------------
def test_upload_returns_the_record(acme: RegistryClient):
    config, weights = adapter_bytes("lora", 4)
    response = upload(acme.http, "py", (config, weights), language="python", user="Ann-1")
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["id"] == "acme/py@1" and record["tenant"] == "acme"
    assert (record["kind"], record["rank"], record["alpha"]) == ("lora", 4, 8.0)
    assert (record["language"], record["user"], record["status"]) == ("python", "Ann-1", "ready")
    assert record["sha256"] == hashlib.sha256(weights).hexdigest()
    assert record["size"] == len(weights)
    assert acme.show("py@1")[0].model_dump(mode="json") == record


def test_list_filters(acme: RegistryClient, admin: RegistryClient, tmp_path: Path):
    flora_dir = write_adapter(tmp_path / "flora")
    lora_dir = write_adapter(tmp_path / "lora", "lora", 2)
    acme.register(flora_dir, "py", language="python", user="ann")
    acme.register(flora_dir, "js", language="javascript")
    acme.register(lora_dir, "py-lora", language="python")
    acme.register(flora_dir, "py", language="python", user="ann")  # version 2
    admin.register(flora_dir, "public-py", language="python")

    def names(**filters) -> list[str]:
        return [r.label for r in acme.list(**filters)]

    assert names() == ["js@1", "py@2", "py-lora@1"]  # the newest of each name
    assert names(language="python") == ["py@2", "py-lora@1"]
    assert names(user="ann") == ["py@2"]
    assert names(kind="lora") == ["py-lora@1"]
    assert names(kind="ia3") == []
    assert names(language="rust") == []
    assert names(include_global=True) == ["public-py@1", "js@1", "py@2", "py-lora@1"]
    assert acme.list(include_global=True)[0].tenant == GLOBAL
    assert names(include_global=True, language="javascript") == ["js@1"]
    assert [r.label for r in admin.list()] == ["public-py@1"]
    error_of(acme.http.get("/v1/adapters", params={"kind": "dora"}), 400, "invalid_request")
    error_of(acme.http.get("/v1/adapters", params={"language": "Py thon"}), 400, "invalid_name")


def test_show_delete_and_versions(acme: RegistryClient):
    for seed in (1, 2, 3):
        assert upload(acme.http, "py", adapter_bytes(seed=seed)).status_code == 201
    versions = acme.show("py")
    assert [r.version for r in versions] == [3, 2, 1]
    assert len({r.sha256 for r in versions}) == 3
    assert acme.show("py@2") == [versions[1]]
    error_of(acme.http.get("/v1/adapters/py@9"), 404, "not_found")
    error_of(acme.http.get("/v1/adapters/py@0"), 400, "invalid_name")
    error_of(acme.http.get("/v1/adapters/py@x"), 400, "invalid_name")
    error_of(acme.http.get("/v1/adapters/Py"), 400, "invalid_name")

    response = acme.http.delete("/v1/adapters/py@2")
    assert response.status_code == 200 and response.json() == {"deleted": ["acme/py@2"]}
    assert [r.version for r in acme.show("py")] == [3, 1]
    error_of(acme.http.delete("/v1/adapters/py@2"), 404, "not_found")
    assert sorted(acme.delete("py")) == ["acme/py@1", "acme/py@3"]
    error_of(acme.http.get("/v1/adapters/py"), 404, "not_found")
    error_of(acme.http.delete("/v1/adapters/py"), 404, "not_found")
    assert acme.list() == []
    assert upload(acme.http, "py").json()["version"] == 4  # numbers are never reused


def test_path_segments_cannot_change_the_route(acme: RegistryClient):
    assert upload(acme.http, "py").status_code == 201
    error_of(acme.http.get("/v1/adapters/py/extra"), 404)  # no such route: still OpenAI-shaped
    error_of(acme.http.get("/v1/adapters/a%2Fb"), 404)
    with pytest.raises(InvalidName):
        acme.show("a/b")  # the client refuses it before sending anything
    with pytest.raises(InvalidName):
        acme.delete("..")
    assert [r.label for r in acme.list()] == ["py@1"]


def test_resolve_returns_the_rule_and_reason(acme: RegistryClient, admin: RegistryClient):
    assert upload(acme.http, "py", language="python").status_code == 201
    assert upload(acme.http, "ann-py", language="python", user="ann").status_code == 201
    assert upload(acme.http, "ann", user="ann").status_code == 201
    assert upload(admin.http, "public-go", language="go").status_code == 201

    def resolve(**params) -> tuple[str, str | None, str]:
        response = acme.http.get("/v1/adapters/resolve", params=params)
        assert response.status_code == 200, response.text
        body = response.json()
        return body["rule"], body["adapter"] and body["adapter"]["id"], body["reason"]

    rule, adapter, reason = resolve(language="python")
    assert (rule, adapter) == ("language", "acme/py@1") and "py@1" in reason
    assert resolve(language="python", user="ann")[:2] == ("user+language", "acme/ann-py@1")
    assert resolve(user="ann")[:2] == ("user", "acme/ann@1")
    assert resolve(user="bob", language="python")[:2] == ("language", "acme/py@1")
    assert resolve(language="go")[:2] == ("global-language", "_global/public-go@1")
    assert resolve(adapter="ann-py")[:2] == ("explicit", "acme/ann-py@1")
    assert resolve(adapter="public-go@1")[:2] == ("explicit", "_global/public-go@1")
    rule, adapter, reason = resolve(language="rust")
    assert (rule, adapter) == ("base", None) and "rust" in reason
    assert resolve() == ("base", None, "base model: none asked")
    error_of(acme.http.get("/v1/adapters/resolve", params={"adapter": "nope"}), 404, "not_found")
    res = acme.resolve(language="python")
    assert res.adapter is not None and res.adapter.name == "py"


def test_other_tenants_adapters_do_not_exist_for_you(acme: RegistryClient, globex: RegistryClient):
    assert upload(globex.http, "secret", language="python", user="ann").status_code == 201

    def message(response: httpx.Response, name: str) -> str:
        return error_of(response, 404, "not_found")["message"].replace(name, "NAME")

    for ref in ("secret", "secret@1"):
        missing = ref.replace("secret", "nothing")
        for method in ("GET", "DELETE"):
            theirs = acme.http.request(method, f"/v1/adapters/{ref}")
            none = acme.http.request(method, f"/v1/adapters/{missing}")
            assert message(theirs, "secret") == message(none, "nothing")  # nothing disclosed
        response = acme.http.get("/v1/adapters/resolve", params={"adapter": ref})
        error_of(response, 404, "not_found")
        with pytest.raises(NotFound):
            acme.show(ref)
        with pytest.raises(NotFound):
            acme.delete(ref)
    assert acme.list() == [] and acme.list(include_global=True, user="ann") == []
    assert acme.resolve(language="python", user="ann").adapter is None
    # and it is all still there for its owner
    assert [r.id for r in globex.list()] == ["globex/secret@1"]
    assert globex.resolve(language="python", user="ann").adapter.id == "globex/secret@1"


def test_concurrent_uploads_of_one_name_get_distinct_versions(acme: RegistryClient):
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda i: upload(acme.http, "py", adapter_bytes(seed=i)), range(8))
        )
    assert [r.status_code for r in responses] == [201] * 8
    assert sorted(r.json()["version"] for r in responses) == list(range(1, 9))
    by_version = {r.version: r.sha256 for r in acme.show("py")}
    assert {r.json()["version"]: r.json()["sha256"] for r in responses} == by_version


# --- refused uploads leave nothing ----------------------------------------------------------------
def _nan(t: dict[str, np.ndarray]) -> None:
    t[f"{PREFIX}.1.attn.c_attn.flora_B.weight"][3, 1] = np.nan


def _shape(t: dict[str, np.ndarray]) -> None:
    t[f"{PREFIX}.0.attn.c_attn.flora_A.weight"] = np.ones((2, 63), np.float32)


def bad(
    fragment: str,
    status: int = 422,
    code: str = "invalid_adapter",
    *,
    name: str = "py",
    config: bytes = FLORA[0],
    weights: bytes = FLORA[1],
    **fields: str,
) -> tuple:
    return name, config, weights, fields, status, code, fragment


def invalid_name(name: str, fragment: str = "invalid name", **fields: str) -> tuple:
    return bad(fragment, 400, "invalid_name", name=name, **fields)


BAD_UPLOADS = {
    "corrupt safetensors": bad("tensors describe", weights=FLORA[1][:-7]),
    "garbage": bad("not a valid safetensors", weights=b"\x00" * 64),
    "pickle": bad("not a valid safetensors", weights=pickle.dumps({"lora_A": [0.5] * 64})),
    "NaN": bad("holds NaN or infinite values", weights=flora_weights(_nan)),
    "wrong shape": bad("expected flora_A.weight (2, 64)", weights=flora_weights(_shape)),
    "config not JSON": bad("adapter_config.json is not valid JSON", config=b"{"),
    "unknown base model": bad("unknown base model 'meta/llama'", base_model="meta/llama"),
    "weights over the limit": bad(
        f"the limit is {MAX_BYTES}", 413, "adapter_too_large", weights=b"\0" * (MAX_BYTES + 1)
    ),
    "name ..": invalid_name(".."),
    "name a/b": invalid_name("a/b"),
    "name with NUL": invalid_name("py\0x"),
    "name of 300 chars": invalid_name("p" * 300, "…"),
    "uppercase name": invalid_name("Py", "'Py'"),
    "reserved name": invalid_name("resolve", "reserved"),
    "empty name": invalid_name(""),
    "bad language": invalid_name("py", "invalid language 'c++'", language="c++"),
    "bad user": invalid_name("py", "invalid user 'ann smith'", user="ann smith"),
    "long description": bad("longer than 1000", 400, "invalid_request", description="d" * 1001),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_refused_uploads_leave_nothing(case: str, acme: RegistryClient, registry: Registry):
    name, config, weights, fields, status, code, fragment = BAD_UPLOADS[case]
    error = error_of(upload(acme.http, name, (config, weights), **fields), status, code)
    assert fragment in error["message"]
    assert acme.list() == [] and stored(registry, "acme") == []
    # refused before a version number was taken: the name's first good upload is version 1
    retry = "py" if status != 400 else "ok"
    assert upload(acme.http, retry).json()["id"] == f"acme/{retry}@1"


def test_malformed_requests_are_400s(acme: RegistryClient, registry: Registry):
    config_file = (CONFIG_FILE, FLORA[0])
    json_type = {"Content-Type": "application/json"}
    nested = b"[" * 100_000 + b"]" * 100_000

    def post(**kwargs) -> httpx.Response:
        return acme.http.post("/v1/adapters", **kwargs)

    cases = {  # case: (response, a fragment of the message)
        "no files": (
            post(data={"name": "py"}, files={"x": ("x", b"")}),
            "multipart field 'config' must be the file adapter_config.json",
        ),
        "no weights": (
            post(data={"name": "py"}, files={"config": config_file}),
            "multipart field 'weights'",
        ),
        "weights as a field": (
            post(data={"name": "py", "weights": "abc"}, files={"config": config_file}),
            "multipart field 'weights'",
        ),
        "too many files": (
            post(
                data={"name": "py"},
                files={"config": config_file, "weights": ("w", b""), "x": ("x", b"x")},
            ),
            "Too many files",
        ),
        "text/plain": (
            post(content=b"name=py", headers={"Content-Type": "text/plain"}),
            "send multipart/form-data",
        ),
        "no content type": (post(content=b"x"), "send multipart/form-data"),
        "form-urlencoded": (post(data={"name": "py"}), "send multipart/form-data"),
        "multipart without boundary": (
            post(content=b"--x--", headers={"Content-Type": "multipart/form-data"}),
            "boundary",
        ),
        "invalid JSON": (post(content=b'{"name": ', headers=json_type), "not valid JSON"),
        "JSON not UTF-8": (post(content=b'{"name": "\xff"}', headers=json_type), "not valid JSON"),
        "JSON a list": (post(json=["py", "s3://b/p"]), "valid dictionary"),
        "JSON without uri": (post(json={"name": "py"}), "uri: Field required"),
        "deeply nested JSON": (post(content=nested, headers=json_type), "not valid JSON"),
        "deeply nested tenant body": (
            acme.http.post("/v1/tenants", content=b'{"name": ' + nested + b"}", headers=json_type),
            "error parsing the body",
        ),
    }
    for case, (response, fragment) in cases.items():
        assert fragment in error_of(response, 400)["message"], case
    assert stored(registry, "acme") == []


# --- body-size limits -----------------------------------------------------------------------------
def test_declared_oversized_body_is_refused_before_reading(
    acme: RegistryClient, registry: Registry
):
    big = b"\0" * (BODY_LIMIT + 1)
    response = upload(acme.http, "py", (FLORA[0], big))
    error = error_of(response, 413, "request_too_large")
    assert f"over {BODY_LIMIT} bytes" in error["message"]
    assert stored(registry, "acme") == []


def _chunks(total: int, size: int = 64 << 10) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        sent += n
        yield b"a" * n


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=xyz", "application/json"])
def test_streamed_oversized_body_is_cut_off(
    content_type: str, acme: RegistryClient, registry: Registry
):
    boundary = b'--xyz\r\nContent-Disposition: form-data; name="weights"; filename="w"\r\n\r\n'

    def body() -> Iterator[bytes]:
        if content_type.startswith("multipart"):
            yield boundary
        yield from _chunks(BODY_LIMIT + (1 << 20))

    response = acme.http.post(
        "/v1/adapters", content=body(), headers={"Content-Type": content_type}
    )
    assert "content-length" not in {k.lower() for k in response.request.headers}
    error = error_of(response, 413, "adapter_too_large")
    assert f"over {BODY_LIMIT} bytes" in error["message"]
    assert stored(registry, "acme") == []
    assert upload(acme.http, "py").status_code == 201  # the server is fine afterwards


# --- imports from S3 ------------------------------------------------------------------------------
@pytest.fixture
def source_bucket(s3_server) -> str:
    """A bucket outside the registry's store holding one adapter under ``src/py``."""
    bucket = unique("source")
    s3 = boto3.client("s3", endpoint_url=s3_server.url)
    s3.create_bucket(Bucket=bucket)
    config, weights = adapter_bytes("lora", 4, seed=5)
    s3.put_object(Bucket=bucket, Key=f"src/py/{CONFIG_FILE}", Body=config)
    s3.put_object(Bucket=bucket, Key=f"src/py/{WEIGHTS_FILE}", Body=weights)
    s3.put_object(Bucket=bucket, Key=f"only-config/{CONFIG_FILE}", Body=config)
    return bucket


def test_import_from_s3(acme: RegistryClient, source_bucket: str, registry: Registry):
    response = acme.http.post(
        "/v1/adapters",
        json={"name": "py", "uri": f"s3://{source_bucket}/src/py/", "language": "python"},
    )
    assert response.status_code == 201, response.text
    record = response.json()
    weights = adapter_bytes("lora", 4, seed=5)[1]
    assert record["sha256"] == hashlib.sha256(weights).hexdigest()
    assert (record["id"], record["kind"], record["rank"]) == ("acme/py@1", "lora", 4)
    assert record["language"] == "python"
    assert record["uri"] == registry.blobs.uri("acme", "py", 1)  # copied into the store
    assert acme.import_uri(f"s3://{source_bucket}/src/py", "py").version == 2

    for uri in (
        f"s3://{source_bucket}/nothing-here",
        f"s3://{source_bucket}/only-config",
        f"s3://{unique('no-such-bucket')}/src/py",
    ):
        error = error_of(acme.http.post("/v1/adapters", json={"name": "x", "uri": uri}), 404)
        assert error["param"] == "uri"
    for uri in ("https://example.com/a", "s3://", "/etc/passwd"):
        error_of(acme.http.post("/v1/adapters", json={"name": "x", "uri": uri}), 400)
    dotted = f"s3://{source_bucket}/x/../src/py"  # a normalising store would resolve this
    assert error_of(acme.http.post("/v1/adapters", json={"name": "x", "uri": dotted}), 403)
    assert [r.label for r in acme.list()] == ["py@2"]


def test_import_from_the_registrys_own_store_is_forbidden(
    acme: RegistryClient, globex: RegistryClient, registry: Registry
):
    if not isinstance(registry.blobs, S3BlobStore):
        pytest.skip("the embedded backend stores adapters in a local directory, not S3")
    secret = upload(globex.http, "secret").json()
    assert secret["uri"].startswith(registry.blobs.url + "/globex/")
    store = registry.blobs.url
    for uri in (secret["uri"], store, store + "/", f"{store}/globex", f"{store}//globex/secret/1"):
        error = error_of(acme.http.post("/v1/adapters", json={"name": "x", "uri": uri}), 403)
        assert error["type"] == "permission_error" and error["param"] == "uri"
    with pytest.raises(Forbidden):
        acme.import_uri(secret["uri"], "stolen")
    # dot segments must not climb back into the store either
    bucket = registry.blobs.bucket
    sneaky = f"s3://{bucket}/x/../{registry.blobs.prefix}/globex/secret/1"
    response = acme.http.post("/v1/adapters", json={"name": "x", "uri": sneaky})
    assert response.status_code in (403, 404), response.text
    assert acme.list() == [] and stored(registry, "acme") == []


# --- schema and probes ----------------------------------------------------------------------------
def test_openapi_schema_documents_the_api(anonymous: httpx.Client):
    response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    paths = schema["paths"]
    expected = {
        "/v1/tenants": {"get", "post"},
        "/v1/tenants/{tenant}/keys": {"post"},
        "/v1/adapters": {"get", "post"},
        "/v1/adapters/resolve": {"get"},
        "/v1/adapters/{ref}": {"get", "delete"},
        "/v1/base-models": {"get"},
        "/healthz": {"get"},
        "/readyz": {"get"},
    }
    assert {p: set(ops) for p, ops in paths.items()} == expected
    record = schema["components"]["schemas"]["AdapterRecord"]
    example = record["example"]
    assert example["id"] == "acme/python-style@3" and set(example) <= set(record["properties"])
    assert AdapterRecord.model_validate(example).label == "python-style@3"
    upload_body = paths["/v1/adapters"]["post"]["requestBody"]["content"]
    assert set(upload_body) == {"multipart/form-data", "application/json"}
    assert upload_body["multipart/form-data"]["schema"]["required"] == ["name", "config", "weights"]
    assert {"401", "404", "413", "422"} <= set(paths["/v1/adapters"]["post"]["responses"])
    assert anonymous.get("/docs").status_code == 200


def test_health_probes(anonymous: httpx.Client, admin: RegistryClient):
    response = anonymous.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    response = anonymous.get("/readyz")
    assert response.status_code == 200 and response.json() == {"index": "ok", "store": "ok"}
    response = admin.http.get("/v1/base-models")
    assert response.status_code == 200 and "test/mqa" in response.json()["data"]


# --- the CLI --------------------------------------------------------------------------------------
def flora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLORA_CLI), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cli_against_a_live_registry(server: str, tmp_path: Path):
    url = ["--url", server]
    created = flora("tenants", "create", "cli-co", *url, "--key", ADMIN_KEY, "--json")
    assert created.returncode == 0, created.stderr
    key = json.loads(created.stdout)["api_key"]
    auth = [*url, "--key", key]

    directory = write_adapter(tmp_path / "py", "lora", 4)
    registered = flora(
        "adapters",
        "register",
        str(directory),
        "--name",
        "py",
        "--language",
        "python",
        *auth,
        "--json",
    )
    assert registered.returncode == 0, registered.stderr
    [record] = json.loads(registered.stdout)
    assert (record["id"], record["kind"], record["rank"]) == ("cli-co/py@1", "lora", 4)
    weights = (directory / WEIGHTS_FILE).read_bytes()
    assert record["sha256"] == hashlib.sha256(weights).hexdigest()

    listed = flora("adapters", "list", *auth, "--json")
    assert listed.returncode == 0 and [r["id"] for r in json.loads(listed.stdout)] == [
        "cli-co/py@1"
    ]
    shown = flora("adapters", "show", "py", *auth)
    assert shown.returncode == 0
    header, row = shown.stdout.strip().splitlines()
    assert header.split()[:3] == ["ADAPTER", "KIND", "RANK"]
    assert row.split()[:4] == ["py@1", "lora", "4", "python"]
    resolved = flora("adapters", "resolve", "--language", "python", *auth)
    assert resolved.returncode == 0
    assert resolved.stdout.strip() == "language: py@1: newest cli-co's adapter for python"
    deleted = flora("adapters", "delete", "py", *auth)
    assert (deleted.returncode, deleted.stdout) == (0, "deleted cli-co/py@1\n")
    assert flora("adapters", "list", *auth).stdout == "no adapters\n"

    # registry errors: one line on stderr, exit status 1, no traceback
    bad = write_adapter(tmp_path / "bad", "lora", 4, r=8)
    failures = {
        "no adapter named 'py'": flora("adapters", "show", "py", *auth),
        "invalid API key": flora("adapters", "list", *url, "--key", "flr_wrong"),
        "r=8": flora("adapters", "register", str(bad), "--name", "bad", *auth),
        "already exists": flora("tenants", "create", "cli-co", *url, "--key", ADMIN_KEY),
        "admin key": flora("tenants", "create", "other", *auth),
        "No such file": flora("adapters", "register", str(tmp_path / "nope"), "--name", "x", *auth),
        "invalid adapter reference": flora("adapters", "delete", "a/b", *auth),
    }
    for fragment, result in failures.items():
        assert result.returncode == 1, (fragment, result.stdout, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert fragment in lines[0], result.stderr
    assert flora("adapters", "list", *auth, "--json").stdout.strip() == "[]"
