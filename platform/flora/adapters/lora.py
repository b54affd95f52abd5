"""LoRA with PEFT's semantics, ``y = x Wᵀ + β + scale · (x Aᵀ) Bᵀ``, four batched paths.

Tables: ``A [S+1, R, in]`` and ``Bt [S+1, R, out]`` holding ``scale · Bᵀ`` (zero-padded past a
slot's rank), indexed by ``slot + 1``; entry 0, for slot ``-1``, is all zeros. Every path
adds the same delta to one base GEMM; they differ only in how they batch the two thin products:

- ``lora_gather``: per-token gather of each token's A and B (BGMV, as Punica/vLLM decode).
- ``lora_segmented``: tokens grouped by adapter, two small matmuls per group (SGMV-like).
- ``lora_stacked``: one GEMM against all adapters present, a one-hot selection, one GEMM back.
- ``lora_bmm``: the paper's baseline (appendix A.2), per-example padded ``torch.bmm``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flora.adapters.batch import AdapterBatch


def lora_gather(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bt: torch.Tensor,
    entries: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """``delta[t] = (A[s_t] x[t]) · Bt[s_t]`` with per-token gathered factors (entry = slot + 1)."""
    a = A[:, :rank].index_select(0, entries)  # [T, r, in]
    h = torch.bmm(a, x.unsqueeze(2))  # [T, r, 1]
    b = Bt[:, :rank].index_select(0, entries)  # [T, r, out]
    delta = torch.bmm(h.transpose(1, 2), b).squeeze(1)  # [T, out]
    return F.linear(x, weight, bias) + delta


def lora_segmented(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bt: torch.Tensor,
    ranks: Sequence[int],
    batch: AdapterBatch,
) -> torch.Tensor:
    """Per adapter present: ``delta_seg = (x_seg A_sᵀ) Bt_s`` at the slot's own rank.

    ``ranks[slot]`` is 0 for slots that hold no LoRA adapter here (they add nothing).
    """
    y = F.linear(x, weight, bias)
    skip = batch.num_unadapted
    if skip == batch.num_tokens:
        return y
    xs = x if batch.is_sorted else x.index_select(0, batch.order)
    deltas = []
    rows, deltas = [], []
    for slot, start, count in zip(batch.slots, batch.offsets, batch.counts, strict=True):
        r = ranks[slot] if start >= skip else 0
        if r == 0:  # no adapter, or a slot of another kind / not targeting this layer
            continue
        seg, entry = xs[start : start + count], slot + 1
        rows.append(batch.order[start : start + count])
        deltas.append((seg @ A[entry, :r].T) @ Bt[entry, :r])  # [n_s, out]
    if not deltas:
        return y
    if len(deltas) == 1:
        return y.index_add(0, rows[0], deltas[0])
    return y.index_add(0, torch.cat(rows), torch.cat(deltas))


def lora_stacked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bt: torch.Tensor,
    entries: torch.Tensor,
    active: Sequence[int],
    rank: int,
) -> torch.Tensor:
    """``h = x A_allᵀ`` over the N ``active`` adapters, each token's own kept, ``h Bt_all``.

    The others are dropped by selection, not by multiplying with 0: an adapter that overflows
    on a token would give ``Inf × 0 = NaN`` to every other token. The bank keeps ``Bt`` finite,
    so the zeros then meet only finite values in the second GEMM.
    """
    y = F.linear(x, weight, bias)
    if not active:
        return y
    n, t = len(active), x.shape[0]
    sel = torch.tensor(active, device=x.device) + 1  # table entries
    a = A[:, :rank].index_select(0, sel).reshape(n * rank, -1)  # [N·r, in]
    b = Bt[:, :rank].index_select(0, sel).reshape(n * rank, -1)  # [N·r, out]
    position = torch.full((A.shape[0],), -1, dtype=torch.long, device=x.device)
    position[sel] = torch.arange(n, device=x.device)
    mask = position[entries].unsqueeze(1) == torch.arange(n, device=x.device)  # [T, N]
    h = torch.where(mask.unsqueeze(2), F.linear(x, a).view(t, n, rank), 0.0)  # [T, N, r]
    return torch.addmm(y, h.view(t, n * rank), b)


def lora_bmm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bt: torch.Tensor,
    batch: AdapterBatch,
    rank: int,
) -> torch.Tensor:
    """The paper's baseline: pad runs to ``[n, L, in]``, gather per-example factors, two bmm."""
    runs = batch.runs
    run_id, position = batch.run_index
    n, longest = len(runs.lengths), max(runs.lengths)
    padded = x.new_zeros(n, longest, x.shape[1])
    padded = padded.index_put((run_id, position), x)  # [n, L, in]
    sel = torch.tensor(runs.slots, device=x.device) + 1  # table entries
    a = A[:, :rank].index_select(0, sel)  # [n, r, in]
    b = Bt[:, :rank].index_select(0, sel)  # [n, r, out]
    delta = torch.bmm(torch.bmm(padded, a.transpose(1, 2)), b)  # [n, L, out]
    return F.linear(x, weight, bias) + delta[run_id, position]
