"""FLoRA, vectorised (paper §3.2): every token its own adapter, one GEMM over T·r rows.

The bank folds ``1/r`` into ``Bt`` (and zero-pads unused ranks), so the mean over rank is a
plain sum and a rank-2 adapter in a rank-8-capable slot computes exactly its rank-2 mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def flora_vectorised(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bt: torch.Tensor,
    entries: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """``y[t] = Σ_j Bt[s_t, j] ∘ ((A[s_t, j] ∘ x[t]) Wᵀ) + β`` without ever building ``W_i``.

    Shapes: ``x [T, in]``, ``weight [out, in]``, ``A [S+1, R, in]``, ``Bt [S+1, R, out]`` with
    ``1/r`` folded in; ``entries [T]`` = slot + 1 (entry 0, slot ``-1``, is the identity, i.e.
    the base layer);
    ``rank`` ≤ R is the largest rank present, so padded ranks beyond it cost nothing.
    """
    in_place = not _needs_grad(x, weight, bias, A, Bt)
    if rank == 1:
        a = A[:, 0].index_select(0, entries)  # [T, in]
        b = Bt[:, 0].index_select(0, entries)  # [T, out]
        z = a.mul_(x) if in_place else a * x
        p = F.linear(z, weight)  # [T, out]: the base GEMM, nothing more
        if in_place:
            p.mul_(b)
            return p.add_(bias) if bias is not None else p
        return torch.addcmul(bias, p, b) if bias is not None else p * b
    a = A[:, :rank].index_select(0, entries)  # [T, r, in]
    z = a.mul_(x.unsqueeze(1)) if in_place else a * x.unsqueeze(1)
    p = F.linear(z, weight)  # [T, r, out]: one GEMM over T·r rows
    b = Bt[:, :rank].index_select(0, entries)  # [T, r, out]
    y = (p.mul_(b) if in_place else p * b).sum(dim=1)  # [T, out]
    if bias is None:
        return y
    return y.add_(bias) if in_place else y + bias
