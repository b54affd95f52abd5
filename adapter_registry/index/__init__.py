"""Metadata index backends: Redis (production) and SQLite (embedded default)."""

from adapter_registry.index.base import EventCallback, Index, Subscription

__all__ = ["EventCallback", "Index", "Subscription"]
