"""Segmented FLoRA (ours, beyond the paper): one GEMM per distinct adapter in the batch.

Tokens are grouped by slot; each group runs against ``W ∘ M_i`` built once (or taken from the
:class:`MaterialisedCache`). It beats the vectorised path when ``r`` is high and few adapters are
present: ``N·d·k·r + T·d·k < r·T·d·k`` (docs/adapters.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from flora.adapters.batch import NO_ADAPTER, AdapterBatch


def materialise_flora(
    weight: torch.Tensor, A: torch.Tensor, Bt: torch.Tensor, slot: int, rank: int
) -> torch.Tensor:
    """``W ∘ (B A / r)`` for one slot (``1/r`` is already folded into ``Bt``): ``[out, in]``."""
    entry = slot + 1
    return weight * (Bt[entry, :rank].transpose(0, 1) @ A[entry, :rank])


def flora_segmented(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bt: torch.Tensor,
    ranks: Sequence[int],
    batch: AdapterBatch,
    adapted_weight: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``y[t] = x[t] (W ∘ M_{s_t})ᵀ + β``, one GEMM per segment of tokens sharing a slot.

    ``ranks[slot]`` is 0 for slots that hold no FLoRA adapter here (they get ``W``).
    ``adapted_weight(slot)`` may serve cached materialisations; by default each is rebuilt.
    """
    xs = x if batch.is_sorted else x.index_select(0, batch.order)
    pieces = []
    for slot, start, count in zip(batch.slots, batch.offsets, batch.counts, strict=True):
        rank = ranks[slot] if slot != NO_ADAPTER else 0
        if rank == 0:  # no adapter, or a slot of another kind / not targeting this layer
            w = weight
        elif adapted_weight is not None:
            w = adapted_weight(slot)
        else:
            w = materialise_flora(weight, A, Bt, slot, rank)
        pieces.append(F.linear(xs[start : start + count], w, bias))  # [n_s, out]
    ys = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return ys if batch.is_sorted else ys.index_select(0, batch.restore)
