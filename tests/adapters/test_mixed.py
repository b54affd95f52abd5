"""One batch mixing FLoRA, LoRA, IA3 and base rows; a request in a mixed batch equals it alone."""

from __future__ import annotations

import itertools

import pytest
import torch

from flora.adapters import AdapterBatch, AdapterKind, KernelPath, MaterialisedCache
from flora.adapters.reference import reference_forward
from tests.adapters.conftest import (
    assert_matches,
    make_layer,
    rand,
    random_flora,
    random_ia3,
    random_lora,
    rounded,
)

K, D = 40, 56
FLORA_PATHS = [KernelPath.FLORA_VECTORISED, KernelPath.FLORA_SEGMENTED]
LORA_PATHS = [
    KernelPath.LORA_GATHER,
    KernelPath.LORA_SEGMENTED,
    KernelPath.LORA_STACKED,
    KernelPath.LORA_BMM,
]


def mixed_layer(gen, dtype, cache=None):
    layer = make_layer(gen, K, D, dtype, cache=cache)
    adapters = {
        0: random_flora(gen, 1, K, D),
        1: random_flora(gen, 4, K, D),
        2: random_lora(gen, 2, K, D),
        3: random_lora(gen, 8, K, D, rslora=True),
        4: random_ia3(gen, K, D, feedforward=False),
        5: random_ia3(gen, K, D, feedforward=True),
    }
    for slot, adapter in adapters.items():
        layer.load_adapter(slot, adapter)
    return layer, adapters  # slots 6, 7 stay empty: they must act as the base layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("flora_path", "lora_path"),
    [*itertools.product(FLORA_PATHS, LORA_PATHS), (None, None)],
    ids=lambda p: str(p or "auto"),
)
def test_mixed_kinds_match_reference(gen, dtype, flora_path, lora_path):
    layer, adapters = mixed_layer(gen, dtype)
    slots = torch.randint(-1, 8, (53,), generator=gen).tolist()
    x = rand(gen, len(slots), K).to(dtype)
    paths = {AdapterKind.FLORA: flora_path, AdapterKind.LORA: lora_path} if flora_path else None
    with torch.no_grad():
        y = layer(x, AdapterBatch.from_slots(slots), paths=paths)
    per_token = [rounded(adapters[s], dtype) if s in adapters else None for s in slots]
    assert_matches(y, reference_forward(x, layer.base.weight, layer.base.bias, per_token), dtype)


@pytest.mark.parametrize("with_cache", [False, True])
def test_request_in_mixed_batch_equals_request_alone(gen, with_cache):
    """PEFT's TestMixedAdapterBatches: batching must not change anyone's answer."""
    cache = MaterialisedCache(max_bytes=1 << 24) if with_cache else None
    layer, _ = mixed_layer(gen, torch.float32, cache=cache)
    requests = [
        (slot, int(torch.randint(1, 9, (1,), generator=gen)))
        for slot in [0, 3, -1, 1, 4, 2, 5, 6, 0, 3]
    ]
    xs = [rand(gen, n, K).float() for _, n in requests]
    slots = [s for s, n in requests for _ in range(n)]
    with torch.no_grad():
        together = layer(torch.cat(xs), AdapterBatch.from_slots(slots))
        alone = torch.cat(
            [
                layer(x, AdapterBatch.from_slots([s] * x.shape[0]))
                for (s, _), x in zip(requests, xs, strict=True)
            ]
        )
    torch.testing.assert_close(together, alone, atol=2e-5, rtol=2e-5)


def test_all_base_rows_take_the_plain_linear(gen):
    layer, _ = mixed_layer(gen, torch.float32)
    x = rand(gen, 9, K).float()
    with torch.no_grad():
        y = layer(x, AdapterBatch.from_slots([-1, 6, 7] * 3))
    torch.testing.assert_close(y, layer.base(x))
