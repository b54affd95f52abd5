"""API keys at the serving edge: repeated bad keys are locked out (429), and no key is logged."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapter_registry.auth_limits import FailedKeyLimiter
from flora.adapters import AdapterKind
from tests.serve.conftest import ADMIN_KEY, Stack, random_adapter_dir

WRONG_KEY = "flr_wrong-presented-key-0123456789"


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory, micro_dir: Path) -> Iterator[Stack]:
    """A stack of its own: a lockout here must not leak into other modules' tests."""
    s = Stack(tmp_path_factory.mktemp("auth-stack"), micro_dir)
    yield s
    s.close()


def complete(stack: Stack, key: str, model: str = "base") -> httpx.Response:
    body = {"model": model, "prompt": "def f():", "max_tokens": 2, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{stack.url}/v1/completions", json=body, headers=headers, timeout=60)


def test_keys_never_reach_logs_or_output(own_stack, tmp_path, caplog, capfd) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: every library's records
    with own_stack.client(ADMIN_KEY) as admin:
        _, key = admin.create_tenant("logged")
    adapter = random_adapter_dir(tmp_path / "a", AdapterKind.LORA, 2, 1, own_stack.model_args)
    with own_stack.client(key) as tenant:
        tenant.register(adapter, "py")
        assert [r.name for r in tenant.list()] == ["py"]
        assert complete(own_stack, key, "py").status_code == 200
        assert complete(own_stack, WRONG_KEY).status_code == 401
        tenant.delete("py")
    out, err = capfd.readouterr()
    logged = "\n".join(f"{r.getMessage()} {r.args!r} {r.exc_text}" for r in caplog.records)
    assert caplog.records  # the capture did see the flow
    for secret in (ADMIN_KEY, key, WRONG_KEY):
        assert secret not in logged and secret not in out and secret not in err


def test_completions_with_repeated_bad_keys_get_429(own_stack) -> None:
    with own_stack.client(ADMIN_KEY) as admin:
        _, key = admin.create_tenant("locked")
    limiter, own_stack.registry.failed_keys = own_stack.registry.failed_keys, FailedKeyLimiter(3)
    try:
        for _ in range(3):
            assert complete(own_stack, WRONG_KEY).status_code == 401
        response = complete(own_stack, key)  # even the right key, during the lockout
        assert response.status_code == 429, response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "too_many_failed_keys"
    finally:
        own_stack.registry.failed_keys = limiter
    assert complete(own_stack, key).status_code == 200
