"""Small random GPTBigCode models (MQA and MHA), saved in HF's layout, and HF oracles.

Weights are perturbed well away from init (normal(0, 0.02)) so the logits spread and a wrong
head split, mask or scale shows up as a large difference rather than a rounding one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from transformers import GPTBigCodeForCausalLM

from flora.model import GPTBigCode, ModelArgs, save_model

# Small shapes: 4 heads of 16, MLP 128 wide, 2 layers. MQA is StarCoder's; MHA is the HF option.
CONFIGS = {
    "mqa": ModelArgs(vocab_size=300, n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=128),
    "mha": ModelArgs(
        vocab_size=300,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        multi_query=False,
    ),
}
FP32_ATOL = 1e-4  # max abs logit difference allowed between two fp32 implementations


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("FLORA_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"FLORA_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_model(args: ModelArgs, gen: torch.Generator, noise: float = 0.1) -> GPTBigCode:
    """HF-style init plus ``noise`` · N(0, 1) on every parameter (biases and norms included)."""
    net = GPTBigCode(args).init_weights(seed=int(torch.randint(2**31, (1,), generator=gen)))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(noise * torch.randn(p.shape, generator=gen))
    return net.eval().requires_grad_(False)


@pytest.fixture
def base_dir(gen: torch.Generator, tmp_path: Path) -> Path:
    """A random MQA checkpoint on disk, the base model of the adapter tests."""
    return save_model(random_model(CONFIGS["mqa"], gen), tmp_path / "base")


def hf_model(directory: Path, dtype: torch.dtype = torch.float32) -> GPTBigCodeForCausalLM:
    """The oracle: transformers' own GPTBigCode, eager attention, read from our checkpoint."""
    model = GPTBigCodeForCausalLM.from_pretrained(
        directory, attn_implementation="eager", dtype=dtype
    )
    return model.eval().requires_grad_(False)


def random_ids(gen: torch.Generator, vocab: int, *shape: int) -> torch.Tensor:
    return torch.randint(vocab, shape, generator=gen)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())
