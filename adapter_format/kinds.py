"""The adapter kinds, one definition for the registry, the engine and the files."""

from __future__ import annotations

import enum


class AdapterKind(enum.StrEnum):
    """How an adapter changes a linear layer."""

    FLORA = "flora"
    LORA = "lora"
    IA3 = "ia3"
