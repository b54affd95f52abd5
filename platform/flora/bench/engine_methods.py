"""What the engine benchmark compares and measures, shared by its runners: the engine
(:mod:`flora.bench.engine`) and the transformers/PEFT baselines (:mod:`flora.bench.hf_baselines`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flora.adapters import AdapterKind, KernelPath


@dataclass(frozen=True)
class Method:
    name: str
    runner: str  # engine | peft | hf
    kind: AdapterKind | None = None
    rank: int = 0
    distinct: bool = True
    path: KernelPath | None = None
    compile: str = "off"  # the engine's compile setting


@dataclass
class Run:
    tokens: int
    seconds: float
    itl: list[float] = field(default_factory=list)  # inter-token latencies, seconds

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds


def adapter_names(m: Method, requests: int) -> list[str | None]:
    """The adapter of each of ``requests`` requests under ``m`` (None: the base model)."""
    if m.kind is None or m.runner == "hf":
        return [None] * requests
    tag = f"{m.kind}-r{m.rank}"
    return [f"{tag}-{i if m.distinct else 0}" for i in range(requests)]
