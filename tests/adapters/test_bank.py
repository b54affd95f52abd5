"""Bank storage, slot lifecycle, the materialised cache, init, and typed errors on bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from flora.adapters import (
    AdaptedLinear,
    AdapterBatch,
    AdapterKind,
    BankConfig,
    FloraWeights,
    IA3Weights,
    InvalidAdapterError,
    KernelPath,
    LoraWeights,
    MaterialisedCache,
    SlotError,
)
from flora.adapters.reference import reference_forward
from tests.adapters.conftest import assert_matches, make_layer, rand, random_flora

K, D = 16, 12
SEGMENTED = {AdapterKind.FLORA: KernelPath.FLORA_SEGMENTED}


def test_base_weight_is_shared_not_copied(gen):
    base = nn.Linear(K, D)
    layer = AdaptedLinear(base, BankConfig(max_slots=4, max_rank=4))
    assert layer.base.weight.data_ptr() == base.weight.data_ptr()
    assert all(t.data_ptr() != base.weight.data_ptr() for t in layer.bank.buffers())


def test_low_rank_adapter_in_high_rank_slot_computes_its_own_mean(gen):
    layer = make_layer(gen, K, D, torch.float64, BankConfig(max_slots=2, max_rank=8))
    adapter = random_flora(gen, 2, K, D)
    layer.load_adapter(1, adapter)
    assert layer.bank.ranks[1] == 2
    assert torch.count_nonzero(layer.bank.flora_A[2, 2:]) == 0  # padding past the rank
    x = rand(gen, 5, K)
    for path in (KernelPath.FLORA_VECTORISED, KernelPath.FLORA_SEGMENTED):
        with torch.no_grad():
            y = layer(x, AdapterBatch.from_slots([1] * 5), paths={AdapterKind.FLORA: path})
        ref = reference_forward(x, layer.base.weight, layer.base.bias, [adapter] * 5)
        assert_matches(y, ref, torch.float64)


@pytest.mark.parametrize("rank", [1, 2, 8])
def test_identity_init_is_exact_and_breaks_symmetry(gen, rank):
    init = FloraWeights.identity(rank, K, D, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(init.multiplier(), torch.ones(D, K, dtype=torch.float64))
    if rank > 1:
        assert not torch.allclose(init.B[:, 0], init.B[:, 1])
    layer = make_layer(gen, K, D, torch.float64)
    layer.load_adapter(0, init)
    x = rand(gen, 3, K)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, AdapterBatch.from_slots([0, 0, 0])), layer.base(x))


def test_evict_returns_slot_to_base_and_reload_invalidates_cache(gen):
    cache = MaterialisedCache(max_bytes=1 << 20)
    layer = make_layer(gen, K, D, torch.float64, cache=cache)
    first, second = random_flora(gen, 4, K, D), random_flora(gen, 4, K, D)
    x, batch = rand(gen, 4, K), AdapterBatch.from_slots([0] * 4)
    layer.load_adapter(0, first)
    with torch.no_grad():
        layer(x, batch, paths=SEGMENTED)
        y = layer(x, batch, paths=SEGMENTED)
    assert cache.stats.hits == 1 and len(cache) == 1
    assert_matches(
        y, reference_forward(x, layer.base.weight, layer.base.bias, [first] * 4), torch.float64
    )
    layer.load_adapter(0, second)  # a new version must never be served from the old entry
    assert len(cache) == 0
    with torch.no_grad():
        y = layer(x, batch, paths=SEGMENTED)
    assert_matches(
        y, reference_forward(x, layer.base.weight, layer.base.bias, [second] * 4), torch.float64
    )
    layer.evict_adapter(0)
    assert layer.bank.kinds[0] is None and len(cache) == 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x, batch), layer.base(x))


def test_cache_is_bounded_and_evicts_least_recently_used():
    cache = MaterialisedCache(max_bytes=3 * 4 * 10)  # three float32 [10] tensors
    for key in "abcd":
        cache.get_or_make(key, lambda: torch.zeros(10))
    assert "a" not in cache and len(cache) == 3 and cache.bytes_used == 120
    cache.get_or_make("b", lambda: pytest.fail("b must be a hit"))
    cache.get_or_make("e", lambda: torch.zeros(10))
    assert "c" not in cache and "b" in cache and cache.stats.evictions == 2
    big = cache.get_or_make("huge", lambda: torch.zeros(100))  # larger than the cache
    assert big.numel() == 100 and "huge" not in cache


BAD_ADAPTERS = {
    "A wrong in": (lambda: FloraWeights(A=torch.ones(2, K + 1), B=torch.ones(D, 2)), "A must be"),
    "B wrong out": (lambda: FloraWeights(A=torch.ones(2, K), B=torch.ones(D + 1, 2)), "B must be"),
    "rank mismatch": (
        lambda: LoraWeights(A=torch.ones(2, K), B=torch.ones(D, 3), alpha=1.0),
        "B must be",
    ),
    "rank 0": (lambda: FloraWeights(A=torch.ones(0, K), B=torch.ones(D, 0)), "rank must be"),
    "NaN": (
        lambda: FloraWeights(A=torch.full((1, K), float("nan")), B=torch.ones(D, 1)),
        "NaN or Inf",
    ),
    "Inf": (
        lambda: LoraWeights(A=torch.ones(1, K), B=torch.full((D, 1), float("inf")), alpha=1.0),
        "NaN or Inf",
    ),
    "integer": (
        lambda: FloraWeights(A=torch.ones(1, K, dtype=torch.int64), B=torch.ones(D, 1)),
        "floating-point",
    ),
    "rank too high": (lambda: FloraWeights(A=torch.ones(9, K), B=torch.ones(D, 9)), "max_rank"),
    "ia3 wrong side": (lambda: IA3Weights(scale=torch.ones(K), feedforward=False), "ia3: scale"),
    "alpha NaN": (
        lambda: LoraWeights(A=torch.ones(1, K), B=torch.ones(D, 1), alpha=float("nan")),
        "alpha",
    ),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_is_rejected_and_slot_untouched(gen, case):
    make, message = BAD_ADAPTERS[case]
    layer = make_layer(gen, K, D, torch.float32, BankConfig(max_slots=2, max_rank=8))
    good = random_flora(gen, 2, K, D)
    layer.load_adapter(0, good)
    before = {name: t.clone() for name, t in layer.bank.named_buffers()}
    with pytest.raises(InvalidAdapterError, match=message):
        layer.load_adapter(0, make())
    assert layer.bank.kinds[0] is AdapterKind.FLORA and layer.bank.ranks[0] == 2
    for name, t in layer.bank.named_buffers():
        assert torch.equal(t, before[name]), f"{name} changed by a rejected load"


def test_kind_without_tables_is_rejected(gen):
    layer = make_layer(
        gen,
        K,
        D,
        torch.float32,
        BankConfig(max_slots=2, max_rank=4, kinds=frozenset({AdapterKind.FLORA})),
    )
    with pytest.raises(InvalidAdapterError, match="no lora adapters"):
        layer.load_adapter(0, LoraWeights(A=torch.ones(1, K), B=torch.ones(D, 1), alpha=1.0))


@pytest.mark.parametrize("slot", [-1, 2, 100])
def test_slot_out_of_range_on_load(gen, slot):
    layer = make_layer(gen, K, D, torch.float32, BankConfig(max_slots=2, max_rank=4))
    with pytest.raises(SlotError, match="out of range"):
        layer.load_adapter(slot, random_flora(gen, 1, K, D))


def test_batch_errors_are_typed(gen):
    layer = make_layer(gen, K, D, torch.float32, BankConfig(max_slots=2, max_rank=4))
    x = rand(gen, 3, K).float()
    with pytest.raises(SlotError, match="out of range"):
        layer(x, AdapterBatch.from_slots([0, 1, 2]))
    with pytest.raises(SlotError, match="3 token slots"):
        layer(rand(gen, 4, K).float(), AdapterBatch.from_slots([0, 1, 1]))
    with pytest.raises(SlotError, match="-1 for 'no adapter'"):
        AdapterBatch.from_slots([0, -2])
    with pytest.raises(SlotError, match="at least one token"):
        AdapterBatch.from_slots([])
    with pytest.raises(SlotError, match="1-D"):
        AdapterBatch.from_slots(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(SlotError, match="out of range"):
        AdapterBatch.from_slots([0, 5], max_slots=2)


def test_forcing_a_path_of_another_kind_is_an_error(gen):
    layer = make_layer(gen, K, D, torch.float32)
    layer.load_adapter(0, random_flora(gen, 1, K, D))
    with pytest.raises(ValueError, match="cannot run flora"):
        layer(
            rand(gen, 2, K).float(),
            AdapterBatch.from_slots([0, 0]),
            paths={AdapterKind.FLORA: KernelPath.LORA_GATHER},
        )
