"""Factories for fresh random layers and adapters; every run draws a new seed (printed)."""

from __future__ import annotations

import os
import random

import pytest
import torch
from torch import nn

from flora.adapters import (
    AdaptedLinear,
    AdapterBatch,
    BankConfig,
    FloraWeights,
    IA3Weights,
    LoraWeights,
)

# Per-dtype tolerance, relative to the output's magnitude (vLLM's TOLERANCES idea).
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.bfloat16: 4e-2,
}


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("FLORA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"FLORA_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


def rand(gen: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0):
    return shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def random_flora(gen, rank: int, k: int, d: int) -> FloraWeights:
    return FloraWeights(
        A=rand(gen, rank, k, scale=0.3, shift=1.0), B=rand(gen, d, rank, scale=0.3, shift=1.0)
    )


def random_lora(gen, rank: int, k: int, d: int, rslora: bool = False) -> LoraWeights:
    return LoraWeights(
        A=rand(gen, rank, k, scale=k**-0.5),
        B=rand(gen, d, rank),
        alpha=2.0 * rank,
        use_rslora=rslora,
    )


def random_ia3(gen, k: int, d: int, feedforward: bool) -> IA3Weights:
    return IA3Weights(
        scale=rand(gen, k if feedforward else d, scale=0.3, shift=1.0), feedforward=feedforward
    )


def make_layer(
    gen, k: int, d: int, dtype: torch.dtype, config: BankConfig | None = None, **kwargs
) -> AdaptedLinear:
    base = nn.Linear(k, d, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(rand(gen, d, k, scale=k**-0.5))
        base.bias.copy_(rand(gen, d))
    return AdaptedLinear(base, config or BankConfig(max_slots=8, max_rank=16), **kwargs)


def rounded(adapter, dtype: torch.dtype):
    """The adapter as the bank stores it: its factors rounded to ``dtype``."""
    if isinstance(adapter, IA3Weights):
        return IA3Weights(scale=adapter.scale.to(dtype), feedforward=adapter.feedforward)
    if isinstance(adapter, LoraWeights):
        return LoraWeights(
            A=adapter.A.to(dtype),
            B=adapter.B.to(dtype),
            alpha=adapter.alpha,
            use_rslora=adapter.use_rslora,
        )
    return FloraWeights(A=adapter.A.to(dtype), B=adapter.B.to(dtype))


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCES[dtype]
    ref, y = ref.detach(), y.detach()
    scale = max(1.0, float(ref.abs().max()))
    err = float((y.double() - ref).abs().max())
    assert err <= tol * scale, f"max abs error {err:.3g} > {tol * scale:.3g} ({dtype})"


def batch_of(slots: list[int]) -> AdapterBatch:
    return AdapterBatch.from_slots(torch.tensor(slots))
