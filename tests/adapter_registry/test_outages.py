"""Real outages, no mocks: the redis-server and moto S3 processes are killed mid-test and started
again on the same port, the SQLite file's directory is broken, and an event crosses from another
process. Each test owns the servers it kills, so the session servers other tests use stay up.

While a backend is down every operation that needs it raises ``Unavailable`` (HTTP 503 in the
OpenAI error shape), nothing is half-written, and once it is back the same ``Registry`` object
works again and subscribers are told to resynchronise (``reset``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from adapter_registry import (
    AdapterMeta,
    AdapterRecord,
    BaseModelCatalog,
    Event,
    NotFound,
    Principal,
    Registry,
    Unavailable,
)
from adapter_registry.blobs import BlobStore, LocalBlobStore, S3BlobStore, parse_s3_uri
from adapter_registry.formats import CONFIG_FILE, WEIGHTS_FILE
from adapter_registry.index import Index
from adapter_registry.index.redis import RedisIndex
from adapter_registry.index.sqlite import SqliteIndex
from adapter_registry.records import AdapterStatus
from tests.adapter_registry.conftest import (
    ADMIN_KEY,
    MAX_BYTES,
    SPEC,
    adapter_bytes,
    s3_store,
    serving,
    unique,
)
from tests.servers import RedisServer, S3Server

ACME, ADMIN = Principal("acme"), Principal(None)
REPO = Path(__file__).resolve().parents[2]


# --- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server this test may kill: append-only file, fsync on every write."""
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    yield server
    server.stop()


