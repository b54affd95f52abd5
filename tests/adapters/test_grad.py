"""Autograd flows through every path: gradcheck in float64 on small shapes."""

from __future__ import annotations

import pytest
import torch

from flora.adapters import AdapterBatch, AdapterKind, KernelPath
from flora.adapters.flora import flora_vectorised
from flora.adapters.ia3 import ia3_forward
from flora.adapters.lora import lora_bmm, lora_gather, lora_segmented, lora_stacked
from flora.adapters.reference import reference_forward
from flora.adapters.segmented import flora_segmented
from tests.adapters.conftest import make_layer, rand, random_flora, random_lora

K, D, S, R = 5, 4, 3, 2
SLOTS = [1, -1, 0, 1, 2, 2, -1]
RANKS = [2, 1, 2]


def tables(gen):
    def leaf(*shape):
        return rand(gen, *shape, scale=0.5, shift=1.0).requires_grad_()

    return (
        rand(gen, len(SLOTS), K).requires_grad_(),
        leaf(D, K),
        leaf(D),
        leaf(S + 1, R, K),
        leaf(S + 1, R, D),
    )


CASES = {
    "flora_vectorised": lambda x, w, b, A, Bt, batch: flora_vectorised(
        x, w, b, A, Bt, batch.entries, R
    ),
    "flora_segmented": lambda x, w, b, A, Bt, batch: flora_segmented(x, w, b, A, Bt, RANKS, batch),
    "lora_gather": lambda x, w, b, A, Bt, batch: lora_gather(x, w, b, A, Bt, batch.entries, R),
    "lora_segmented": lambda x, w, b, A, Bt, batch: lora_segmented(x, w, b, A, Bt, RANKS, batch),
    "lora_stacked": lambda x, w, b, A, Bt, batch: lora_stacked(
        x, w, b, A, Bt, batch.entries, [0, 1, 2], R
    ),
    "lora_bmm": lambda x, w, b, A, Bt, batch: lora_bmm(x, w, b, A, Bt, batch, R),
    "ia3": lambda x, w, b, A, Bt, batch: ia3_forward(x, w, b, A[:, 0], Bt[:, 0], batch.entries),
}


@pytest.mark.parametrize("case", CASES)
def test_gradcheck(gen, case):
    batch = AdapterBatch.from_slots(SLOTS)
    fn = CASES[case]
    assert torch.autograd.gradcheck(lambda *args: fn(*args, batch), tables(gen))


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        (AdapterKind.FLORA, KernelPath.FLORA_VECTORISED),
        (AdapterKind.FLORA, KernelPath.FLORA_SEGMENTED),
        (AdapterKind.LORA, KernelPath.LORA_SEGMENTED),
        (AdapterKind.LORA, KernelPath.LORA_STACKED),
    ],
)
def test_layer_gradients_match_reference(gen, kind, path):
    layer = make_layer(gen, 12, 10, torch.float64)
    make = random_flora if kind is AdapterKind.FLORA else random_lora
    adapters = {s: make(gen, r, 12, 10) for s, r in [(0, 1), (1, 3), (2, 2)]}
    for slot, adapter in adapters.items():
        layer.load_adapter(slot, adapter)
    slots = [2, 0, -1, 1, 1, 2, 0]
    x = rand(gen, len(slots), 12).requires_grad_()
    g = rand(gen, len(slots), 10)
    (layer(x, AdapterBatch.from_slots(slots), paths={kind: path}) * g).sum().backward()
    got_x, got_w = x.grad.clone(), layer.base.weight.grad.clone()
    x.grad = None
    w = layer.base.weight.detach().clone().requires_grad_()
    ref = reference_forward(x, w, layer.base.bias.detach(), [adapters.get(s) for s in slots])
    (ref * g).sum().backward()
    torch.testing.assert_close(got_x, x.grad)
    torch.testing.assert_close(got_w, w.grad)
