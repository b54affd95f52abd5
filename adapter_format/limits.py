"""What a serving engine can run: the registry checks uploads against the same limits the
engine checks loads against, so an accepted adapter is a servable one."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field

from adapter_format.config import MAX_RANK
from adapter_format.errors import AdapterFormatError
from adapter_format.kinds import AdapterKind
from adapter_format.magnitude import DEFAULT_MAX_MAGNITUDE
from adapter_format.modules import MODULES, short_target

ALL_TARGETS = tuple(short_target(m) for m in MODULES)


class ServingLimits(BaseModel):
    """An engine's adapter limits, as its replicas report them (defaults: the format's own)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_rank: int = Field(MAX_RANK, ge=1, description="Largest LoRA/FLoRA rank a slot holds.")
    kinds: frozenset[AdapterKind] = Field(frozenset(AdapterKind), description="Kinds served.")
    targets: tuple[str, ...] = Field(ALL_TARGETS, description="Adapted linears (c_attn, …).")
    max_magnitude: float = Field(
        DEFAULT_MAX_MAGNITUDE, gt=0, description="Bound on factors and per-weight effect."
    )
    dtype: str | None = Field(None, description="The serving dtype (fp32, bf16, fp16).")

    def check(self, kind: AdapterKind, ranks: Iterable[int], targets: Iterable[str]) -> None:
        """Refuse a kind, rank or target module this engine does not serve."""
        if kind not in self.kinds:
            served = sorted(k.value for k in self.kinds)
            raise AdapterFormatError(
                f"{kind} adapters are not served here (served kinds: {served})", param="weights"
            )
        rank = max(ranks, default=0)
        if rank > self.max_rank:
            raise AdapterFormatError(
                f"rank {rank} exceeds this server's max_rank {self.max_rank}", param="weights"
            )
        missing = sorted(set(targets) - set(self.targets))
        if missing:
            raise AdapterFormatError(
                f"the adapter targets {missing}; this server adapts {list(self.targets)}",
                param="target_modules",
            )
