"""Property-based fuzzing of the OpenAPI specs (schemathesis) over real HTTP: the standalone
registry API and the serving ingress, each called with a tenant key, the admin key and no key.

Every generated request must get a non-5xx answer whose status code, content type and body the
spec declares. A fixed number of examples per operation and
a fixed seed keep the run bounded and reproducible.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from adapter_registry import BaseModelCatalog, Registry
from adapter_registry.app import create_app
from adapter_registry.blobs import LocalBlobStore
from adapter_registry.client import RegistryClient
from adapter_registry.index.sqlite import SqliteIndex
from flora.train import make_tiny_model
from tests.adapter_registry.conftest import ADMIN_KEY as REGISTRY_ADMIN_KEY
from tests.adapter_registry.conftest import MAX_BYTES, SPEC
from tests.serve.conftest import ADMIN_KEY as SERVE_ADMIN_KEY
from tests.serve.conftest import Stack
from tests.servers import http_server

EXAMPLES_PER_OPERATION = 25
SEED = 20260801
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def fuzz(url: str, headers: dict[str, str]) -> list[str]:
    """Fuzz every operation of the spec at ``url``; returns one line per failing operation."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @seed(SEED)
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=url, headers=headers, checks=CHECKS)

        try:
            run()
        except Exception as error:  # a failing example: report it with its operation
            failures.append(f"{operation.label}: {error}")
    return failures


def keys_for(client_url: str, admin_key: str) -> dict[str, dict[str, str]]:
    with RegistryClient(client_url, admin_key) as admin:
        _, tenant_key = admin.create_tenant(f"fuzz-{uuid.uuid4().hex[:8]}")
    return {
        "tenant": {"Authorization": f"Bearer {tenant_key}"},
        "admin": {"Authorization": f"Bearer {admin_key}"},
        "anonymous": {},
    }


@pytest.fixture(scope="module")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("fuzz-registry")
    registry = Registry(
        SqliteIndex(root / "index.sqlite3"),
        LocalBlobStore(root / "blobs"),
        BaseModelCatalog([SPEC]),
        admin_key=REGISTRY_ADMIN_KEY,
        max_adapter_bytes=MAX_BYTES,
    )
    with http_server(create_app(registry)) as url:
        yield url


@pytest.fixture(scope="module")
def serve_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("fuzz-stack")
    model = make_tiny_model(root / "model", preset="micro", languages=["python"], progress=False)
    s = Stack(root, model)
    yield s
    s.close()


@pytest.mark.parametrize("who", ["tenant", "admin", "anonymous"])
def test_registry_api_has_no_server_errors(registry_url: str, who: str) -> None:
    headers = keys_for(registry_url, REGISTRY_ADMIN_KEY)[who]
    assert fuzz(registry_url, headers) == []


@pytest.mark.parametrize("who", ["tenant", "admin", "anonymous"])
def test_ingress_has_no_server_errors(serve_stack: Stack, who: str) -> None:
    headers = keys_for(serve_stack.url, SERVE_ADMIN_KEY)[who]
    assert fuzz(serve_stack.url, headers) == []
