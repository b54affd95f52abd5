"""Linear layers on oneDNN-prepacked weights, for bf16 and fp16 on CPU.

A plain ``F.linear`` re-lays its weight out for the CPU's matrix units (AMX, AVX-512) on every
call; at serving batch sizes that reorder costs as much as the product itself. Packing once at
engine start makes the base model's GEMMs 1.2–2× faster on this machine's cores (bf16;
``scripts/prepacked_linear.py``). fp32 gains little and is left alone. The dense weight stays
too (adapters, exports and the segmented paths read it), so packing costs one more copy of
every packed linear's weight.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn

PACKED_DTYPES = (torch.bfloat16, torch.float16)
# Rows the layout is tuned for (a decode step's batch); any row count runs.
ROWS_HINT = 64


def prepacking_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in PACKED_DTYPES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


# layer → (its weight's version when packed, the packed weight). Outside the module: an opaque
# oneDNN tensor cannot be deep-copied, and a copy of the model packs its own on first use.
_PACKED: weakref.WeakKeyDictionary[nn.Linear, tuple[int, torch.Tensor]] = (
    weakref.WeakKeyDictionary()
)


def _packed(layer: nn.Linear) -> torch.Tensor:
    """The layer's packed weight, packed again if the weight changed in place since (inference
    tensors, made under ``torch.inference_mode``, keep no version: nothing trains them)."""
    weight = layer.weight
    version = 0 if weight.is_inference() else weight._version
    entry = _PACKED.get(layer)
    if entry is None or entry[0] != version:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ROWS_HINT)
        entry = _PACKED[layer] = (version, packed)
    return entry[1]


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _packed(self), self.bias, "none", [], "")


@torch.no_grad()
def prepack_linears(model: nn.Module, enabled: bool = True) -> int:
    """Pack (or, with ``enabled`` False, unpack) the model's linear layers where the device and
    dtype support it; returns how many run on packed weights (re-packed by themselves after an
    in-place change to their weight)."""
    # plain linears, and adapted layers' bases (submodules, run as modules in adapter-free steps)
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    packed = 0
    for layer in layers:
        supported = prepacking_supported(layer.weight.device, layer.weight.dtype)
        if enabled and supported:
            _packed(layer)
            layer.forward = types.MethodType(_packed_forward, layer)
            packed += 1
        elif "forward" in layer.__dict__:
            del layer.forward
            _PACKED.pop(layer, None)
    return packed
