"""Prometheus metrics of the ingress, plus the engine counters each replica reports.

Tenant and adapter labels are bounded: the first ``max_labels`` distinct values keep their name,
later ones are counted as ``other``, so a registry with 100k adapters cannot blow up the series.
Replica counters arrive with every response (``replica_stats``) and are exported as totals, so
rates give the batch size (tokens/steps) and adapters per batch (distinct_adapters/steps).
A replica seen to die under a request has its series dropped (``replica_lost``).

``flora_requests_total{tenant,endpoint,status}`` counts every HTTP response once, with the
status actually sent (the ingress's ``RequestCounter`` middleware). An error that arrives after
a stream's 200 went out is counted in ``flora_stream_errors_total{tenant,code}`` instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_GAUGES = ("running", "waiting", "kv_blocks_free", "kv_blocks_total", "adapter_slots_in_use",
           "adapters_loading", "last_batch_tokens", "last_batch_sequences",
           "last_distinct_adapters")  # fmt: skip


class BoundedLabels:
    def __init__(self, max_labels: int = 200):
        self.max_labels, self._seen, self._lock = max_labels, set[str](), threading.Lock()

    def __call__(self, value: str | None) -> str:
        if not value:
            return "none"
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.max_labels:
                self._seen.add(value)
                return value
        return "other"


class _ReplicaCollector(Collector):
    """Latest engine counters per replica, as reported in responses."""

    def __init__(self, max_lost: int = 1024) -> None:
        self.latest: dict[str, dict[str, int]] = {}
        # replicas seen to die (host:pid, never reused by a restarted one): a report still on
        # its way from one must not bring its series back
        self.lost: dict[str, None] = {}
        self.max_lost = max_lost

    def collect(self) -> Iterator[Metric]:
        totals = CounterMetricFamily(
            "flora_engine", "engine totals per replica", labels=["replica", "what"]
        )
        gauges = GaugeMetricFamily(
            "flora_engine_state", "engine state per replica", labels=["replica", "what"]
        )
        for replica, stats in sorted(self.latest.items()):
            for key, value in stats.items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                family = gauges if key in _GAUGES else totals
                family.add_metric([replica, key], value)
        yield totals
        yield gauges


class ServeMetrics:
    def __init__(self, max_labels: int = 200):
        self.registry = CollectorRegistry()
        self.tenant = BoundedLabels(max_labels)
        self.adapter = BoundedLabels(max_labels)
        self.code = BoundedLabels(64)  # error codes are the server's own; bounded all the same
        r = self.registry
        self.requests = Counter(
            "flora_requests",
            "HTTP responses by the status sent (tenant: the authenticated one, else none)",
            ["tenant", "endpoint", "status"],
            registry=r,
        )
        self.stream_errors = Counter(
            "flora_stream_errors",
            "errors sent inside a stream, after its 200 went out",
            ["tenant", "code"],
            registry=r,
        )
        self.tokens = Counter("flora_tokens", "tokens", ["tenant", "kind"], registry=r)
        self.adapter_requests = Counter(
            "flora_adapter_requests", "requests per adapter", ["adapter", "rule"], registry=r
        )
        self.ttft = Histogram(
            "flora_time_to_first_token_seconds", "TTFT", ["tenant"], buckets=_LATENCY, registry=r
        )
        self.per_token = Histogram(
            "flora_time_per_output_token_seconds",
            "mean time between output tokens of a request",
            ["tenant"],
            buckets=_LATENCY,
            registry=r,
        )
        self.in_flight = Gauge("flora_requests_in_flight", "open requests", registry=r)
        self.replicas_lost = Counter(
            "flora_replicas_lost", "replicas seen to die under a request", registry=r
        )
        self.replicas = _ReplicaCollector()
        r.register(self.replicas)

    def request_done(self, tenant: str | None, endpoint: str, status: int) -> None:
        self.requests.labels(self.tenant(tenant), endpoint, str(status)).inc()

    def stream_error(self, tenant: str | None, code: str) -> None:
        self.stream_errors.labels(self.tenant(tenant), self.code(code)).inc()

    def generation(
        self,
        tenant: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft: float | None,
        per_token: float | None,
    ) -> None:
        label = self.tenant(tenant)
        self.tokens.labels(label, "prompt").inc(prompt_tokens)
        self.tokens.labels(label, "completion").inc(completion_tokens)
        if ttft is not None:
            self.ttft.labels(label).observe(ttft)
        if per_token is not None:
            self.per_token.labels(label).observe(per_token)

    def adapter_used(self, adapter: str | None, rule: str) -> None:
        self.adapter_requests.labels(self.adapter(adapter), rule).inc()

    def replica_stats(self, replica: str, stats: dict[str, int]) -> None:
        """Keep the numbers only (the stats also name their ``replica``)."""
        if replica in self.replicas.lost:
            return
        numbers = {k: v for k, v in stats.items() if isinstance(v, int | float)}
        self.replicas.latest[replica] = numbers

    def replica_lost(self, replica: str) -> None:
        """A replica died under a request: drop its series (its gauges would read busy for
        ever) and count the loss."""
        replicas = self.replicas
        if replica in replicas.lost:
            return
        replicas.lost[replica] = None
        if len(replicas.lost) > replicas.max_lost:
            del replicas.lost[next(iter(replicas.lost))]
        replicas.latest.pop(replica, None)
        self.replicas_lost.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
