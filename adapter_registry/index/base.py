"""The metadata index interface that the Redis and embedded (SQLite) backends implement.

The index holds records, tenants and key hashes, hands out versions, and carries invalidation
events. It never sees adapter bytes. Backends raise :class:`~adapter_registry.errors.Unavailable`
when their server is unreachable so the API can answer 503 instead of 500.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable

from adapter_registry.records import AdapterRecord, AdapterStatus, Event, Tenant

EventCallback = Callable[[Event], None]
log = logging.getLogger(__name__)


def deliver(callback: EventCallback, event: Event) -> None:
    """Call a subscriber without letting its bug stop the subscription thread."""
    try:
        callback(event)
    except Exception:
        log.exception("event subscriber failed on %s", event)


class Subscription(ABC):
    """A running event subscription; ``close()`` stops its thread."""

    @abstractmethod
    def close(self) -> None: ...


class Index(ABC):
    # --- tenants and keys ---------------------------------------------------------------
    @abstractmethod
    def create_tenant(self, tenant: Tenant, key_hash: str) -> None:
        """Raises :class:`~adapter_registry.errors.Conflict` if the name is taken."""

    @abstractmethod
    def add_key(self, tenant: str, key_hash: str) -> None: ...

    @abstractmethod
    def get_tenant(self, name: str) -> Tenant | None: ...

    @abstractmethod
    def list_tenants(self) -> list[Tenant]: ...

    @abstractmethod
    def tenant_for_key(self, key_hash: str) -> str | None: ...

    # --- adapters ---------------------------------------------------------------------------
    @abstractmethod
    def next_version(self, tenant: str, name: str) -> int:
        """A fresh version number for ``tenant/name``: atomic, never reused (gaps are fine)."""

    @abstractmethod
    def put(self, record: AdapterRecord) -> None:
        """Store a record and its lookup entries in one atomic step."""

    @abstractmethod
    def get(self, tenant: str, name: str, version: int) -> AdapterRecord | None: ...

    @abstractmethod
    def list(
        self,
        tenant: str,
        *,
        name: str | None = None,
        user: str | None = None,
        language: str | None = None,
    ) -> list[AdapterRecord]:
        """Records of ``tenant`` (any status), newest version first, filtered exactly."""

    @abstractmethod
    def set_status(self, tenant: str, name: str, version: int, status: AdapterStatus) -> None: ...

    @abstractmethod
    def remove(self, tenant: str, name: str, version: int) -> None: ...

    # --- events and health ------------------------------------------------------------------
    @abstractmethod
    def publish(self, event: Event) -> None: ...

    @abstractmethod
    def subscribe(self, callback: EventCallback) -> Subscription:
        """Call ``callback`` for every event from now on, from a background thread.

        After a lost connection the callback gets an ``Event(type="reset")``: events may have
        been missed, so caches should re-check what they hold.
        """

    @abstractmethod
    def ping(self) -> None:
        """Raises :class:`~adapter_registry.errors.Unavailable` if the backend is down."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Release connections."""
