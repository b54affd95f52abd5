"""Every path equals the float64 materialised reference, on fresh random inputs.

Grid: path × dtype × ranks (uniform and mixed in one batch) × slot patterns (one adapter, many
interleaved, contiguous requests, with no-adapter rows, all no-adapter).
"""

from __future__ import annotations

import pytest
import torch

from flora.adapters import AdapterBatch, AdapterKind, KernelPath
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

K, D, T, SLOTS = 48, 40, 37, 6
DTYPES = [torch.float32, torch.bfloat16]
RANKS = {"r1": [1], "r2": [2], "r4": [4], "r8": [8], "r16": [16], "mixed": [1, 2, 3, 8, 16, 5]}
PATTERNS = ["one", "many", "requests", "with_base", "all_base"]
KIND_PATHS = [
    (AdapterKind.FLORA, KernelPath.FLORA_VECTORISED),
    (AdapterKind.FLORA, KernelPath.FLORA_SEGMENTED),
    (AdapterKind.FLORA, None),  # dispatcher's choice
    (AdapterKind.LORA, KernelPath.LORA_GATHER),
    (AdapterKind.LORA, KernelPath.LORA_SEGMENTED),
    (AdapterKind.LORA, KernelPath.LORA_STACKED),
    (AdapterKind.LORA, KernelPath.LORA_BMM),
    (AdapterKind.LORA, None),
]


def token_slots(pattern: str, gen: torch.Generator, n: int = SLOTS) -> list[int]:
    if pattern == "one":
        return [0] * T
    if pattern == "all_base":
        return [-1] * T
    low = -1 if pattern in ("with_base", "requests") else 0
    if pattern == "requests":  # contiguous runs, like packed requests
        slots: list[int] = []
        while len(slots) < T:
            length = int(torch.randint(1, 9, (1,), generator=gen))
            slots += [int(torch.randint(low, n, (1,), generator=gen))] * length
        return slots[:T]
    slots = [i % n for i in range(T)] if low == 0 else [i % (n + 1) - 1 for i in range(T)]
    return [slots[i] for i in torch.randperm(T, generator=gen).tolist()]


def run_case(gen, kind, path, dtype, ranks, pattern):
    layer = make_layer(gen, K, D, dtype)
    adapters = {}
    for slot in range(SLOTS):
        r = ranks[slot % len(ranks)]
        adapters[slot] = (
            random_flora(gen, r, K, D)
            if kind is AdapterKind.FLORA
            else random_lora(gen, r, K, D, rslora=slot % 2 == 1)
        )
        layer.load_adapter(slot, adapters[slot])
    slots = token_slots(pattern, gen)
    x = rand(gen, T, K).to(dtype)
    with torch.no_grad():
        y = layer(x, AdapterBatch.from_slots(slots), paths={kind: path} if path else None)
    per_token = [rounded(adapters[s], dtype) if s >= 0 else None for s in slots]
    ref = reference_forward(x, layer.base.weight, layer.base.bias, per_token)
    assert y.dtype == dtype and y.shape == (T, D)
    assert_matches(y, ref, dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("kind", "path"), KIND_PATHS, ids=lambda v: str(v or "auto"))
def test_path_matches_reference(gen, kind, path, dtype, ranks, pattern):
    run_case(gen, kind, path, dtype, ranks, pattern)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feedforward", ["input", "output", "both"])
def test_ia3_matches_reference(gen, dtype, pattern, feedforward):
    layer = make_layer(gen, K, D, dtype)
    adapters = {}
    for slot in range(SLOTS):
        ff = {"input": True, "output": False, "both": slot % 2 == 0}[feedforward]
        adapters[slot] = random_ia3(gen, K, D, feedforward=ff)
        layer.load_adapter(slot, adapters[slot])
    slots = token_slots(pattern, gen)
    x = rand(gen, T, K).to(dtype)
    with torch.no_grad():
        y = layer(x, AdapterBatch.from_slots(slots))
    per_token = [rounded(adapters[s], dtype) if s >= 0 else None for s in slots]
    assert_matches(y, reference_forward(x, layer.base.weight, layer.base.bias, per_token), dtype)


def test_leading_dims_are_flattened(gen):
    layer = make_layer(gen, K, D, torch.float32)
    adapter = random_flora(gen, 2, K, D)
    layer.load_adapter(3, adapter)
    x = rand(gen, 2, 5, K).float()
    slots = [3, 3, -1, 3, -1] * 2
    with torch.no_grad():
        y = layer(x, AdapterBatch.from_slots(slots))
    ref = reference_forward(
        x.view(10, K),
        layer.base.weight,
        layer.base.bias,
        [adapter if s == 3 else None for s in slots],
    )
    assert y.shape == (2, 5, D)
    assert_matches(y.view(10, D), ref, torch.float32)
