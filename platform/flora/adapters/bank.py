"""Fixed-shape adapter storage for one linear layer: ``max_slots`` adapters of any kind.

Shapes never change after construction (vLLM's ``lora/`` idea): ``load(slot, weights)`` writes
into preallocated stacked tensors, ``evict(slot)`` resets them, so compiled graphs stay valid.
Every table has one extra leading entry: tables are indexed by ``slot + 1``, so slot ``-1``
("no adapter") picks entry 0, the identity for its kind. Empty slots hold the identity too,
so a token whose adapter does not target this layer gets the base layer without any masking.

Tables (``S = max_slots``, ``R = max_rank``):
    flora_A [S+1, R, in]   flora_Bt [S+1, R, out]  (holds Bᵀ / r; zero past the slot's rank)
    lora_A  [S+1, R, in]   lora_Bt  [S+1, R, out]  (holds scale · Bᵀ; zero past the rank)
    ia3_in  [S+1, in]      ia3_out  [S+1, out]     (ones where unused)
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from flora.adapters.errors import InvalidAdapterError, SlotError
from flora.adapters.weights import (
    AdapterKind,
    AdapterWeights,
    FloraWeights,
    IA3Weights,
    LoraWeights,
)

# The tables each kind reads, and how an Adam step on them maps to one on the file's factors:
# ``flora_Bt`` holds ``Bᵀ / r`` and ``lora_Bt`` holds ``scale · Bᵀ`` (see :meth:`lr_scales`).
TABLES: dict[AdapterKind, tuple[str, str]] = {
    AdapterKind.FLORA: ("flora_A", "flora_Bt"),
    AdapterKind.LORA: ("lora_A", "lora_Bt"),
    AdapterKind.IA3: ("ia3_in", "ia3_out"),
}


class SlotLayout:
    """What a layer's plan for a batch depends on in its bank: equal layouts (every layer an
    adapter covers, typically) share one plan per step. Hashed once, at construction."""

    __slots__ = ("_hash", "feedforward", "kinds", "ranks")

    def __init__(
        self, kinds: tuple[AdapterKind | None, ...], ranks: tuple[int, ...], feedforward: tuple
    ) -> None:
        self.kinds, self.ranks, self.feedforward = kinds, ranks, feedforward
        self._hash = hash((kinds, ranks, feedforward))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SlotLayout)
            and self._hash == other._hash
            and (self.kinds, self.ranks, self.feedforward)
            == (other.kinds, other.ranks, other.feedforward)
        )


def folded(weights: AdapterWeights) -> dict[str, torch.Tensor]:
    """What :meth:`AdapterBank.load` writes per table: ``Bᵀ`` with ``1/r`` (FLoRA) or PEFT's
    scale (LoRA) folded in, computed in float64; IA3 fills one side only."""
    if isinstance(weights, FloraWeights):
        return {"flora_A": weights.A, "flora_Bt": weights.B.T.double() / weights.rank}
    if isinstance(weights, LoraWeights):
        return {"lora_A": weights.A, "lora_Bt": weights.B.T.double() * weights.scale}
    return {"ia3_in" if weights.feedforward else "ia3_out": weights.scale}


def fits(weights: AdapterWeights, dtype: torch.dtype) -> bool:
    """Whether every table value of ``weights`` stays finite stored in ``dtype``.

    A loader thread asks this before the engine installs an adapter, so an adapter that would
    overflow the bank is refused at load, not on the engine thread.
    """
    return all(bool(torch.isfinite(v.to(dtype)).all()) for v in folded(weights).values())


class BankConfig(BaseModel):
    """How many adapters one layer can hold at once, and of which kinds and ranks."""

    model_config = ConfigDict(frozen=True)

    max_slots: int = Field(32, ge=1, le=65536, description="Adapters resident at once.")
    max_rank: int = Field(16, ge=1, le=1024, description="Largest FLoRA/LoRA rank a slot holds.")
    kinds: frozenset[AdapterKind] = Field(
        frozenset(AdapterKind), description="Adapter kinds this bank allocates tables for."
    )


class AdapterBank(nn.Module):
    """Stacked per-slot adapter tables for one ``[out, in]`` linear layer."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        config: BankConfig | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or BankConfig()
        self.in_features, self.out_features = in_features, out_features
        entries, rank = config.max_slots + 1, config.max_rank
        kw = {"dtype": dtype, "device": device}
        if AdapterKind.FLORA in config.kinds:
            self.register_buffer("flora_A", torch.zeros(entries, rank, in_features, **kw))
            self.register_buffer("flora_Bt", torch.zeros(entries, rank, out_features, **kw))
        if AdapterKind.LORA in config.kinds:
            self.register_buffer("lora_A", torch.zeros(entries, rank, in_features, **kw))
            self.register_buffer("lora_Bt", torch.zeros(entries, rank, out_features, **kw))
        if AdapterKind.IA3 in config.kinds:
            self.register_buffer("ia3_in", torch.ones(entries, in_features, **kw))
            self.register_buffer("ia3_out", torch.ones(entries, out_features, **kw))
        # Host-side slot table: the dispatcher reads it without touching the device.
        self.kinds: list[AdapterKind | None] = [None] * config.max_slots
        self.ranks: list[int] = [0] * config.max_slots
        self.versions: list[int] = [0] * config.max_slots
        self.feedforward: list[bool] = [False] * config.max_slots
        self.lora_scaling: list[tuple[float, bool]] = [(1.0, False)] * config.max_slots
        self._layout: SlotLayout | None = None
        for slot in range(-1, config.max_slots):
            self._reset(slot)

    @property
    def max_slots(self) -> int:
        return self.config.max_slots

    def check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise SlotError(f"slot {slot} is out of range [0, {self.max_slots})")

    @torch.no_grad()
    def _reset(self, slot: int) -> None:
        slot += 1  # table entry
        if AdapterKind.FLORA in self.config.kinds:
            self.flora_A[slot].zero_()
            self.flora_A[slot, 0] = 1.0
            self.flora_Bt[slot].zero_()
            self.flora_Bt[slot, 0] = 1.0
        if AdapterKind.LORA in self.config.kinds:
            self.lora_A[slot].zero_()
            self.lora_Bt[slot].zero_()
        if AdapterKind.IA3 in self.config.kinds:
            self.ia3_in[slot].fill_(1.0)
            self.ia3_out[slot].fill_(1.0)

    @torch.no_grad()
    def load(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter into ``slot``, replacing whatever was there.

        Raises :class:`InvalidAdapterError` (nothing is written) for wrong shapes, a rank above
        ``max_rank``, non-finite values or a kind this bank has no tables for; and (the slot
        left empty) for values that overflow the bank's dtype once ``1/r`` or scale is folded.
        """
        self.check_slot(slot)
        if weights.kind not in self.config.kinds:
            raise InvalidAdapterError(f"this bank holds no {weights.kind} adapters")
        weights.validate(self.in_features, self.out_features)
        if weights.rank > self.config.max_rank:
            raise InvalidAdapterError(
                f"rank {weights.rank} exceeds this bank's max_rank {self.config.max_rank}"
            )
        self._reset(slot)
        r, entry = weights.rank, slot + 1
        tables = folded(weights)
        for name, value in tables.items():  # the rank's rows (zero past r), or IA3's vector
            getattr(self, name)[entry, : value.shape[0]] = value
        stored = [getattr(self, name)[entry] for name in tables]
        if not bool(torch.stack([torch.isfinite(t).all() for t in stored]).all()):  # one sync
            self.evict(slot)
            dtype = str(stored[0].dtype).removeprefix("torch.")
            raise InvalidAdapterError(
                f"the adapter overflows this bank's dtype ({dtype}): a factor, with 1/r or "
                "LoRA's scale folded in, is beyond its range"
            )
        self.kinds[slot] = weights.kind
        self.ranks[slot] = r
        self.feedforward[slot] = getattr(weights, "feedforward", False)
        if isinstance(weights, LoraWeights):
            self.lora_scaling[slot] = (weights.alpha, weights.use_rslora)
        self.versions[slot] += 1
        self._layout = None

    @torch.no_grad()
    def export(self, slot: int) -> AdapterWeights | None:
        """The adapter in ``slot`` as file-orientation weights (the inverse of :meth:`load`).

        Training updates the tables in place; this reads them back, unfolding ``1/r`` and
        LoRA's scale, so the result saves as a PEFT-style file. ``None`` for an empty slot.
        """
        self.check_slot(slot)
        kind, r, entry = self.kinds[slot], self.ranks[slot], slot + 1
        if kind is AdapterKind.FLORA:
            return FloraWeights(
                A=self.flora_A[entry, :r].clone(), B=(self.flora_Bt[entry, :r].T * r).contiguous()
            )
        if kind is AdapterKind.LORA:
            alpha, rslora = self.lora_scaling[slot]
            return LoraWeights(
                A=self.lora_A[entry, :r].clone(),
                B=(self.lora_Bt[entry, :r].T / self._lora_scale(slot)).contiguous(),
                alpha=alpha,
                use_rslora=rslora,
            )
        if kind is AdapterKind.IA3:
            ff = self.feedforward[slot]
            scale = (self.ia3_in if ff else self.ia3_out)[entry].clone()
            return IA3Weights(scale=scale, feedforward=ff)
        return None

    def _lora_scale(self, slot: int) -> float:
        alpha, rslora = self.lora_scaling[slot]
        r = self.ranks[slot]
        return alpha / (r**0.5 if rslora else r)

    def lr_scales(self, slot: int) -> dict[str, float]:
        """Per table, the factor that makes an Adam step on it equal one on the file's factors.

        Adam moves a parameter by about ``lr`` whatever its gradient's scale, so a table that
        stores ``c · B`` needs ``c · lr`` to move ``B`` by ``lr`` (PEFT's learning rates then
        mean what they mean in PEFT).
        """
        kind, r = self.kinds[slot], self.ranks[slot]
        if kind is AdapterKind.FLORA:
            return {"flora_A": 1.0, "flora_Bt": 1.0 / r}
        if kind is AdapterKind.LORA:
            return {"lora_A": 1.0, "lora_Bt": self._lora_scale(slot)}
        return {"ia3_in": 1.0, "ia3_out": 1.0}

    def evict(self, slot: int) -> None:
        """Empty ``slot``: tokens pointing at it get the base layer from now on."""
        self.check_slot(slot)
        self._reset(slot)
        self.kinds[slot] = None
        self.ranks[slot] = 0
        self.feedforward[slot] = False
        self.lora_scaling[slot] = (1.0, False)
        self.versions[slot] += 1
        self._layout = None

    @property
    def layout(self) -> SlotLayout:
        """Kind, rank and IA3 placement per slot, rebuilt only after a load or eviction."""
        if self._layout is None:
            self._layout = SlotLayout(tuple(self.kinds), tuple(self.ranks), tuple(self.feedforward))
        return self._layout

    def group_by_kind(self, slots: tuple[int, ...]) -> dict[AdapterKind | None, tuple[int, ...]]:
        """Split a batch's distinct slots by the kind loaded here (``None``: base layer)."""
        groups: dict[AdapterKind | None, list[int]] = {}
        for slot in slots:
            kind = self.kinds[slot] if slot >= 0 else None
            groups.setdefault(kind, []).append(slot)
        return {kind: tuple(members) for kind, members in groups.items()}
