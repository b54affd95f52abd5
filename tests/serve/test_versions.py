"""Versions are ASCII digits on every serving path too (issue 14): a completion's ``model``,
the registry routes the ingress mounts, and the replica's adapter source all parse
``name@version`` alike. ``x@²`` was a 500 (``int('²')``) or, as a ``model``, a 404; ``x@𝟙`` was
silently ``x@1``. A malformed version is now a 400 naming it; an unknown or invalid *name* is
still a 404 ``model_not_found``-style answer, as before."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from adapter_registry import Principal
from flora.adapters import AdapterKind
from flora.engine import UnknownAdapterError
from flora.engine.engine import RequestError
from tests.serve.conftest import ADMIN_KEY, Stack, random_adapter_dir

BAD_VERSIONS = ["²", "𝟙", "٣", "1²"]


@pytest.fixture(scope="module")
def key(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Tenant acme, owning adapter ``x`` (version 1)."""
    with stack.client(ADMIN_KEY) as admin:
        _, key = admin.create_tenant("acme")
    adapter = random_adapter_dir(
        tmp_path_factory.mktemp("x"), AdapterKind.LORA, 2, 1, stack.model_args
    )
    with stack.client(key) as acme:
        acme.register(adapter, "x")
    return key


def complete(stack: Stack, key: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": "def f(x):", "max_tokens": 2, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(stack.url + "/v1/completions", json=body, headers=headers, timeout=60)


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    return error


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_a_malformed_version_as_model_is_a_400_naming_it(stack: Stack, key: str, version: str):
    for model in (f"x@{version}", f"base:x@{version}"):
        error = error_of(complete(stack, key, model), 400)
        assert error["type"] == "invalid_request_error" and error["param"] == "model", error
        assert f"invalid version {version!r}" in error["message"], error


def test_names_keep_their_404_and_x_at_1_works(stack: Stack, key: str):
    assert complete(stack, key, "x@1").status_code == 200
    assert complete(stack, key, "x@1").headers["x-flora-adapter"] == "x@1"
    for model in ("nope@1", "x@2", "Bad@1", "Bad@²", "a" * 300):
        error = error_of(complete(stack, key, model), 404)
        assert error["param"] == "model", (model, error)


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_registry_routes_refuse_a_malformed_version_with_400(stack: Stack, key: str, version: str):
    headers = {"Authorization": f"Bearer {key}"}
    url = stack.url + "/v1/adapters/" + quote(f"x@{version}", safe="")
    for method in ("GET", "DELETE"):
        error = error_of(httpx.request(method, url, headers=headers, timeout=30), 400)
        assert f"invalid version {version!r}" in error["message"], error
    # nothing was read as x@1 (and deleted): it still serves
    with stack.client(key) as acme:
        assert [r.label for r in acme.show("x@1")] == ["x@1"]


def test_the_replica_parses_versions_as_the_registry_does(stack: Stack, key: str):
    """What reaches a replica (a record id) parses alike: a bad version is a 400 chunk, a bad or
    unknown name a 404 chunk, never an exception out of the replica (a 500)."""
    source = stack.core.source
    assert source.resolve("acme/x@1", "acme").label == "acme/x@1"
    for version in BAD_VERSIONS:
        with pytest.raises(RequestError, match="invalid version"):
            source.resolve(f"acme/x@{version}", "acme")
    with pytest.raises(UnknownAdapterError):
        source.resolve("acme/Bad@1", "acme")
    assert stack.registry.get(Principal("acme"), "x@1").version == 1
