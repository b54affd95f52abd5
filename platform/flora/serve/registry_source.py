"""The engine's :class:`AdapterSource` backed by the adapter registry.

* Refs are tenant-qualified (``acme/python-style`` @ ``3``): two tenants' adapters of the same
  name can never share a cache entry or a bank slot.
* Each request resolves its name against the index, so a new version serves the next request.
  The last answer per (tenant, name) is remembered: while the index is unreachable, adapters
  that were already being served keep serving (the registry's own writes answer 503).
* A fetch that fails because the store is unreachable is remembered (:meth:`unreachable`), so
  the replica answers that request 503 + Retry-After rather than 500.
* :meth:`watch` subscribes to the registry's events: a deleted version is dropped from the
  engine's caches at once; in-flight requests finish on the weights they started with.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from adapter_registry import (
    AdapterRecord,
    AdapterStatus,
    Event,
    InvalidName,
    NotFound,
    Principal,
    Registry,
    Unavailable,
)
from adapter_registry.index import Subscription
from adapter_registry.names import GLOBAL, InvalidVersion
from flora.engine.adapter_source import AdapterRef, UnknownAdapterError
from flora.engine.engine import RequestError

log = logging.getLogger(__name__)


class Invalidates(Protocol):
    def invalidate_adapter(self, name: str) -> None: ...


class RegistryAdapterSource:
    def __init__(self, registry: Registry, *, remember: int = 4096):
        self.registry = registry
        self._lock = threading.Lock()
        self._by_name: OrderedDict[tuple[str, str], AdapterRecord] = OrderedDict()
        self._by_ref: dict[AdapterRef, AdapterRecord] = {}
        self._remember = remember
        self._unreachable: set[str] = set()  # labels whose last fetch met a store outage

    @staticmethod
    def ref_of(record: AdapterRecord) -> AdapterRef:
        return AdapterRef(f"{record.tenant}/{record.name}", str(record.version))

    def resolve(self, name: str, tenant: str) -> AdapterRef:
        """``name`` or ``name@version`` as ``tenant`` sees it (its own, then public adapters),
        or a record id ``scope/name@version`` whose scope is ``tenant`` or the public one.

        Parsed as the registry and the ingress parse it (``AdapterSpec``): a malformed version
        is a bad request (``RequestError``, 400); an invalid or unknown name is an unknown
        adapter (404), as it is for a completion's ``model``."""
        scope, _, bare = name.rpartition("/")
        if scope and scope not in (tenant, GLOBAL):
            raise UnknownAdapterError(f"unknown adapter {bare!r}")  # another tenant's: not found
        who = Principal(None if scope == GLOBAL else tenant)
        try:
            record = self.registry.get(who, bare, allow_global=not scope)
        except InvalidVersion as e:
            raise RequestError(e.message) from e
        except (NotFound, InvalidName) as e:
            raise UnknownAdapterError(e.message) from e
        except Unavailable:
            with self._lock:
                record = self._by_name.get((tenant, name))
            if record is None:
                raise
            log.warning("registry unreachable: serving %s from the last resolution", record.id)
        ref = self.ref_of(record)
        with self._lock:
            self._by_name[(tenant, name)] = record
            self._by_name.move_to_end((tenant, name))
            self._by_ref[ref] = record
            while len(self._by_name) > self._remember:
                self._by_name.popitem(last=False)
        return ref

    def fetch(self, ref: AdapterRef, cache_dir: Path) -> Path:
        with self._lock:
            record = self._by_ref.get(ref)
        if record is None:
            raise UnknownAdapterError(f"adapter {ref.label} was not resolved here")
        try:
            path = self.registry.fetch(record, cache_dir)
        except Unavailable:
            with self._lock:
                self._unreachable.add(ref.label)
            raise
        with self._lock:
            self._unreachable.discard(ref.label)
        return path

    def unreachable(self, label: str | None) -> bool:
        """Whether the last fetch of ``tenant/name@version`` failed on an unreachable store
        (the request's error is then a 503 to retry, not a bad adapter)."""
        with self._lock:
            return label is not None and label in self._unreachable

    def forget(self, tenant: str, name: str) -> None:
        """Drop remembered resolutions of ``tenant/name`` (all versions)."""
        with self._lock:
            for key in [
                k for k, r in self._by_name.items() if (r.tenant, r.name) == (tenant, name)
            ]:
                del self._by_name[key]
            for ref in [r for r in self._by_ref if r.name == f"{tenant}/{name}"]:
                del self._by_ref[ref]

    def watch(self, engine: Invalidates, cache_dir: Path | None = None) -> Subscription:
        """Keep ``engine`` in step with the registry until the subscription is closed."""

        def on_event(event: Event) -> None:
            if event.type == "deleted":
                self.forget(event.tenant, event.name)
                if cache_dir is not None:
                    path = Path(cache_dir) / event.tenant / event.name / str(event.version)
                    shutil.rmtree(path, ignore_errors=True)
                engine.invalidate_adapter(f"{event.tenant}/{event.name}")
                log.info(
                    "adapter %s/%s@%d deleted: dropped", event.tenant, event.name, event.version
                )
            elif event.type == "reset":  # events may have been missed: re-check what we hold
                with self._lock:
                    held = list(self._by_ref.values())
                for record in held:
                    if self._gone(record):
                        self.forget(record.tenant, record.name)
                        engine.invalidate_adapter(f"{record.tenant}/{record.name}")

        return self.registry.subscribe(on_event)

    def _gone(self, record: AdapterRecord) -> bool:
        try:
            now = self.registry.index.get(record.tenant, record.name, record.version)
        except Unavailable:
            return False  # cannot tell yet; the next reset asks again
        return now is None or now.status is not AdapterStatus.READY
