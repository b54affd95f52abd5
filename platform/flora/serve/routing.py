"""Adapter affinity across replicas (Ray Serve's custom request router API).

Ray's multiplexing would route by a model id header, but ``@serve.batch`` with multiplexing
splits batches per model id — the opposite of FLoRA, whose point is one batch across all
tenants' adapters. So the adapter id travels in the request body and this router only *prefers*:

1. replicas where the request's adapter is already resident in a bank slot and that are not
   much busier than the least-loaded replica (``slack`` requests);
2. then every replica, least loaded first.

Residency and load come from each replica's ``record_routing_stats`` (refreshed every
``request_routing_stats_period_s``); load also counts requests this router sent since.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from flora.serve.wire import GenerateCall


def _adapter_of(request: PendingRequest | None) -> str | None:
    """The record id (``tenant/name@version``) a generate call will be served with."""
    if request is None or not request.args or not isinstance(request.args[0], GenerateCall):
        return None
    adapter = request.args[0].adapter
    return adapter.id if adapter is not None else None


def _load(replica: RunningReplica) -> int:
    stats: dict[str, Any] = replica.routing_stats or {}
    return int(stats.get("running", 0)) + int(stats.get("waiting", 0))


def rank_replicas(
    replicas: list[RunningReplica], adapter: str | None, slack: int = 8
) -> list[list[RunningReplica]]:
    """Ranks of replicas, most preferred first (a pure function, tested without Ray)."""
    by_load = sorted(replicas, key=_load)
    if adapter is None or not by_load:
        return [by_load]
    floor = _load(by_load[0])
    warm = [
        r
        for r in by_load
        if _load(r) <= floor + slack and adapter in (r.routing_stats or {}).get("resident", ())
    ]
    rest = [r for r in by_load if r not in warm]
    return [warm, rest] if warm else [rest]


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        return rank_replicas(candidate_replicas, _adapter_of(pending_request))
