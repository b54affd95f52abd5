"""A memory-bounded LRU of materialised adapted weights ``W ∘ M_i``, shared by all layers.

Materialising costs ``out·in·r`` multiply-adds per adapter and layer; for a hot adapter that is
paid once, after which its tokens cost one plain GEMM. Entries are keyed by the bank slot's
version, so a reloaded or evicted slot can never be served from a stale entry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class MaterialisedCache:
    """LRU of ``[out, in]`` tensors bounded by ``max_bytes`` (0 disables caching)."""

    def __init__(self, max_bytes: int = 512 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get_or_make(self, key: Hashable, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Return the cached tensor for ``key``, building (and caching if it fits) on a miss."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                return hit
            self.stats.misses += 1
        value = make()
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return value
        with self._lock:
            while self._bytes + size > self.max_bytes and self._entries:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()
                self.stats.evictions += 1
            self._entries[key] = value
            self._bytes += size
        return value

    def discard(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every entry whose key matches (a slot was evicted); returns how many."""
        with self._lock:
            doomed = [k for k in self._entries if predicate(k)]
            for key in doomed:
                value = self._entries.pop(key)
                self._bytes -= value.numel() * value.element_size()
        return len(doomed)
