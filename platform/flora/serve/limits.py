"""Per-tenant admission: a token bucket for rate, a cap on open requests, a global queue bound.

Refusals carry ``retry_after`` (seconds) for the 429's ``Retry-After`` header; nothing is ever
dropped silently. State lives in the ingress process, so limits apply per ingress replica.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flora.serve.config import LimitsConfig


class TooManyRequests(Exception):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.message = message
        self.retry_after = max(1, math.ceil(retry_after))


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    open: int = 0


class TenantLimiter:
    def __init__(self, config: LimitsConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        self._buckets: dict[str, _Bucket] = {}
        self._in_flight = 0
        self._lock = threading.Lock()

    @contextmanager
    def admit(self, tenant: str) -> Iterator[None]:
        """Hold one of ``tenant``'s request slots for the duration, or raise TooManyRequests."""
        self.acquire(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def acquire(self, tenant: str) -> None:
        """Take one of ``tenant``'s request slots (pair with :meth:`release`)."""
        c = self.config
        with self._lock:
            now = self.clock()
            bucket = self._buckets.setdefault(tenant, _Bucket(float(c.burst), now))
            bucket.tokens = min(
                c.burst, bucket.tokens + (now - bucket.stamp) * c.requests_per_second
            )
            bucket.stamp = now
            if self._in_flight >= c.max_in_flight:
                raise TooManyRequests(
                    f"the server is at capacity ({c.max_in_flight} open requests); retry shortly", 1
                )
            if bucket.open >= c.max_concurrent:
                raise TooManyRequests(
                    f"tenant {tenant!r} has {bucket.open} open requests (limit {c.max_concurrent})",
                    1,
                )
            if bucket.tokens < 1:
                wait = (1 - bucket.tokens) / c.requests_per_second
                raise TooManyRequests(
                    f"tenant {tenant!r} is over {c.requests_per_second:g} requests/s", wait
                )
            bucket.tokens -= 1
            bucket.open += 1
            self._in_flight += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            self._buckets[tenant].open -= 1
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight
