"""Brute-force protection for API keys: too many failed keys from one client lock it out.

A client (the peer address the server sees) that presents ``max_failures`` bad keys within
``window_s`` seconds is refused with 429 until ``window_s`` seconds after its first counted
failure — even with a correct key, so a guess made during the lockout cannot be confirmed.
Memory is bounded: at most ``max_clients`` clients are tracked, the oldest evicted first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

DEFAULT_MAX_FAILURES = 20
DEFAULT_WINDOW_S = 60.0


class FailedKeyLimiter:
    """Counts failed authentications per client in a fixed window that starts at the first."""

    def __init__(
        self,
        max_failures: int = DEFAULT_MAX_FAILURES,
        window_s: float = DEFAULT_WINDOW_S,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        if max_failures < 1 or window_s <= 0:
            raise ValueError("max_failures must be >= 1 and window_s > 0")
        self.max_failures, self.window_s = max_failures, window_s
        self.max_clients, self.clock = max_clients, clock
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # client → (start, n)
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> float | None:
        """Seconds until ``client`` may try again, or None if it is not locked out."""
        with self._lock:
            entry = self._current(client)
            if entry is None or entry[1] < self.max_failures:
                return None
            return entry[0] + self.window_s - self.clock()

    def failed(self, client: str) -> None:
        with self._lock:
            start, n = self._current(client) or (self.clock(), 0)
            self._failures.pop(client, None)
            self._failures[client] = (start, n + 1)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)

    def _current(self, client: str) -> tuple[float, int] | None:
        entry = self._failures.get(client)
        if entry is not None and self.clock() - entry[0] >= self.window_s:
            del self._failures[client]
            return None
        return entry
