"""The replicas' engine state as the admin ``/metrics`` shows it, and whether it is idle.

Replicas report ``flora_engine_state{replica,what}`` on their responses' chunks (at most once a
second, and on every last chunk), so the gauges are as fresh as the last chunk: a replica with
no traffic never refreshes them. :func:`wait_idle` therefore sends a one-token probe on the
base model before each read; the probe's own final report is taken after it left the batch, so
an idle replica reads ``running 0, waiting 0, kv_blocks_free == kv_blocks_total,
adapter_slots_in_use 0``. A probe refreshes only the replica it was routed to, so the check
probes until every replica has answered one, and names those that never did (``stale``).

The replica label is ``host:pid``; where the host is this machine the process RSS is read too.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from dataclasses import dataclass, field

import httpx

_SERIES = re.compile(
    r'^flora_engine_(?P<family>state|total)\{replica="(?P<replica>[^"]+)",what="(?P<what>[^"]+)"\}'
    r" (?P<v>\S+)$"
)


@dataclass
class ReplicaState:
    replica: str  # host:pid
    gauges: dict[str, float] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)  # steps, batched_tokens, …

    @property
    def idle(self) -> bool:
        g = self.gauges
        return (
            g.get("running") == 0
            and g.get("waiting") == 0
            and g.get("adapters_loading", 0) == 0
            and g.get("adapter_slots_in_use") == 0
            and g.get("kv_blocks_free") == g.get("kv_blocks_total")
        )

    @property
    def rss_bytes(self) -> int | None:
        """The replica process's RSS, where it runs on this machine (else None)."""
        host, _, pid = self.replica.rpartition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return None
        try:
            import psutil

            return psutil.Process(int(pid)).memory_info().rss
        except Exception:  # gone, or psutil missing
            return None

    def describe(self) -> str:
        g = self.gauges
        return (
            f"running {g.get('running', '?'):g}, waiting {g.get('waiting', '?'):g}, KV blocks "
            f"used {g.get('kv_blocks_total', 0) - g.get('kv_blocks_free', 0):g}/"
            f"{g.get('kv_blocks_total', 0):g}, adapter slots in use "
            f"{g.get('adapter_slots_in_use', '?'):g}"
        )


def parse_states(metrics_text: str) -> dict[str, ReplicaState]:
    states: dict[str, ReplicaState] = {}
    for line in metrics_text.splitlines():
        if m := _SERIES.match(line):
            state = states.setdefault(m["replica"], ReplicaState(m["replica"]))
            series = state.gauges if m["family"] == "state" else state.totals
            series[m["what"]] = float(m["v"])
    return states


async def read_states(client: httpx.AsyncClient, admin_key: str) -> dict[str, ReplicaState]:
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {admin_key}"})
    response.raise_for_status()
    return parse_states(response.text)


async def probe(client: httpx.AsyncClient, tenant: str, key: str) -> int:
    """One base-model token, so the replica it reaches reports its state; the HTTP status."""
    body = {"model": "base", "prompt": [1], "max_tokens": 1, "temperature": 0}
    path = f"/tenants/{tenant}/v1/completions"
    try:
        response = await client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
        return response.status_code
    except httpx.HTTPError:
        return 0


@dataclass
class IdleCheck:
    idle: bool
    seconds: float  # from the start of the wait until idle (or the timeout)
    states: dict[str, ReplicaState]
    stale: list[str]  # replicas that no probe reached during the wait

    def describe(self) -> str:
        parts = [f"{r}: {s.describe()}" for r, s in sorted(self.states.items())]
        verdict = f"idle after {self.seconds:.1f}s" if self.idle else "NOT idle"
        if self.stale:
            parts.append(f"never answered a probe, so not judged: {', '.join(self.stale)}")
        return f"{verdict} ({'; '.join(parts) or 'no replica reported'})"


async def wait_idle(
    url: str, admin_key: str, tenant: str, key: str, timeout: float = 30.0, every: float = 0.5
) -> IdleCheck:
    """Probe and read ``/metrics`` until every replica has answered a probe and is idle."""
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        reached: set[str] = set()
        while True:
            steps = {
                r: s.totals.get("steps") for r, s in (await read_states(client, admin_key)).items()
            }
            await probe(client, tenant, key)
            states = await read_states(client, admin_key)
            reached |= {r for r, s in states.items() if steps.get(r) != s.totals.get("steps")}
            stale = sorted(set(states) - reached)
            elapsed = time.monotonic() - start
            if states and not stale and all(s.idle for s in states.values()):
                return IdleCheck(True, elapsed, states, [])
            if elapsed > timeout:
                return IdleCheck(False, elapsed, states, stale)
            await asyncio.sleep(every)
