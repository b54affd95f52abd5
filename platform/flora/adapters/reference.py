"""The plain reference every fast path is checked against: materialised ``W_i`` in float64.

Slow on purpose and written independently of the bank's folded tables: it works from the
adapters' own factors, so a folding or padding mistake in the fast paths cannot hide here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flora.adapters.weights import AdapterWeights, FloraWeights, IA3Weights, LoraWeights


def adapted_weight(weight: torch.Tensor, adapter: FloraWeights | LoraWeights) -> torch.Tensor:
    """``W ∘ (B A / r)`` for FLoRA, ``W + scale · B A`` for LoRA, in float64."""
    W, A, B = weight.double(), adapter.A.double(), adapter.B.double()
    if isinstance(adapter, FloraWeights):
        return W * (B @ A) / adapter.rank
    return W + adapter.scale * (B @ A)


def reference_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    per_token: Sequence[AdapterWeights | None],
) -> torch.Tensor:
    """``y[t]`` for token ``t`` under its own adapter (``None``: the base layer), float64."""
    x64, W = x.double(), weight.double()
    beta = bias.double() if bias is not None else torch.zeros(W.shape[0], dtype=torch.float64)
    rows = []
    for t, adapter in enumerate(per_token):
        xt = x64[t]
        if adapter is None:
            rows.append(xt @ W.T + beta)
        elif isinstance(adapter, IA3Weights):
            scale = adapter.scale.double()
            rows.append(
                (xt * scale) @ W.T + beta if adapter.feedforward else (xt @ W.T + beta) * scale
            )
        else:
            rows.append(xt @ adapted_weight(W, adapter).T + beta)
    return torch.stack(rows)
