"""Running totals of what the engine did, for metrics: steps, batch sizes, adapter cache tiers.

Totals (not averages) so Prometheus can take rates: batch size = rate(tokens) / rate(steps).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flora.engine.adapter_cache import CacheStats
from flora.engine.scheduler import SchedulerOutput


@dataclass
class StepCounters:
    steps: int = 0
    batched_tokens: int = 0
    batched_sequences: int = 0
    distinct_adapters: int = 0  # summed over steps: / steps = mean adapters per batch
    last_batch_tokens: int = 0
    last_batch_sequences: int = 0
    last_distinct_adapters: int = 0

    def record_step(self, plan: SchedulerOutput) -> None:
        if not plan.chunks:
            return
        adapters = {c.seq.slot for c in plan.chunks if c.seq.slot is not None}
        self.steps += 1
        self.last_batch_tokens = plan.num_tokens
        self.last_batch_sequences = len(plan.chunks)
        self.last_distinct_adapters = len(adapters)
        self.batched_tokens += plan.num_tokens
        self.batched_sequences += len(plan.chunks)
        self.distinct_adapters += len(adapters)

    def as_dict(self, cache: CacheStats | None) -> dict[str, int]:
        out = asdict(self)
        for key, value in asdict(cache or CacheStats()).items():
            out[f"adapter_{key}"] = value
        return out
