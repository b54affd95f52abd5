"""GPTBigCode's adaptable linears: their names in PEFT files and their shapes.

A PEFT tensor is named ``base_model.model.transformer.h.{i}.{module}.{param}``; ``module`` is
one of :data:`MODULES` and ``param`` depends on the adapter's kind.
"""

from __future__ import annotations

import re

from adapter_format.kinds import AdapterKind

# HF module paths under transformer.h.{i} that adapters may target
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
PREFIX = "base_model.model."
PARAMS: dict[AdapterKind, tuple[str, ...]] = {
    AdapterKind.LORA: ("lora_A.weight", "lora_B.weight"),
    AdapterKind.FLORA: ("flora_A.weight", "flora_B.weight"),
    AdapterKind.IA3: ("ia3_l",),
}
# a fixed grammar of our own (no tenant input): Python's re is linear on it
TENSOR_KEY = re.compile(
    r"base_model\.model\.(?P<module>transformer\.h\.(?P<layer>\d{1,4})\.(?P<target>"
    + "|".join(re.escape(m) for m in MODULES)
    + r"))\.(?P<param>lora_[AB]\.weight|flora_[AB]\.weight|ia3_l)"
)


def short_target(target: str) -> str:
    """``attn.c_attn`` is called ``c_attn`` in engine settings and records (PEFT's suffix)."""
    return "c_attn" if target == "attn.c_attn" else target
