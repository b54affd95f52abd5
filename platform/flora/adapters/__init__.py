"""Batched adapter math: every token of a batch may use its own FLoRA, LoRA or IA3 adapter."""

from flora.adapters.bank import AdapterBank, BankConfig
from flora.adapters.batch import NO_ADAPTER, AdapterBatch
from flora.adapters.dispatch import Dispatcher, KernelPath
from flora.adapters.errors import AdapterError, InvalidAdapterError, SlotError
from flora.adapters.layer import AdaptedLinear
from flora.adapters.materialised import MaterialisedCache
from flora.adapters.weights import AdapterKind, FloraWeights, IA3Weights, LoraWeights

__all__ = [
    "NO_ADAPTER",
    "AdaptedLinear",
    "AdapterBank",
    "AdapterBatch",
    "AdapterError",
    "AdapterKind",
    "BankConfig",
    "Dispatcher",
    "FloraWeights",
    "IA3Weights",
    "InvalidAdapterError",
    "KernelPath",
    "LoraWeights",
    "MaterialisedCache",
    "SlotError",
]
