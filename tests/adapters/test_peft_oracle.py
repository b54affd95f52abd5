"""LoRA and IA3 semantics checked against the real ``peft`` library as the oracle."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, LoraConfig, inject_adapter_in_model
from torch import nn

from flora.adapters import AdapterBatch, AdapterKind, IA3Weights, KernelPath, LoraWeights
from tests.adapters.conftest import make_layer, rand

K, D = 24, 20


class OneLinear(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.proj = nn.Linear(K, D, dtype=torch.float64)
        self.proj.load_state_dict(base.state_dict())

    def forward(self, x):
        return self.proj(x)


def peft_lora(base: nn.Linear, weights: LoraWeights) -> nn.Module:
    config = LoraConfig(
        r=weights.rank,
        lora_alpha=weights.alpha,
        use_rslora=weights.use_rslora,
        target_modules=["proj"],
        lora_dropout=0.0,
    )
    model = inject_adapter_in_model(config, OneLinear(base))
    with torch.no_grad():
        model.proj.lora_A["default"].weight.copy_(weights.A)
        model.proj.lora_B["default"].weight.copy_(weights.B)
    return model


def peft_ia3(base: nn.Linear, weights: IA3Weights) -> nn.Module:
    config = IA3Config(
        target_modules=["proj"], feedforward_modules=["proj"] if weights.feedforward else []
    )
    model = inject_adapter_in_model(config, OneLinear(base))
    with torch.no_grad():
        vector = model.proj.ia3_l["default"]
        vector.copy_(weights.scale.view_as(vector))
    return model


@pytest.mark.parametrize(
    "path",
    [
        KernelPath.LORA_GATHER,
        KernelPath.LORA_SEGMENTED,
        KernelPath.LORA_STACKED,
        KernelPath.LORA_BMM,
    ],
)
def test_lora_equals_peft(gen, path):
    layer = make_layer(gen, K, D, torch.float64)
    adapters = [
        LoraWeights(A=rand(gen, r, K), B=rand(gen, D, r), alpha=a, use_rslora=rs)
        for r, a, rs in [(1, 1.0, False), (4, 8.0, False), (8, 16.0, True)]
    ]
    for slot, weights in enumerate(adapters):
        layer.load_adapter(slot, weights)
    x = rand(gen, 11, K)
    for slot, weights in enumerate(adapters):
        expected = peft_lora(layer.base, weights)(x)
        with torch.no_grad():
            got = layer(x, AdapterBatch.from_slots([slot] * 11), paths={AdapterKind.LORA: path})
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("feedforward", [False, True])
def test_ia3_equals_peft(gen, feedforward):
    layer = make_layer(gen, K, D, torch.float64)
    weights = IA3Weights(
        scale=rand(gen, K if feedforward else D, shift=1.0), feedforward=feedforward
    )
    layer.load_adapter(2, weights)
    x = rand(gen, 7, K)
    with torch.no_grad():
        got = layer(x, AdapterBatch.from_slots([2] * 7))
    torch.testing.assert_close(got, peft_ia3(layer.base, weights)(x))
