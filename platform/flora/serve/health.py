"""Readiness that tells the truth: a replica must answer a ping through its engine thread."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol


class Pingable(Protocol):
    async def ping(self) -> None:
        """Return once a replica answered through its engine thread (the caller bounds the wait)."""
        ...


class ReplicaHealth:
    """Whether a replica answered a health ping lately: ``/readyz`` must not say ready while the
    only replica is frozen (the cached ``model_info`` would let it).

    Each check pings (``Backend.ping``: a round trip through a replica's engine thread) and waits
    at most ``timeout_s``; concurrent checks share the ping in flight, so probes never pile pings
    up. Ready while some ping answered within the last ``window_s``: one slow answer (a long
    engine step) does not flip readiness, a replica that stays silent does, within
    ``window_s + timeout_s``. Nothing here blocks the event loop.
    """

    def __init__(
        self,
        backend: Pingable,
        timeout_s: float,
        window_s: float,
        clock: Any = time.monotonic,
    ):
        self.backend, self.clock = backend, clock
        self.timeout_s, self.window_s = timeout_s, window_s
        self.last_ok: float | None = None  # when a ping last answered
        self.failure: str | None = None  # why the latest ping did not (None: it did)
        self._ping: asyncio.Future[None] | None = None

    async def check(self) -> tuple[bool, str]:
        """``(ready, "ok" or why not)`` after one ping, answered or timed out."""
        ping = self._ping
        if ping is None or ping.done() or ping.get_loop() is not asyncio.get_running_loop():
            ping = self._ping = asyncio.ensure_future(self._ping_once())
        await asyncio.shield(ping)  # a client that leaves does not cancel the shared ping
        now = self.clock()
        age = None if self.last_ok is None else now - self.last_ok
        if age is not None and age <= self.window_s:
            if self.failure is None:
                return True, "ok"
            return True, f"ok: a replica answered {age:.1f}s ago; the latest ping: {self.failure}"
        last = "never" if age is None else f"{age:.0f}s ago"
        return False, (
            f"no replica answered a health ping within {self.window_s:g}s (last answer: {last}; "
            f"the latest ping: {self.failure})"
        )

    async def _ping_once(self) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self.backend.ping()
        except TimeoutError:
            self.failure = f"no answer within {self.timeout_s:g}s (engine loop frozen or busy?)"
        except Exception as e:  # a stopped engine, a dead replica, no replica yet
            self.failure = f"{type(e).__name__}: {e}"[:300]
        else:
            self.last_ok, self.failure = self.clock(), None
