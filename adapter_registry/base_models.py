"""Shapes of the base models adapters are checked against, without loading any model.

The registry knows a model only by the few numbers that fix an adapter's tensor shapes; they come
from the model's HF ``config.json`` (``BaseModelCatalog.add_config_dir``) or from the built-in
StarCoder family below.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, Field

from adapter_registry.errors import InvalidAdapter

# HF module paths under transformer.h.{i} that adapters may target
MODULES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class BaseModelSpec(BaseModel):
    """A GPTBigCode shape: enough to know every adaptable linear's ``(in, out)``."""

    name: str
    n_layer: int = Field(ge=1)
    n_embd: int = Field(ge=1)
    n_head: int = Field(ge=1)
    multi_query: bool = True
    n_inner: int | None = None

    @classmethod
    def from_hf_config(cls, name: str, config: dict) -> BaseModelSpec:
        if config.get("model_type") not in (None, "gpt_bigcode"):
            raise ValueError(f"{name}: model_type {config.get('model_type')!r} is not gpt_bigcode")
        keys = ("n_layer", "n_embd", "n_head", "multi_query", "n_inner")
        return cls(name=name, **{k: config[k] for k in keys if config.get(k) is not None})

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of ``attn.c_attn`` etc."""
        head_dim = self.n_embd // self.n_head
        kv = 2 * head_dim * (1 if self.multi_query else self.n_head)
        inner = self.n_inner or 4 * self.n_embd
        return {
            "attn.c_attn": (self.n_embd, self.n_embd + kv),
            "attn.c_proj": (self.n_embd, self.n_embd),
            "mlp.c_fc": (self.n_embd, inner),
            "mlp.c_proj": (inner, self.n_embd),
        }[module]


_STARCODER = {
    "bigcode/starcoderbase-1b": (24, 2048, 16),
    "bigcode/starcoderbase-3b": (36, 2816, 22),
    "bigcode/starcoderbase-7b": (42, 4096, 32),
    "bigcode/starcoderbase": (40, 6144, 48),
    "bigcode/starcoder": (40, 6144, 48),
}


class BaseModelCatalog:
    """Base models adapters may be registered for, by name."""

    def __init__(self, specs: list[BaseModelSpec] | None = None, *, builtin: bool = True):
        self._specs: dict[str, BaseModelSpec] = {}
        if builtin:
            for name, (n_layer, n_embd, n_head) in _STARCODER.items():
                self.add(BaseModelSpec(name=name, n_layer=n_layer, n_embd=n_embd, n_head=n_head))
        for spec in specs or []:
            self.add(spec)

    def add(self, spec: BaseModelSpec) -> None:
        self._specs[spec.name] = spec

    def add_config_dir(self, name: str, directory: str | Path) -> BaseModelSpec:
        """Register the model whose HF ``config.json`` is in ``directory`` under ``name``."""
        config = json.loads((Path(directory) / "config.json").read_text())
        spec = BaseModelSpec.from_hf_config(name, config)
        self.add(spec)
        return spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> BaseModelSpec:
        if name not in self._specs:
            raise InvalidAdapter(
                f"unknown base model {name!r}; this registry accepts adapters for "
                f"{', '.join(self.names()) or 'no model yet'}",
                param="base_model",
            )
        return self._specs[name]
