"""How far an adapter can push a layer, bounded from its factors before any tensor is loaded.

Finite is not enough: a LoRA with B = 3e38 or ``lora_alpha`` = 1e30 is finite in the file and
overflows the first activation it touches. Each kind's per-weight effect is bounded from the
largest magnitude per rank row and column, which costs ``O(r·(in + out))``, never the
``out × in`` product:

- LoRA ``|scale · (B A)[i, j]| ≤ |scale| · Σ_k max|B[:, k]| · max|A[k, :]|``
- FLoRA ``|(B A / r)[i, j]|`` by the same sum over ``r`` (the factor applied to ``W0``)
- IA3 ``max |l|``

and every stored factor's own magnitude is bounded too (a huge A balanced by a tiny B still
overflows the intermediate product). Trained adapters sit far below the default limit:
LoRA's effect is ~0.01-0.1, FLoRA's and IA3's factors stay near 1.
"""

from __future__ import annotations

from collections.abc import Sequence

from adapter_format.errors import AdapterFormatError
from adapter_format.kinds import AdapterKind

DEFAULT_MAX_MAGNITUDE = 1000.0


def effect_bound(
    kind: AdapterKind, a_rows: Sequence[float], b_cols: Sequence[float], scale: float = 1.0
) -> float:
    """The bound above. ``a_rows[k] = max|A[k, :]|``, ``b_cols[k] = max|B[:, k]|``; for IA3
    ``a_rows`` holds ``max|l|`` and ``b_cols`` is empty."""
    if kind is AdapterKind.IA3:
        return max(a_rows, default=0.0)
    total = sum(a * b for a, b in zip(a_rows, b_cols, strict=True))
    if kind is AdapterKind.FLORA:
        return total / max(len(a_rows), 1)
    return abs(scale) * total


def check_magnitude(
    module: str,
    kind: AdapterKind,
    a_rows: Sequence[float],
    b_cols: Sequence[float],
    limit: float,
    scale: float = 1.0,
) -> None:
    """Refuse a module whose factors or effect exceed ``limit`` (the engine's
    ``max_adapter_magnitude``), saying which bound and by how much."""
    largest = max([*a_rows, *b_cols], default=0.0)
    effect = effect_bound(kind, a_rows, b_cols, scale)
    what = {
        AdapterKind.LORA: "|scale · B A| (lora_alpha / r times the product)",
        AdapterKind.FLORA: "the factor B A / r applied to the base weight",
        AdapterKind.IA3: "the scaling vector",
    }[kind]
    if largest > limit:
        found, what = largest, "a stored factor's magnitude"
    elif effect > limit:
        found = effect
    else:
        return
    raise AdapterFormatError(
        f"{module}: {what} can reach {found:.3g}, over this server's limit of {limit:g} "
        "(max_adapter_magnitude); trained adapters stay far below it, so these weights would "
        "overflow the model's activations",
        param="weights",
    )