@pytest.fixture
def own_s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """A moto server this test may kill (its state dies with it)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server(tmp_path / "moto").start()
    yield server
    server.stop()


def make_registry(index: Index, blobs: BlobStore) -> Registry:
    catalog = BaseModelCatalog([SPEC])
    return Registry(index, blobs, catalog, admin_key=ADMIN_KEY, max_adapter_bytes=MAX_BYTES)


def register(registry: Registry, who: Principal, name: str, seed: int = 0, **meta) -> AdapterRecord:
    config, weights = adapter_bytes(seed=seed)
    return registry.register(who, AdapterMeta(name, **meta), config, weights)


def upload(http: httpx.Client, key: str, name: str, seed: int = 0) -> httpx.Response:
    config, weights = adapter_bytes(seed=seed)
    files = {"config": (CONFIG_FILE, config), "weights": (WEIGHTS_FILE, weights)}
    return http.post("/v1/adapters", headers=bearer(key), data={"name": name}, files=files)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_unavailable(response: httpx.Response, mentions: str) -> None:
    """503 in the OpenAI error shape naming the backend — never a 500 or a traceback."""
    assert response.status_code == 503, (response.request.url, response.text)
    body = response.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "code", "param"}
    assert (body["error"]["type"], body["error"]["code"]) == ("server_error", "backend_unavailable")
    assert mentions in body["error"]["message"], body
    assert "Traceback" not in response.text


def assert_all_unavailable(calls: dict[str, Callable[[], object]], mentions: str) -> None:
    for name, call in calls.items():
        try:
            call()
        except Unavailable as e:
            assert mentions in e.message, (name, e.message)
        else:
            pytest.fail(f"{name} did not raise Unavailable")


def s3_keys(blobs: S3BlobStore) -> set[str]:
    listing = blobs.client.list_objects_v2(Bucket=blobs.bucket)
    return {o["Key"] for o in listing.get("Contents", [])}


def blob_keys(records: list[AdapterRecord]) -> set[str]:
    return {f"{parse_s3_uri(r.uri)[1]}/{f}" for r in records for f in (CONFIG_FILE, WEIGHTS_FILE)}


class Events:
    """A subscriber that records events; ``wait_for`` blocks until one arrives after ``since``."""

    def __init__(self) -> None:
        self.seen: list[Event] = []
        self._arrived = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._arrived:
            self.seen.append(event)
            self._arrived.notify_all()

    def wait_for(self, event: Event, timeout: float, since: int = 0) -> int:
        """The index of ``event`` in ``seen`` (at or after ``since``); fails after ``timeout``."""
        with self._arrived:
            found = self._arrived.wait_for(lambda: event in self.seen[since:], timeout)
            assert found, f"no {event} within {timeout}s; seen {self.seen}"
            return self.seen.index(event, since)


RESET = Event(type="reset")


# --- Redis ---------------------------------------------------------------------------------------
def test_a_redis_outage_answers_503_and_the_same_registry_recovers(
    own_redis: RedisServer, s3_server: S3Server
):
    blobs = s3_store()
    registry = make_registry(RedisIndex(own_redis.url), blobs)
    _, key = registry.create_tenant("acme")
    mine = register(registry, ACME, "py", language="python")
    public = register(registry, ADMIN, "public", language="python")
    events = Events()
    subscription = registry.subscribe(events)
    try:
        with serving(registry) as url, httpx.Client(base_url=url, timeout=30) as http:
            own_redis.stop()
            config, weights = adapter_bytes(seed=7)
            calls = {
                "register": lambda: registry.register(ACME, AdapterMeta("py"), config, weights),
                "list": lambda: registry.list(ACME),
                "resolve": lambda: registry.resolve(ACME, language="python"),
                "create_tenant": lambda: registry.create_tenant("globex"),
                "authenticate": lambda: registry.authenticate(key),
            }
            assert_all_unavailable(calls, f"the adapter index (Redis at {own_redis.url})")
            assert_unavailable(http.get("/v1/adapters", headers=bearer(key)), "Redis")  # auth
            assert_unavailable(upload(http, ADMIN_KEY, "py", seed=7), "Redis")
            created = http.post("/v1/tenants", headers=bearer(ADMIN_KEY), json={"name": "globex"})
            assert_unavailable(created, "Redis")
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["store"] == "ok"
            assert "Redis" in ready.json()["index"]
            assert s3_keys(blobs) == blob_keys([mine, public])  # no orphan of a failed upload

            own_redis.start()  # same port, same append-only file
            assert http.get("/readyz").status_code == 200
            events.wait_for(RESET, timeout=10)
            since = len(events.seen)
            # the same objects, never rebuilt: exactly what was there before the outage
            assert registry.authenticate(key) == ACME
            assert registry.list(ACME) == [mine] and registry.list(ADMIN) == [public]
            assert registry.resolve(ACME, language="python").adapter == mine
            listed = http.get("/v1/adapters", headers=bearer(key))
            assert [r["id"] for r in listed.json()["data"]] == [mine.id]
            assert [t.name for t in registry.index.list_tenants()] == ["acme"]
            # the failed uploads took no version number (Redis hands them out first)
            assert register(registry, ACME, "py", seed=7).version == 2
            registry.create_tenant("globex")  # the Lua script is loaded into the new process
            registry.delete(ACME, "py@2")
    finally:
        subscription.close()
    events.wait_for(Event(type="deleted", tenant="acme", name="py", version=2), 10, since)
    assert Event(type="registered", tenant="acme", name="py", version=2) in events.seen[since:]


def test_a_quick_redis_restart_still_announces_reset(own_redis: RedisServer):
    """Down for milliseconds: the subscription must not re-subscribe silently, because events
    published meanwhile (or lost by a writer, which only logs a failed publish) are gone."""
    index = RedisIndex(own_redis.url)
    events = Events()
    subscription = index.subscribe(events)
    try:
        own_redis.restart()
        events.wait_for(RESET, timeout=5)
        deleted = Event(type="deleted", tenant="acme", name="py", version=1)
        index.publish(deleted)
        events.wait_for(deleted, timeout=5, since=events.seen.index(RESET))
    finally:
        subscription.close()
        index.close()


# --- S3 ------------------------------------------------------------------------------------------
def test_an_s3_outage_answers_503_writes_nothing_and_deletion_resumes(
    own_s3: S3Server, redis_server: RedisServer, tmp_path: Path
):
    blobs = S3BlobStore("s3://outage/adapters", endpoint_url=own_s3.url, create_bucket=True)
    registry = make_registry(RedisIndex(redis_server.url, namespace=unique("outage") + ":"), blobs)
    kept, doomed = register(registry, ACME, "py"), register(registry, ACME, "old", seed=1)
    cache = tmp_path / "cache"
    fetched = registry.fetch(kept, cache / "acme" / "py" / "1")
    with serving(registry) as url, httpx.Client(base_url=url, timeout=30) as http:
        own_s3.stop()
        with pytest.raises(Unavailable, match="adapter store s3://outage/adapters is unreachable"):
            register(registry, ACME, "py", seed=2)
        assert registry.index.list("acme", name="py") == [kept]
        assert registry.versions(ACME, "py") == [kept]

        # a copy already on this machine is served without S3; a new download is refused
        assert registry.fetch(kept, cache / "acme" / "py" / "1") == fetched
        weights = (fetched / WEIGHTS_FILE).read_bytes()
        assert hashlib.sha256(weights).hexdigest() == kept.sha256
        with pytest.raises(Unavailable, match="unreachable"):
            registry.fetch(kept, cache / "elsewhere")
        assert sorted(p.name for p in cache.iterdir()) == ["acme"]  # no staging dir left

        # deletion marks the record first: hidden now, finished on a later retry
        with pytest.raises(Unavailable, match="unreachable"):
            registry.delete(ACME, "old")
        assert registry.index.get("acme", "old", 1).status is AdapterStatus.DELETING
        assert registry.list(ACME) == [kept]
        for hidden in (lambda: registry.get(ACME, "old"), lambda: registry.versions(ACME, "old")):
            with pytest.raises(NotFound):
                hidden()
        with pytest.raises(NotFound):
            registry.resolve(ACME, adapter="old")

        assert_unavailable(upload(http, ADMIN_KEY, "py", seed=3), "adapter store")
        listed = http.get("/v1/adapters", headers=bearer(ADMIN_KEY))  # the index alone still works
        assert listed.status_code == 200 and listed.json()["data"] == []
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["index"] == "ok"
        assert "adapter store s3://outage/adapters is unreachable" in ready.json()["store"]

        own_s3.start()
        blobs.client.create_bucket(Bucket=blobs.bucket)  # moto kept nothing
        assert http.get("/readyz").status_code == 200
        assert [r.id for r in registry.delete(ACME, "old")] == [doomed.id]
        assert registry.index.get("acme", "old", 1) is None
        again = register(registry, ACME, "py", seed=4)
        assert registry.versions(ACME, "py") == [again, kept]
        assert s3_keys(blobs) == blob_keys([again])  # the new server holds only what came after


# --- embedded SQLite -----------------------------------------------------------------------------
def test_an_unusable_sqlite_index_is_unavailable_not_a_sqlite_error(tmp_path: Path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(Unavailable, match="a-file"):
        SqliteIndex(tmp_path / "a-file" / "index.sqlite3")

    blob_dir = tmp_path / "blobs"
    registry = make_registry(
        SqliteIndex(tmp_path / "db" / "index.sqlite3"), LocalBlobStore(blob_dir)
    )
    _, key = registry.create_tenant("acme")
    record = register(registry, ACME, "py")
    calls = {
        "register": lambda: register(registry, ACME, "py", seed=1),
        "list": lambda: registry.list(ACME),
        "resolve": lambda: registry.resolve(ACME, language="python"),
        "create_tenant": lambda: registry.create_tenant("globex"),
        "authenticate": lambda: registry.authenticate(key),
        "delete": lambda: registry.delete(ACME, "py"),
    }

    shutil.rmtree(tmp_path / "db")
    (tmp_path / "db").write_text("")  # the index's directory is now a file
    assert_all_unavailable(calls, "index at")
    assert "index at" in registry.health()["index"]

    (tmp_path / "db").unlink()
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "index.sqlite3").write_bytes(os.urandom(8192))  # not a database
    with serving(registry) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert_all_unavailable(calls, "not a database")
        assert_unavailable(http.get("/v1/adapters", headers=bearer(ADMIN_KEY)), "not a database")
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "not a database" in ready.json()["index"]
    stored = sorted(str(p.relative_to(blob_dir)) for p in blob_dir.rglob("*") if p.is_file())
    assert stored == [f"acme/py/{record.version}/{f}" for f in sorted((CONFIG_FILE, WEIGHTS_FILE))]


def test_a_delete_in_another_process_reaches_subscribers_here(tmp_path: Path):
    index_path, blob_dir = tmp_path / "index.sqlite3", tmp_path / "blobs"
    registry = make_registry(SqliteIndex(index_path), LocalBlobStore(blob_dir))
    register(registry, ACME, "py")
    events = Events()
    subscription = registry.subscribe(events)
    script = textwrap.dedent(
        """
        import sys
        from adapter_registry import Principal, Registry
        from adapter_registry.blobs import LocalBlobStore
        from adapter_registry.index.sqlite import SqliteIndex

        registry = Registry(SqliteIndex(sys.argv[1]), LocalBlobStore(sys.argv[2]))
        print(*[r.id for r in registry.delete(Principal("acme"), "py@1")])
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, str(index_path), str(blob_dir)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["acme/py@1"]
        events.wait_for(Event(type="deleted", tenant="acme", name="py", version=1), timeout=2)
    finally:
        subscription.close()
    assert registry.list(ACME) == [] and RESET not in events.seen
