"""``AdaptedLinear``: an ``nn.Linear`` whose every token may carry its own adapter.

The base weight is shared, never copied per adapter. The batch's adapter state arrives as an
explicit :class:`AdapterBatch` argument; the layer splits the batch by adapter kind, asks the
dispatcher for the cheapest path per kind, and puts the rows back in token order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from flora.adapters.bank import AdapterBank, BankConfig
from flora.adapters.batch import NO_ADAPTER, AdapterBatch
from flora.adapters.dispatch import PATHS_BY_KIND, Dispatcher, KernelPath, Workload, check_path
from flora.adapters.errors import SlotError
from flora.adapters.flora import flora_vectorised
from flora.adapters.ia3 import ia3_forward
from flora.adapters.lora import lora_bmm, lora_gather, lora_segmented, lora_stacked
from flora.adapters.materialised import MaterialisedCache
from flora.adapters.segmented import flora_segmented, materialise_flora
from flora.adapters.triton_kernels import flora_triton, lora_bgmv_triton
from flora.adapters.weights import AdapterKind, AdapterWeights

PathChoice = Mapping[AdapterKind, KernelPath]


class AdaptedLinear(nn.Module):
    """``y[t] = adapted_{s_t}(x[t])`` for a per-token slot index, over one shared base layer."""

    def __init__(
        self,
        base: nn.Linear,
        config: BankConfig | None = None,
        *,
        dispatcher: Dispatcher | None = None,
        cache: MaterialisedCache | None = None,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bank = AdapterBank(
            base.in_features,
            base.out_features,
            config,
            dtype=base.weight.dtype,
            device=base.weight.device,
        )
        self.dispatcher = dispatcher or Dispatcher()
        self.cache = cache

    def load_adapter(self, slot: int, weights: AdapterWeights) -> None:
        self.bank.load(slot, weights)
        self._forget_materialised(slot)

    def evict_adapter(self, slot: int) -> None:
        self.bank.evict(slot)
        self._forget_materialised(slot)

    def _forget_materialised(self, slot: int) -> None:
        if self.cache is not None:
            me = id(self)
            self.cache.discard(lambda key: key[0] == me and key[1] == slot)

    def _check(self, x: torch.Tensor, batch: AdapterBatch) -> None:
        if batch.num_tokens != x.shape[0]:
            raise SlotError(
                f"batch has {batch.num_tokens} token slots but the input has {x.shape[0]} tokens"
            )
        if batch.slots[-1] >= self.bank.max_slots:
            raise SlotError(
                f"slot {batch.slots[-1]} is out of range for a bank of {self.bank.max_slots} slots"
            )

    def forward(
        self, x: torch.Tensor, batch: AdapterBatch | None = None, *, paths: PathChoice | None = None
    ) -> torch.Tensor:
        """``x [..., in]`` with one slot per token (leading dims flattened) → ``[..., out]``.

        ``paths`` forces a path per kind (benchmarks, tests); by default the dispatcher picks.
        """
        if batch is None:
            return self.base(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        self._check(x2, batch)
        plan = self._plan(batch, paths)
        kinds = [kind for kind in plan.groups if kind is not None]
        if not kinds:
            y = F.linear(x2, self.base.weight, self.base.bias)
        elif len(kinds) == 1:  # identity entries make the other rows exact: no split needed
            y = self._execute(kinds[0], plan.decide(self, kinds[0], x2, batch), x2, batch)
        else:
            y = self._run_mixed(plan, x2, batch)
        return y.view(*lead, self.out_features)

    def _plan(self, batch: AdapterBatch, paths: PathChoice | None) -> LayerPlan:
        """This batch's plan here: shared with every layer of the same shape, bank layout and
        dispatcher (decided by the first of them to run), unless ``paths`` forces one."""
        if paths is not None:
            return LayerPlan(self.bank.group_by_kind(batch.slots), paths)
        key = (self.in_features, self.out_features, self.bank.layout, self.dispatcher)
        plan = batch.plans.get(key)
        if plan is None:
            plan = batch.plans[key] = LayerPlan(self.bank.group_by_kind(batch.slots))
        return plan

    def plan(self, batch: AdapterBatch) -> dict[AdapterKind, KernelPath]:
        """The path the dispatcher would run for each kind present (for logs and benchmarks)."""
        groups = self.bank.group_by_kind(batch.slots)
        kinds = [kind for kind in groups if kind is not None]
        if len(kinds) == 1:
            return {kinds[0]: self._choose(kinds[0], batch)}
        return {kind: self._choose(kind, batch.subset(groups[kind])[1]) for kind in kinds}

    def _ranks(self, kind: AdapterKind, batch: AdapterBatch) -> dict[int, int]:
        """Rank per slot present, 0 where the slot holds no ``kind`` adapter in this layer."""
        kinds, ranks = self.bank.kinds, self.bank.ranks
        return {s: ranks[s] if s != NO_ADAPTER and kinds[s] is kind else 0 for s in batch.slots}

    def workload(
        self, kind: AdapterKind, batch: AdapterBatch, ranks: dict[int, int] | None = None
    ) -> Workload:
        """What the cost model sees; ``ranks`` (from ``_ranks``) saves recomputing them."""
        slot_ranks = tuple((ranks or self._ranks(kind, batch)).values())
        me, versions = id(self), self.bank.versions
        cached = tuple(
            self.cache is not None and s != NO_ADAPTER and (me, s, versions[s]) in self.cache
            for s in batch.slots
        )
        runs = batch.runs
        return Workload(
            in_features=self.in_features,
            out_features=self.out_features,
            counts=batch.counts,
            ranks=slot_ranks,
            runs=len(runs.lengths),
            longest_run=max(runs.lengths),
            cached=cached,
        )

    def _choose(
        self,
        kind: AdapterKind,
        batch: AdapterBatch,
        x: torch.Tensor | None = None,
        ranks: dict[int, int] | None = None,
    ) -> KernelPath:
        w = self.base.weight
        measure = None
        if x is not None and not torch.is_grad_enabled():
            measure = lambda path: self._time(kind, x, batch, path)  # noqa: E731
        workload = self.workload(kind, batch, ranks)
        return self.dispatcher.choose(kind, workload, w.device, w.dtype, measure)

    def _time(
        self, kind: AdapterKind, x: torch.Tensor, batch: AdapterBatch, path: KernelPath
    ) -> float:
        sync = torch.cuda.synchronize if x.device.type == "cuda" else lambda: None
        sync()
        start = time.perf_counter()
        self._run(kind, x, batch, {kind: path})
        sync()
        return time.perf_counter() - start

    def _materialised(self, slot: int) -> torch.Tensor:
        bank, w = self.bank, self.base.weight
        make = lambda: materialise_flora(w, bank.flora_A, bank.flora_Bt, slot, bank.ranks[slot])  # noqa: E731
        if self.cache is None or (
            torch.is_grad_enabled() and (w.requires_grad or bank.flora_A.requires_grad)
        ):
            return make()
        return self.cache.get_or_make((id(self), slot, bank.versions[slot]), make)

    def _decide(
        self, kind: AdapterKind, x: torch.Tensor, batch: AdapterBatch, paths: PathChoice | None
    ) -> Decision:
        ranks = self._ranks(kind, batch)
        path = (
            (paths or {}).get(kind)
            or self.dispatcher.force.get(kind)
            or self._choose(kind, batch, x, ranks)
        )
        if path not in PATHS_BY_KIND[kind]:  # a Triton path, or a wrong one
            check_path(kind, path, x.device)
        return Decision(path, ranks, max(ranks.values(), default=1) or 1)

    def _run(
        self, kind: AdapterKind, x: torch.Tensor, batch: AdapterBatch, paths: PathChoice | None
    ) -> torch.Tensor:
        return self._execute(kind, self._decide(kind, x, batch, paths), x, batch)

    def _execute(
        self, kind: AdapterKind, decision: Decision, x: torch.Tensor, batch: AdapterBatch
    ) -> torch.Tensor:
        path, ranks, rank = decision
        bank, w, b, idx = self.bank, self.base.weight, self.base.bias, batch.entries
        if path is KernelPath.FLORA_VECTORISED:
            return flora_vectorised(x, w, b, bank.flora_A, bank.flora_Bt, idx, rank)
        if path is KernelPath.FLORA_TRITON:
            return flora_triton(x, w, b, bank.flora_A, bank.flora_Bt, idx, rank)
        if path is KernelPath.FLORA_SEGMENTED:
            return flora_segmented(
                x, w, b, bank.flora_A, bank.flora_Bt, ranks, batch, self._materialised
            )
        if path is KernelPath.LORA_GATHER:
            return lora_gather(x, w, b, bank.lora_A, bank.lora_Bt, idx, rank)
        if path is KernelPath.LORA_BGMV_TRITON:
            return lora_bgmv_triton(x, w, b, bank.lora_A, bank.lora_Bt, idx, rank)
        if path is KernelPath.LORA_SEGMENTED:
            return lora_segmented(x, w, b, bank.lora_A, bank.lora_Bt, ranks, batch)
        if path is KernelPath.LORA_STACKED:
            active = [s for s, r in ranks.items() if r]
            return lora_stacked(x, w, b, bank.lora_A, bank.lora_Bt, idx, active, rank)
        if path is KernelPath.LORA_BMM:
            return lora_bmm(x, w, b, bank.lora_A, bank.lora_Bt, batch, rank)
        present = [s for s, r in ranks.items() if r]  # IA3 slots have rank 1
        return ia3_forward(
            x,
            w,
            b,
            bank.ia3_in,
            bank.ia3_out,
            idx,
            scales_input=any(bank.feedforward[s] for s in present),
            scales_output=not all(bank.feedforward[s] for s in present),
        )

    def _run_mixed(self, plan: LayerPlan, x: torch.Tensor, batch: AdapterBatch) -> torch.Tensor:
        rows_parts, y_parts = [], []
        for kind, slots in plan.groups.items():
            rows, sub = batch.subset(slots)
            xk = x.index_select(0, rows)
            if kind is None:
                y_parts.append(F.linear(xk, self.base.weight, self.base.bias))
            else:
                y_parts.append(self._execute(kind, plan.decide(self, kind, xk, sub), xk, sub))
            rows_parts.append(rows)
        rows = torch.cat(rows_parts)
        restore = torch.empty_like(rows)
        restore[rows] = torch.arange(rows.shape[0], device=rows.device)
        return torch.cat(y_parts).index_select(0, restore)


class Decision(NamedTuple):
    """One kind's path for a batch in a layer, and the ranks running it needs."""

    path: KernelPath
    ranks: dict[int, int]  # rank per slot present, 0 where it holds no adapter of this kind
    rank: int  # the largest present


@dataclass
class LayerPlan:
    """A batch's slots split by kind, and each kind's decision, made on first use."""

    groups: dict[AdapterKind | None, tuple[int, ...]]
    paths: PathChoice | None = None  # forced paths (then the plan is not shared)
    decisions: dict[AdapterKind, Decision] = field(default_factory=dict)

    def decide(
        self, layer: AdaptedLinear, kind: AdapterKind, x: torch.Tensor, batch: AdapterBatch
    ) -> Decision:
        decision = self.decisions.get(kind)
        if decision is None:
            decision = self.decisions[kind] = layer._decide(kind, x, batch, self.paths)
        return decision
