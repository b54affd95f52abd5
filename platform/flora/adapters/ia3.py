"""IA3 with PEFT's semantics, batched: every token its own scaling vectors.

``y[t] = ((x[t] ∘ s_in[s_t]) Wᵀ + β) ∘ s_out[s_t]``. A feed-forward adapter fills ``s_in`` (the
bias is left alone); any other fills ``s_out`` (the bias is scaled too). The entries a slot does
not use, and entry 0 (slot ``-1``), are ones; tables are indexed by ``slot + 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ia3_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale_in: torch.Tensor,
    scale_out: torch.Tensor,
    entries: torch.Tensor,
    *,
    scales_input: bool = True,
    scales_output: bool = True,
) -> torch.Tensor:
    """Shapes: ``scale_in [S+1, in]``, ``scale_out [S+1, out]``; flags skip all-ones sides."""
    if scales_input:
        x = x * scale_in.index_select(0, entries)  # [T, in]
    y = F.linear(x, weight, bias)
    if scales_output:
        y = y * scale_out.index_select(0, entries)  # [T, out]
    return y
