"""Reads through a Redis outage (found by the fault runs, tests/reliability): keys and adapter
lookups read before the outage keep answering from the last known index, writes and never-read
lookups answer 503 — with ``Retry-After`` — and the fallback ends after ``stale_reads_s``.
A hung Redis (SIGSTOP) costs one socket timeout, then the breaker answers at once."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapter_registry import (
    AdapterMeta,
    BaseModelCatalog,
    Principal,
    Registry,
    Unavailable,
)
from adapter_registry.breaker import Breaker
from adapter_registry.index.redis import RedisIndex
from adapter_registry.last_known import LastKnown
from tests.adapter_registry.conftest import (
    ADMIN_KEY,
    MAX_BYTES,
    SPEC,
    adapter_bytes,
    s3_store,
    serving,
)
from tests.adapter_registry.test_outages import bearer
from tests.servers import RedisServer, S3Server

ACME = Principal("acme")


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    yield server
    server.stop()


def test_reads_made_before_a_redis_outage_keep_answering_writes_get_503_with_retry_after(
    own_redis: RedisServer, s3_server: S3Server
):
    registry = Registry(
        RedisIndex(own_redis.url),
        s3_store(),
        BaseModelCatalog([SPEC]),
        admin_key=ADMIN_KEY,
        max_adapter_bytes=MAX_BYTES,
    )
    _, key = registry.create_tenant("acme")
    _, other_key = registry.create_tenant("globex")
    config, weights = adapter_bytes(seed=1)
    py = registry.register(ACME, AdapterMeta("py", language="python"), config, weights)
    # what serving reads for each request: the key, the named adapter, the resolution
    assert registry.authenticate(key) == ACME
    assert registry.get(ACME, "py") == py
    assert registry.resolve(ACME, language="python").adapter == py
    with serving(registry) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/v1/adapters", headers=bearer(key)).status_code == 200
        own_redis.stop()
        assert registry.authenticate(key) == ACME
        assert registry.get(ACME, "py") == py
        assert registry.resolve(ACME, language="python").adapter == py
        listed = http.get("/v1/adapters", headers=bearer(key))
        assert listed.status_code == 200 and [r["id"] for r in listed.json()["data"]] == [py.id]
        with pytest.raises(Unavailable):  # never read before the outage
            registry.authenticate(other_key)
        with pytest.raises(Unavailable):  # writes are never answered from memory
            registry.register(ACME, AdapterMeta("py"), config, weights)
        refused = http.get("/v1/adapters", headers=bearer(other_key))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        own_redis.start()
        assert registry.authenticate(other_key) == Principal("globex")


def test_last_known_answers_only_within_its_age_and_never_remembers_refusals():
    now = [0.0]
    known = LastKnown(max_age_s=10, max_entries=2, clock=lambda: now[0])

    def down() -> str:
        raise Unavailable("index down")

    assert known.read("a", lambda: "A") == "A"
    assert known.read("none", lambda: None, keep=lambda v: v is not None) is None
    now[0] = 9
    assert known.read("a", down) == "A"
    with pytest.raises(Unavailable):
        known.read("none", down)  # an invalid key is never remembered
    now[0] = 11
    with pytest.raises(Unavailable):
        known.read("a", down)  # too old
    known.read("b", lambda: "B")
    known.read("c", lambda: "C")
    known.read("d", lambda: "D")  # bounded: "b" is evicted first
    with pytest.raises(Unavailable):
        known.read("b", down)
    assert known.read("d", down) == "D"
    off = LastKnown(max_age_s=0)
    off.read("a", lambda: "A")
    with pytest.raises(Unavailable):
        off.read("a", down)


def test_a_hung_redis_costs_one_timeout_then_answers_at_once(
    own_redis: RedisServer, s3_server: S3Server
):
    """A stopped redis-server accepts connections and never answers. Before the breaker, each
    read waited 20-80 s (timeouts retried, then the health check's) before the last known
    answer served it, and a write took 84 s to answer 503."""
    registry = Registry(
        RedisIndex(own_redis.url, cooldown_s=1.0),
        s3_store(),
        BaseModelCatalog([SPEC]),
        admin_key=ADMIN_KEY,
        max_adapter_bytes=MAX_BYTES,
    )
    _, key = registry.create_tenant("acme")
    config, weights = adapter_bytes(seed=1)
    py = registry.register(ACME, AdapterMeta("py"), config, weights)
    assert registry.authenticate(key) == ACME and registry.get(ACME, "py") == py
    pid = own_redis.process.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert registry.authenticate(key) == ACME  # waits out one socket timeout (5 s)
        assert time.monotonic() - started < 8
        started = time.monotonic()
        for _ in range(20):
            assert registry.authenticate(key) == ACME
            assert registry.get(ACME, "py") == py
        with pytest.raises(Unavailable, match="failing fast"):
            registry.register(ACME, AdapterMeta("py2"), config, weights)
        assert time.monotonic() - started < 1.0  # 41 calls, none waited for Redis
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 10  # the next probe after the cool-down finds it back
    while True:
        try:
            assert registry.register(ACME, AdapterMeta("py2"), config, weights).version == 1
            break
        except Unavailable:
            assert time.monotonic() < deadline, "Redis did not come back within 10 s"
            time.sleep(0.2)
    assert not registry.index.breaker.is_open


def test_the_breaker_holds_callers_off_then_lets_one_probe():
    now = [0.0]
    breaker = Breaker(cooldown_s=2, clock=lambda: now[0])
    breaker.before()  # closed
    breaker.failed("index down")
    with pytest.raises(Unavailable, match=r"index down \(failing fast"):
        breaker.before()
    now[0] = 2.5
    breaker.before()  # the probe
    with pytest.raises(Unavailable):
        breaker.before()  # others keep failing fast while it runs
    breaker.failed("still down")  # the probe failed: open again for the cool-down
    with pytest.raises(Unavailable, match="still down"):
        breaker.before()
    now[0] = 5.0
    breaker.before()
    breaker.succeeded()
    assert not breaker.is_open
    breaker.before()
    breaker.before()
