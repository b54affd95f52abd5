"""The last answer of each index read, to serve reads while the index is unreachable.

A Redis outage must not stop serving tenants whose keys and adapters were read before it:
:meth:`LastKnown.read` returns the fresh answer when the index answers (and remembers it), and
the remembered one when the index raises :class:`Unavailable` — for at most ``max_age_s`` after
it was read. Writes never go through here: they still answer 503. Entries are bounded (least
recently read evicted first); ``max_age_s == 0`` turns the fallback off.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from adapter_registry.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


class LastKnown:
    def __init__(
        self,
        max_age_s: float = 300.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_age_s, self.max_entries, self.clock = max_age_s, max_entries, clock
        self._answers: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._warned_at = float("-inf")

    def read(
        self, key: Hashable, fetch: Callable[[], T], keep: Callable[[T], bool] = lambda _: True
    ) -> T:
        """``fetch()``; if the index is unavailable, the answer remembered under ``key``."""
        try:
            value = fetch()
        except Unavailable as e:
            with self._lock:
                found = self._answers.get(key)
                if found is None or self.clock() - found[0] > self.max_age_s:
                    raise
                self._warn(e)
                return found[1]
        if self.max_age_s > 0 and keep(value):
            with self._lock:
                self._answers[key] = (self.clock(), value)
                self._answers.move_to_end(key)
                while len(self._answers) > self.max_entries:
                    self._answers.popitem(last=False)
        return value

    def _warn(self, error: Unavailable) -> None:
        now = self.clock()
        if now - self._warned_at > 10:  # once per 10 s, not once per request
            self._warned_at = now
            log.warning("%s; answering reads from the last known index", error.message)
