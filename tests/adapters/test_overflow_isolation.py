"""One slot's overflow never reaches another token's row, and the bank refuses what overflows it.

A hostile slot holds finite factors whose products overflow to Inf. Every path must keep the
other tokens' outputs finite and equal to the reference: they may drop another slot's values by
selection, never by multiplying them with 0 (``Inf × 0 = NaN``).
"""

from __future__ import annotations

import pytest
import torch

from flora.adapters import (
    AdaptedLinear,
    AdapterBatch,
    AdapterKind,
    BankConfig,
    FloraWeights,
    IA3Weights,
    InvalidAdapterError,
    LoraWeights,
)
from flora.adapters.bank import AdapterBank, fits
from flora.adapters.dispatch import PATHS_BY_KIND
from flora.adapters.reference import reference_forward
from tests.adapters.conftest import make_layer, random_flora, random_ia3, random_lora, rounded

K, D = 16, 24
HUGE = 3e38  # finite in float32, but any sum of a few such products is not


def hostile(kind: AdapterKind):
    if kind is AdapterKind.FLORA:
        return FloraWeights(A=torch.full((2, K), HUGE), B=torch.ones(D, 2))
    if kind is AdapterKind.LORA:
        return LoraWeights(A=torch.full((2, K), HUGE), B=torch.ones(D, 2), alpha=2.0)
    return IA3Weights(scale=torch.full((D,), HUGE))


def benign(kind: AdapterKind, gen: torch.Generator):
    if kind is AdapterKind.FLORA:
        return random_flora(gen, 2, K, D)
    if kind is AdapterKind.LORA:
        return random_lora(gen, 4, K, D)
    return random_ia3(gen, K, D, feedforward=False)


CASES = [(kind, path) for kind, paths in PATHS_BY_KIND.items() for path in paths]


def check_bystanders(layer: AdaptedLinear, adapters: dict, slots: list[int], paths) -> None:
    gen = torch.Generator().manual_seed(0)
    x = 1 + torch.rand(len(slots), K, generator=gen)  # positive: x · HUGE overflows
    with torch.no_grad():
        y = layer(x, AdapterBatch.from_slots(slots), paths=paths)
    hostile_rows = [t for t, s in enumerate(slots) if s == 1]
    others = [t for t, s in enumerate(slots) if s != 1]
    assert not torch.isfinite(y[hostile_rows]).all()  # the attacker really overflows
    per_token = [rounded(adapters[s], torch.float32) if s >= 0 else None for s in slots]
    ref = reference_forward(x, layer.base.weight, layer.base.bias, per_token)
    assert torch.isfinite(y[others]).all()
    torch.testing.assert_close(y[others].double(), ref[others], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("kind", "path"), CASES, ids=lambda v: str(v))
def test_an_overflowing_slot_leaves_other_tokens_exact(gen, kind, path):
    layer = make_layer(gen, K, D, torch.float32)
    adapters = {0: benign(kind, gen), 1: hostile(kind), 2: benign(kind, gen)}
    for slot, adapter in adapters.items():
        layer.load_adapter(slot, adapter)
    slots = [-1, 0, 1, 2, 1, -1, 0, 2, 1]  # unsorted, the attacker amid the others
    check_bystanders(layer, adapters, slots, {kind: path})


@pytest.mark.parametrize("attacker", list(AdapterKind), ids=str)
def test_an_overflowing_slot_in_a_mixed_kind_batch(gen, attacker):
    layer = make_layer(gen, K, D, torch.float32)
    adapters = {
        0: benign(AdapterKind.FLORA, gen),
        1: hostile(attacker),
        2: benign(AdapterKind.LORA, gen),
        3: benign(AdapterKind.IA3, gen),
    }
    for slot, adapter in adapters.items():
        layer.load_adapter(slot, adapter)
    slots = [3, 1, -1, 0, 2, 1, 2, 0, -1, 3]
    for path in PATHS_BY_KIND[attacker]:
        check_bystanders(layer, adapters, slots, {attacker: path})


def overflowing(dtype: torch.dtype):
    """Finite factors, beyond ``dtype`` once stored (1/r or LoRA's scale folded into B)."""
    if dtype is torch.float16:
        return FloraWeights(A=torch.ones(1, K), B=torch.full((D, 1), 1e5))
    return LoraWeights(A=torch.ones(1, K), B=torch.full((D, 1), 1e37), alpha=100.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bank_refuses_an_adapter_that_overflows_its_dtype(gen, dtype):
    config = BankConfig(max_slots=3, max_rank=4)
    bank = AdapterBank(K, D, config, dtype=dtype)
    empty = AdapterBank(K, D, config, dtype=dtype)
    keep = random_lora(gen, 2, K, D)
    bank.load(0, keep)
    bank.load(1, random_flora(gen, 2, K, D))  # about to be replaced by the refused adapter
    version = bank.versions[1]
    bad = overflowing(dtype)
    assert not fits(bad, dtype) and fits(bad, torch.float64)
    with pytest.raises(InvalidAdapterError, match="overflows this bank's dtype"):
        bank.load(1, bad)
    assert bank.kinds[1] is None and bank.ranks[1] == 0 and bank.versions[1] > version
    for name, table in bank.named_buffers():
        assert torch.equal(table[2], getattr(empty, name)[2]), name  # slot 1 is the identity
        assert torch.isfinite(table).all(), name
    assert bank.kinds[0] is AdapterKind.LORA
    torch.testing.assert_close(bank.export(0).A, keep.A.to(dtype))


def test_refused_slot_serves_the_base_layer(gen):
    layer = make_layer(gen, K, D, torch.float16)
    with pytest.raises(InvalidAdapterError):
        layer.load_adapter(0, overflowing(torch.float16))
    x = torch.rand(3, K, generator=gen).half()
    with torch.no_grad():
        y = layer(x, AdapterBatch.from_slots([0, 0, -1]))
    torch.testing.assert_close(y, layer.base(x))
