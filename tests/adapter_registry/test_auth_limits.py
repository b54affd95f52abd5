"""Brute-force protection: too many bad keys from one client answer 429 until the window ends."""

from __future__ import annotations

import httpx
import pytest

from adapter_registry import Registry
from adapter_registry.auth_limits import FailedKeyLimiter
from adapter_registry.errors import TooManyFailedKeys, Unauthorized
from adapter_registry.settings import RegistrySettings
from tests.adapter_registry.conftest import ADMIN_KEY, serving


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lockout_per_client_until_the_window_passes() -> None:
    clock = FakeClock()
    limiter = FailedKeyLimiter(3, 60, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") is None
        limiter.failed("10.0.0.1")
    clock.now += 10
    assert limiter.retry_after("10.0.0.1") == pytest.approx(50)
    assert limiter.retry_after("10.0.0.2") is None  # another client is not affected
    clock.now += 50
    assert limiter.retry_after("10.0.0.1") is None  # the window passed: a fresh start
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") is None


def test_tracked_clients_are_bounded_oldest_evicted() -> None:
    limiter = FailedKeyLimiter(1, 60, max_clients=2, clock=FakeClock())
    for client in ("a", "b", "c"):
        limiter.failed(client)
    assert limiter.retry_after("a") is None
    assert limiter.retry_after("b") is not None and limiter.retry_after("c") is not None


def test_registry_refuses_even_the_right_key_during_lockout(registry: Registry) -> None:
    clock = FakeClock()
    registry.failed_keys = FailedKeyLimiter(2, 60, clock=clock)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            registry.authenticate("flr_wrong", "10.0.0.1")
    with pytest.raises(TooManyFailedKeys) as e:
        registry.authenticate(ADMIN_KEY, "10.0.0.1")
    assert e.value.status == 429 and e.value.retry_after == pytest.approx(60)
    assert registry.authenticate(ADMIN_KEY, "10.0.0.2").is_admin
    assert registry.authenticate(ADMIN_KEY).is_admin  # no client: in-process callers, no limit
    clock.now += 60
    assert registry.authenticate(ADMIN_KEY, "10.0.0.1").is_admin


def test_settings_read_the_limits() -> None:
    s = RegistrySettings.from_env(
        {"FLORA_AUTH_MAX_FAILURES": "5", "FLORA_AUTH_WINDOW_S": "30", "FLORA_DATA_DIR": "/x"}
    )
    assert (s.auth_max_failures, s.auth_window_s) == (5, 30.0)


def test_http_bad_keys_get_429_with_retry_after(registry: Registry) -> None:
    registry.failed_keys = FailedKeyLimiter(3, 60)
    with serving(registry) as url:
        for _ in range(3):
            r = httpx.get(f"{url}/v1/adapters", headers={"Authorization": "Bearer flr_wrong"})
            assert r.status_code == 401
        r = httpx.get(f"{url}/v1/adapters", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.json()["error"]["code"] == "too_many_failed_keys"
    assert r.json()["error"]["type"] == "rate_limit_error"
