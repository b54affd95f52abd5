"""The engine's :class:`AdapterSource` backed by the adapter registry.

* Refs are tenant-qualified (``acme/python-style`` @ ``3``): two tenants' adapters of the same
  name can never share a cache entry or a bank slot.
* The ingress resolves each request's adapter once and sends the record; :meth:`admit` takes
  it, so the replica fetches by that record without asking the index again. A name without a
  record (the engine used directly) is resolved against the index; the last answer per
  (tenant, name) is remembered: while the index is unreachable, adapters that were already
  being served keep serving (the registry's own writes answer 503).
* A fetch that fails because the store is unreachable, or because the version's files are gone
  (deleted after the ingress resolved it), is remembered (:meth:`fetch_failure`), so the
  replica answers that request 503 + Retry-After, or 404, rather than "not servable".
* :meth:`watch` subscribes to the registry's events: a deleted version is dropped from the
  engine's caches at once and remembered, so a record resolved before the deletion and
  arriving after it is refused (404); in-flight requests finish on the weights they started
  with.
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
from adapter_registry.names import GLOBAL, AdapterSpec, InvalidVersion
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
        self._by_id: OrderedDict[str, AdapterRecord] = OrderedDict()  # admitted records
        self._by_ref: dict[AdapterRef, AdapterRecord] = {}
        self._deleted: OrderedDict[str, None] = OrderedDict()  # ids of deleted versions
        self._remember = remember
        # record id → (HTTP status, code) of its last fetch's failure: the store was down (503)
        # or the files were gone (404)
        self._failed: dict[str, tuple[int, str]] = {}

    @staticmethod
    def ref_of(record: AdapterRecord) -> AdapterRef:
        return AdapterRef(f"{record.tenant}/{record.name}", str(record.version))

    def admit(self, record: AdapterRecord) -> None:
        """The ingress resolved ``record`` for a request: serve it without asking the index
        again, unless this replica has heard that version was deleted."""
        with self._lock:
            if record.id in self._deleted:
                return
            self._by_id[record.id] = record
            self._by_id.move_to_end(record.id)
            self._by_ref[self.ref_of(record)] = record
            while len(self._by_id) > self._remember:
                self._by_id.popitem(last=False)

    def resolve(self, name: str, tenant: str) -> AdapterRef:
        """``name`` or ``name@version`` as ``tenant`` sees it (its own, then public adapters),
        or a record id ``scope/name@version`` whose scope is ``tenant`` or the public one.

        Parsed by the one grammar (``AdapterSpec``): a malformed version is a bad request
        (``RequestError``, 400); an invalid or unknown name is an unknown adapter (404), as it
        is for a completion's ``model``."""
        try:
            spec = AdapterSpec.parse(name, scoped="/" in name)
        except InvalidVersion as e:
            raise RequestError(e.message) from e
        except InvalidName as e:
            raise UnknownAdapterError(e.message) from e
        if spec.scope is not None and spec.scope not in (tenant, GLOBAL):
            raise UnknownAdapterError(f"unknown adapter {spec.name!r}")  # another tenant's
        with self._lock:
            admitted = self._by_id.get(str(spec)) if spec.scope is not None else None
        if admitted is not None:
            return self.ref_of(admitted)
        record = self._look_up(spec, name, tenant)
        ref = self.ref_of(record)
        with self._lock:
            self._by_name[(tenant, name)] = record
            self._by_name.move_to_end((tenant, name))
            self._by_ref[ref] = record
            while len(self._by_name) > self._remember:
                self._by_name.popitem(last=False)
        return ref

    def _look_up(self, spec: AdapterSpec, name: str, tenant: str) -> AdapterRecord:
        """The index's answer; through an outage, the last answer for this name."""
        who = Principal(None if spec.scope == GLOBAL else tenant)
        bare = str(AdapterSpec(spec.name, spec.version))
        try:
            return self.registry.get(who, bare, allow_global=spec.scope is None)
        except NotFound as e:
            raise UnknownAdapterError(e.message) from e
        except Unavailable:
            with self._lock:
                record = self._by_name.get((tenant, name))
            if record is None:
                raise
            log.warning("registry unreachable: serving %s from the last resolution", record.id)
            return record

    def fetch(self, ref: AdapterRef, cache_dir: Path) -> Path:
        with self._lock:
            record = self._by_ref.get(ref)
        if record is None:
            raise UnknownAdapterError(f"adapter {ref.label} was not resolved here")
        try:
            path = self.registry.fetch(record, cache_dir)
        except (Unavailable, NotFound) as e:
            failure = (503, "adapter_store_unavailable")
            if isinstance(e, NotFound):
                failure = (404, "model_not_found")
            with self._lock:
                self._failed[record.id] = failure
            raise
        with self._lock:
            self._failed.pop(record.id, None)
        return path

    def fetch_failure(self, adapter_id: str | None) -> tuple[int, str] | None:
        """``(status, code)`` if the last fetch of the record ``adapter_id``
        (``tenant/name@version``) failed on an unreachable store (503: retry) or on files that
        are gone (404: the version was deleted), not on a bad adapter."""
        with self._lock:
            return self._failed.get(adapter_id) if adapter_id is not None else None

    def forget(self, tenant: str, name: str, deleted: int | None = None) -> None:
        """Drop remembered resolutions of ``tenant/name`` (all versions); ``deleted`` is a
        version that must never be admitted again."""
        with self._lock:
            if deleted is not None:
                self._deleted[AdapterRecord.make_id(tenant, name, deleted)] = None
                while len(self._deleted) > self._remember:
                    self._deleted.popitem(last=False)
            for key in [
                k for k, r in self._by_name.items() if (r.tenant, r.name) == (tenant, name)
            ]:
                del self._by_name[key]
            for key in [k for k, r in self._by_id.items() if (r.tenant, r.name) == (tenant, name)]:
                del self._by_id[key]
            for ref in [r for r in self._by_ref if r.name == f"{tenant}/{name}"]:
                del self._by_ref[ref]

    def watch(self, engine: Invalidates, cache_dir: Path | None = None) -> Subscription:
        """Keep ``engine`` in step with the registry until the subscription is closed."""

        def on_event(event: Event) -> None:
            if event.type == "deleted":
                self.forget(event.tenant, event.name, deleted=event.version)
                if cache_dir is not None:
                    path = Path(cache_dir) / event.tenant / event.name / str(event.version)
                    shutil.rmtree(path, ignore_errors=True)
                engine.invalidate_adapter(f"{event.tenant}/{event.name}")
                log.info(
                    "adapter %s/%s@%d deleted: dropped", event.tenant, event.name, event.version
                )
            elif event.type == "reset":  # events may have been missed: re-check what we hold
                with self._lock:
                    held = list({r.id: r for r in self._by_ref.values()}.values())
                for record in held:
                    if self._gone(record):
                        self.forget(record.tenant, record.name, deleted=record.version)
                        engine.invalidate_adapter(f"{record.tenant}/{record.name}")

        return self.registry.subscribe(on_event)

    def _gone(self, record: AdapterRecord) -> bool:
        try:
            now = self.registry.index.get(record.tenant, record.name, record.version)
        except Unavailable:
            return False  # cannot tell yet; the next reset asks again
        return now is None or now.status is not AdapterStatus.READY
