"""Adapter tiers: device bank slots ← host memory ← local disk ← an :class:`AdapterSource`.

Fetching, parsing and validating run on worker threads; only the copy into a free bank slot
happens on the engine's step thread (a few small memcpys). A request whose adapter is still
loading simply is not admitted yet, so it never stalls the batch. Slots in use by a running
request are never evicted; idle ones leave in least-recently-used order, pinned ones never.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from flora.engine.adapter_source import AdapterRef, AdapterSource
from flora.model.adapter_files import AdapterFile

log = logging.getLogger(__name__)

Loader = Callable[[Path], AdapterFile]  # parses and validates a directory for this model


class AdapterLoadError(Exception):
    """The adapter could not be fetched or does not fit this model."""


@dataclass
class CacheStats:
    device_hits: int = 0
    host_hits: int = 0
    loads: int = 0  # fetched from the source (disk or remote) and parsed
    failures: int = 0
    evictions: int = 0


class AdapterCache:
    """Tracks which adapter sits in which bank slot, and moves adapters between tiers."""

    def __init__(
        self,
        source: AdapterSource,
        loader: Loader,
        install: Callable[[int, AdapterFile], None],
        num_slots: int,
        *,
        cache_dir: Path,
        host_bytes: int = 1 << 30,
        workers: int = 2,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.source, self.loader, self.install = source, loader, install
        self.cache_dir, self.host_bytes = cache_dir, host_bytes
        self.on_ready = on_ready or (lambda: None)
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="adapter-load")
        self._loading: dict[AdapterRef, Future[AdapterFile]] = {}
        self._failed: dict[AdapterRef, str] = {}
        self._host: OrderedDict[AdapterRef, AdapterFile] = OrderedDict()
        self._slot_of: dict[AdapterRef, int] = {}
        self._ref_in: list[AdapterRef | None] = [None] * num_slots
        self._users = [0] * num_slots
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(num_slots))
        self._stale: set[int] = set()  # invalidated while in use: freed once idle
        self._pinned: set[str] = set()

    # --- called from the engine thread -----------------------------------------------------

    def acquire(self, ref: AdapterRef) -> int | None:
        """The slot holding ``ref`` (one more user), or None while it loads.

        Raises :class:`AdapterLoadError` if loading failed.
        """
        slot = self._slot_of.get(ref)
        if slot is not None:
            self.stats.device_hits += 1
            self._use(slot)
            return slot
        with self._lock:
            if ref in self._failed:
                raise AdapterLoadError(self._failed.pop(ref))
            adapter = self._host.get(ref)
            if adapter is not None:
                self._host.move_to_end(ref)
        if adapter is None:
            self._start_load(ref)
            return None
        slot = self._free_slot()
        if slot is None:
            return None  # every slot is busy: wait for a running request to finish
        self.stats.host_hits += 1
        try:
            self.install(slot, adapter)
        except Exception as e:  # refused by the bank: the slot goes back, the request fails
            self._drop_slot(slot)
            with self._lock:
                self._host.pop(ref, None)
                self.stats.failures += 1
            raise AdapterLoadError(f"adapter {ref.name!r} cannot be served: {e}") from e
        self._ref_in[slot], self._slot_of[ref] = ref, slot
        self._use(slot)
        return slot

    def release(self, slot: int) -> None:
        self._users[slot] -= 1
        if self._users[slot] == 0:
            if slot in self._stale:
                self._stale.discard(slot)
                self._drop_slot(slot)
            else:
                self._idle[slot] = None  # most recently used at the end

    def invalidate(self, name: str) -> None:
        """Forget every cached version of ``name``; slots in use finish on what they hold."""
        with self._lock:
            for ref in [r for r in self._host if r.name == name]:
                del self._host[ref]
        for ref, slot in list(self._slot_of.items()):
            if ref.name != name:
                continue
            del self._slot_of[ref]
            if self._users[slot]:
                self._stale.add(slot)
            else:
                self._drop_slot(slot)

    def pin(self, name: str) -> None:
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        self._pinned.discard(name)

    def resident(self) -> dict[str, int]:
        """``name@version`` → slot, for logs and routing affinity."""
        return {ref.label: slot for ref, slot in self._slot_of.items()}

    def in_use(self) -> int:
        return sum(1 for u in self._users if u)

    def _use(self, slot: int) -> None:
        self._users[slot] += 1
        self._idle.pop(slot, None)

    def _free_slot(self) -> int | None:
        for slot in self._idle:
            ref = self._ref_in[slot]
            if ref is None or ref.name not in self._pinned:
                del self._idle[slot]
                if ref is not None:
                    self.stats.evictions += 1
                    del self._slot_of[ref]
                    self._ref_in[slot] = None
                return slot
        return None

    def _drop_slot(self, slot: int) -> None:
        self._ref_in[slot] = None
        self._idle[slot] = None
        self._idle.move_to_end(slot, last=False)  # reuse first

    # --- background loading ----------------------------------------------------------------

    def _start_load(self, ref: AdapterRef) -> None:
        with self._lock:
            if ref in self._loading:
                return
            self._loading[ref] = self._pool.submit(self._load, ref)

    def _load(self, ref: AdapterRef) -> AdapterFile:
        try:
            directory = self.source.fetch(ref, self.cache_dir / ref.name / ref.version)
            adapter = self.loader(directory)
        except Exception as e:  # any failure becomes the request's error, never a crash
            log.warning("adapter %s failed to load: %s", ref.label, e)
            with self._lock:
                self._failed[ref] = f"adapter {ref.name!r} could not be loaded: {e}"
                self._loading.pop(ref, None)
                self.stats.failures += 1
            self.on_ready()
            raise
        with self._lock:
            self._host[ref] = adapter
            self._loading.pop(ref, None)
            self.stats.loads += 1
            while (
                len(self._host) > 1 and sum(a.nbytes for a in self._host.values()) > self.host_bytes
            ):
                self._host.popitem(last=False)
        log.info("adapter %s loaded (%s, rank %d)", ref.label, adapter.kind, adapter.rank)
        self.on_ready()
        return adapter

    def pending(self) -> int:
        with self._lock:
            return len(self._loading)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
