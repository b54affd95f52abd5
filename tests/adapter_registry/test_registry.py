"""The registry's operations on both backends: versions, tenants, public adapters, resolution,
deletion, concurrent writers, crash-safety and verified downloads."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapter_registry import (
    AdapterMeta,
    Event,
    IntegrityError,
    InvalidName,
    NotFound,
    Principal,
    Registry,
    Unavailable,
)
from adapter_registry.blobs import LocalBlobStore, parse_s3_uri
from adapter_registry.formats import WEIGHTS_FILE
from adapter_registry.names import GLOBAL
from tests.adapter_registry.conftest import SPEC, adapter_bytes

ACME, GLOBEX, ADMIN = Principal("acme"), Principal("globex"), Principal(None)


def register(registry: Registry, who: Principal, name: str, kind="flora", rank=2, seed=0, **meta):
    config, weights = adapter_bytes(kind, rank, seed)
    return registry.register(who, AdapterMeta(name, **meta), config, weights)


def test_register_describes_the_adapter(registry: Registry):
    config, weights = adapter_bytes("lora", 4)
    record = registry.register(ACME, AdapterMeta("py", language="python"), config, weights)
    assert (record.tenant, record.name, record.version, record.id) == ("acme", "py", 1, "acme/py@1")
    assert (record.kind, record.rank, record.alpha, record.base_model) == (
        "lora",
        4,
        8.0,
        SPEC.name,
    )
    assert record.target_modules == ["c_attn"]
    assert record.sha256 == hashlib.sha256(weights).hexdigest() and record.size == len(weights)
    assert record.uri.endswith("acme/py/1") and record.language == "python"
    assert registry.list(ACME) == [record]
    assert registry.get(ACME, "py") == registry.get(ACME, "py@1") == record


def test_versions_count_up_and_name_at_version_pins_one(registry: Registry):
    first = register(registry, ACME, "py", seed=1)
    second = register(registry, ACME, "py", seed=2, rank=3)
    assert (first.version, second.version) == (1, 2)
    assert registry.get(ACME, "py") == second
    assert registry.get(ACME, "py@1") == first
    assert registry.versions(ACME, "py") == [second, first]
    assert registry.list(ACME) == [second]  # newest of each name


def test_delete_one_version_then_all(registry: Registry, tmp_path: Path):
    first, second = register(registry, ACME, "py", seed=1), register(registry, ACME, "py", seed=2)
    assert [r.id for r in registry.delete(ACME, "py@2")] == [second.id]
    assert registry.get(ACME, "py") == first
    with pytest.raises(NotFound):
        registry.get(ACME, "py@2")
    with pytest.raises(NotFound):  # its bytes are gone too
        registry.fetch(second, tmp_path / "cache")
    registry.delete(ACME, "py")
    with pytest.raises(NotFound):
        registry.versions(ACME, "py")
    assert registry.list(ACME) == []
    assert register(registry, ACME, "py").version == 3  # numbers are never reused


def test_tenants_never_see_each_others_adapters(registry: Registry):
    mine = register(registry, ACME, "py", language="python", user="ann")
    for attempt in (
        lambda: registry.get(GLOBEX, "py"),
        lambda: registry.get(GLOBEX, "py@1"),
        lambda: registry.versions(GLOBEX, "py"),
        lambda: registry.delete(GLOBEX, "py"),
        lambda: registry.resolve(GLOBEX, adapter="py"),
    ):
        with pytest.raises(NotFound):
            attempt()
    assert registry.list(GLOBEX, include_global=True) == []
    assert registry.resolve(GLOBEX, user="ann", language="python").adapter is None
    theirs = register(registry, GLOBEX, "py", seed=5)  # same name, separate namespace
    assert theirs.version == 1 and theirs.sha256 != mine.sha256
    assert registry.get(ACME, "py") == mine


def test_public_adapters_serve_every_tenant_but_only_admin_deletes_them(registry: Registry):
    public = register(registry, ADMIN, "perl-base", language="perl")
    assert public.tenant == GLOBAL
    assert registry.get(ACME, "perl-base") == public
    assert registry.list(ACME) == [] and registry.list(ACME, include_global=True) == [public]
    with pytest.raises(NotFound):
        registry.delete(ACME, "perl-base")
    own = register(registry, ACME, "perl-base", seed=3)
    assert registry.get(ACME, "perl-base") == own  # a tenant's own name shadows the public one
    registry.delete(ADMIN, "perl-base")
    assert registry.get(ACME, "perl-base") == own


def test_resolution_order_and_reasons(registry: Registry):
    public = register(registry, ADMIN, "py-public", language="python")
    assert registry.resolve(ACME, language="python").adapter == public
    team = register(registry, ACME, "py-team", language="python")
    ann_any = register(registry, ACME, "ann", user="ann")
    ann_py = register(registry, ACME, "ann-py", user="ann", language="python")
    cases = {
        ("ann", "python"): (ann_py, "user+language"),
        ("ann", "perl"): (ann_any, "user"),
        ("ann", None): (ann_any, "user"),
        ("bob", "python"): (team, "language"),
        (None, "python"): (team, "language"),
    }
    for (user, language), (expected, rule) in cases.items():
        resolution = registry.resolve(ACME, user=user, language=language)
        assert (resolution.adapter, resolution.rule) == (expected, rule), (user, language)
        assert resolution.reason.startswith(expected.label)
    base = registry.resolve(ACME, user="bob", language="perl")
    assert base.adapter is None and base.rule == "base" and "perl" in base.reason
    explicit = registry.resolve(ACME, adapter="py-team@1", user="ann", language="python")
    assert (explicit.adapter, explicit.rule) == (team, "explicit")
    newer = register(registry, ACME, "py-team-2", language="python")
    assert registry.resolve(ACME, language="python").adapter == newer


def test_concurrent_registrations_each_get_their_own_version(registry: Registry):
    barrier = threading.Barrier(8)

    def one(seed: int):
        config, weights = adapter_bytes("flora", 2, seed)
        barrier.wait()
        return registry.register(ACME, AdapterMeta("py"), config, weights)

    with ThreadPoolExecutor(8) as pool:
        records = list(pool.map(one, range(8)))
    assert sorted(r.version for r in records) == list(range(1, 9))
    stored = registry.versions(ACME, "py")
    assert {r.sha256 for r in stored} == {r.sha256 for r in records}  # no lost write


@pytest.mark.parametrize(
    "name", ["a/b", "..", "a..b", "x\x00y", "n" * 300, "Caps", "", "-lead", "resolve", "base"]
)
def test_bad_names_are_refused_before_anything_is_written(registry: Registry, name: str):
    config, weights = adapter_bytes()
    with pytest.raises(InvalidName):
        registry.register(ACME, AdapterMeta(name), config, weights)
    with pytest.raises(InvalidName):
        registry.create_tenant(name if name not in ("resolve", "base") else "a/b")
    assert registry.index.list("acme") == []


def test_fetch_verifies_the_sha256(registry: Registry, tmp_path: Path):
    record = register(registry, ACME, "py")
    path = registry.fetch(record, tmp_path / "a")
    assert hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest() == record.sha256
    _, other = adapter_bytes(seed=9)
    overwrite(registry.blobs, record.uri + "/" + WEIGHTS_FILE, other)  # swapped behind our back
    with pytest.raises(IntegrityError, match="refusing"):
        registry.fetch(record, tmp_path / "b")
    assert not (tmp_path / "b" / WEIGHTS_FILE).exists()


def overwrite(blobs, uri: str, data: bytes) -> None:
    if isinstance(blobs, LocalBlobStore):
        Path(uri.removeprefix("file://")).write_bytes(data)
    else:
        bucket, key = parse_s3_uri(uri)
        blobs.client.put_object(Bucket=bucket, Key=key, Body=data)


class FailingPut:
    """Fault injection (a mock, as the brief allows): the index write fails after the blob was
    written — a crash between the two steps cannot be timed with a real server."""

    def __init__(self, index):
        self._index = index

    def put(self, record):
        raise Unavailable("index went away")

    def __getattr__(self, name):
        return getattr(self._index, name)


def test_a_failed_index_write_leaves_no_record_and_no_blob(registry: Registry, tmp_path: Path):
    real = registry.index
    registry.index = FailingPut(real)
    with pytest.raises(Unavailable):
        register(registry, ACME, "py")
    registry.index = real
    assert real.list("acme") == []
    with pytest.raises(NotFound):
        registry.blobs.get(registry.blobs.uri("acme", "py", 1), tmp_path, [WEIGHTS_FILE])


def test_deletion_is_announced_to_subscribers(registry: Registry):
    seen: list[Event] = []
    arrived = threading.Event()

    def on_event(event: Event) -> None:
        seen.append(event)
        if event.type == "deleted":
            arrived.set()

    subscription = registry.subscribe(on_event)
    try:
        register(registry, ACME, "py")
        registry.delete(ACME, "py@1")
        assert arrived.wait(10), seen
    finally:
        subscription.close()
    assert Event(type="deleted", tenant="acme", name="py", version=1) in seen
    assert Event(type="registered", tenant="acme", name="py", version=1) in seen
