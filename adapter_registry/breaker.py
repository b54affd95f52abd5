"""Fail fast while a backend is known to hang, instead of waiting out its timeout on each call.

A hung Redis (a stopped process, a dead network path) accepts connections and never answers, so
every call waits for its socket timeout (a refused connection fails fast by itself). Without a
breaker each request pays that wait, several times over, before the last-known answers
(:mod:`adapter_registry.last_known`) can serve it. After a timeout the :class:`Breaker` opens
for ``cooldown_s``: calls raise :class:`Unavailable` at once. Then one call probes the backend
while the others keep failing fast; its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from adapter_registry.errors import Unavailable


class Breaker:
    def __init__(self, cooldown_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.cooldown_s, self.clock = cooldown_s, clock
        self._open_until: float | None = None  # None: closed
        self._probing = False
        self._message = ""
        self._lock = threading.Lock()

    def before(self) -> None:
        """Raise :class:`Unavailable` while open; after the cool-down let one caller probe."""
        with self._lock:
            if self._open_until is None:
                return
            if self.clock() < self._open_until or self._probing:
                retry = f"failing fast; retried every {self.cooldown_s:g}s"
                raise Unavailable(f"{self._message} ({retry})")
            self._probing = True

    def failed(self, message: str) -> None:
        with self._lock:
            self._open_until = self.clock() + self.cooldown_s
            self._probing, self._message = False, message

    def succeeded(self) -> None:
        with self._lock:
            self._open_until, self._probing = None, False

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None
