"""Host → device in one copy: a step's integer inputs travel together, not one copy each.

On a GPU every separate small copy is a synchronous round trip the host waits for; packing
them into one pinned buffer makes the step's inputs one asynchronous transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(tensors: Sequence[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Integer host tensors → the same values on ``device`` (int64), one copy for all of them."""
    device = torch.device(device)
    if device.type == "cpu":
        return [t.long() for t in tensors]
    flat = torch.cat([t.reshape(-1).long() for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    moved = flat.to(device, non_blocking=True)
    out, at = [], 0
    for t in tensors:
        out.append(moved[at : at + t.numel()].view(t.shape))
        at += t.numel()
    return out
