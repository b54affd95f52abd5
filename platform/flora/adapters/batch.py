"""The batch's adapter state, computed once per step and handed to every adapted layer.

Every layer of a model shares the same slot numbering, so the grouping of tokens by slot
(sort order, segment lengths, contiguous runs) is derived once here and reused by all of them.
Host-side tuples hold what the dispatcher reasons about, so no layer needs a device sync.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from flora.adapters.errors import SlotError

NO_ADAPTER = -1


@dataclass(frozen=True)
class Runs:
    """Maximal runs of consecutive tokens that share a slot (requests, in a packed batch)."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    slots: tuple[int, ...]


@dataclass(eq=False)
class AdapterBatch:
    """Token → slot assignment for one forward pass; ``-1`` means "no adapter".

    Build it with :meth:`from_slots`. ``slots`` lists the distinct slots present (ascending,
    ``-1`` first when present), ``counts`` their token counts, and ``order`` is a stable sort of
    the tokens by slot so that ``order[offsets[i] : offsets[i] + counts[i]]`` are the tokens of
    ``slots[i]``.
    """

    token_slots: torch.Tensor  # [T] int64
    slots: tuple[int, ...]
    counts: tuple[int, ...]
    order: torch.Tensor  # [T] int64, tokens sorted by slot
    _subsets: dict[tuple[int, ...], tuple[torch.Tensor, AdapterBatch]] = field(
        default_factory=dict, repr=False
    )
    # Each layer's plan for this batch, shared by layers of one shape and bank layout
    # (flora.adapters.layer): the dispatcher's per-slot bookkeeping runs once per step, not
    # once per layer.
    plans: dict[tuple, object] = field(default_factory=dict, repr=False)

    @classmethod
    def from_slots(
        cls,
        token_slots: torch.Tensor | list[int] | tuple[int, ...],
        *,
        max_slots: int | None = None,
        device: torch.device | str | None = None,
    ) -> AdapterBatch:
        """Validate a per-token slot index and derive the grouping every layer needs."""
        idx = torch.as_tensor(token_slots, dtype=torch.long, device=device)
        if idx.dim() != 1:
            raise SlotError(f"token slots must be 1-D [T], got shape {list(idx.shape)}")
        if idx.numel() == 0:
            raise SlotError("an adapter batch needs at least one token")
        low, high = int(idx.min()), int(idx.max())
        if low < NO_ADAPTER:
            raise SlotError(f"slot {low} is invalid: use -1 for 'no adapter'")
        if max_slots is not None and high >= max_slots:
            raise SlotError(f"slot {high} is out of range for a bank of {max_slots} slots")
        distinct, counts = torch.unique(idx, sorted=True, return_counts=True)
        order = torch.argsort(idx, stable=True)
        return cls(
            token_slots=idx,
            slots=tuple(distinct.tolist()),
            counts=tuple(counts.tolist()),
            order=order,
        )

    def on_device(self, token_slots: torch.Tensor, order: torch.Tensor) -> AdapterBatch:
        """This host-built batch with its index tensors swapped for their device copies.

        What every layer reads on the host (sortedness, segments, runs) is derived here, before
        the move, so no layer waits on the device to learn it.
        """
        moved = AdapterBatch(token_slots, self.slots, self.counts, order)
        moved.__dict__.update(is_sorted=self.is_sorted, offsets=self.offsets, runs=self.runs)
        return moved

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Start of each slot's segment in ``order``."""
        out, acc = [], 0
        for c in self.counts:
            out.append(acc)
            acc += c
        return tuple(out)

    @cached_property
    def is_sorted(self) -> bool:
        """True when tokens already come grouped by slot (then ``order`` is the identity)."""
        return bool((self.token_slots[1:] >= self.token_slots[:-1]).all())

    @cached_property
    def runs(self) -> Runs:
        """Contiguous same-slot runs in the original order (the paper's per-example view)."""
        idx = self.token_slots
        change = torch.ones_like(idx, dtype=torch.bool)
        change[1:] = idx[1:] != idx[:-1]
        starts = torch.nonzero(change).flatten()
        ends = torch.cat([starts[1:], starts.new_tensor([idx.shape[0]])])
        return Runs(
            starts=tuple(starts.tolist()),
            lengths=tuple((ends - starts).tolist()),
            slots=tuple(idx[starts].tolist()),
        )

    def subset(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, AdapterBatch]:
        """Rows whose slot is in ``slots`` and the batch restricted to them (sorted by slot).

        Cached: every layer with the same kind layout asks for the same subsets.
        """
        cached = self._subsets.get(slots)
        if cached is not None:
            return cached
        position = {s: i for i, s in enumerate(self.slots)}
        chosen = [position[s] for s in slots if s in position]
        rows = torch.cat(
            [self.order[self.offsets[i] : self.offsets[i] + self.counts[i]] for i in chosen]
        )
        sub_idx = self.token_slots[rows]
        sub = AdapterBatch(
            token_slots=sub_idx,
            slots=tuple(self.slots[i] for i in chosen),
            counts=tuple(self.counts[i] for i in chosen),
            order=torch.arange(rows.shape[0], device=rows.device),
        )
        self._subsets[slots] = (rows, sub)
        return rows, sub

    @cached_property
    def entries(self) -> torch.Tensor:
        """Bank table entry per token: ``slot + 1`` (entry 0 is the no-adapter identity)."""
        return self.token_slots + 1

    @cached_property
    def restore(self) -> torch.Tensor:
        """Inverse of ``order``: ``sorted_rows[restore]`` puts rows back in token order."""
        inverse = torch.empty_like(self.order)
        inverse[self.order] = torch.arange(self.order.shape[0], device=self.order.device)
        return inverse

    @cached_property
    def num_unadapted(self) -> int:
        """Tokens with no adapter; they come first in ``order`` since ``-1`` sorts first."""
        return self.counts[0] if self.slots and self.slots[0] == NO_ADAPTER else 0

    @cached_property
    def run_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For each token, its run number and its position inside the run (for padding)."""
        runs = self.runs
        device = self.token_slots.device
        lengths = torch.tensor(runs.lengths, device=device)
        run_id = torch.repeat_interleave(torch.arange(len(runs.lengths), device=device), lengths)
        starts = torch.tensor(runs.starts, device=device)
        position = torch.arange(self.num_tokens, device=device) - starts[run_id]
        return run_id, position
