"""Shapes of the base models adapters are checked against, without loading any model.

The registry knows a model only by the few numbers that fix an adapter's tensor shapes; they come
from the model's HF ``config.json`` (``BaseModelCatalog.add_config_dir``) or from the built-in
StarCoder family below.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from pydantic import BaseModel, Field

from adapter_format import STARCODER, ModelShape, ServingLimits
from adapter_registry.errors import InvalidAdapter


class BaseModelSpec(BaseModel):
    """A GPTBigCode shape (enough to know every adaptable linear's ``(in, out)``) and what the
    engines serving it accept: the registry refuses at upload what they would refuse at load."""

    name: str
    n_layer: int = Field(ge=1)
    n_embd: int = Field(ge=1)
    n_head: int = Field(ge=1)
    multi_query: bool = True
    n_inner: int | None = None
    limits: ServingLimits = Field(default_factory=ServingLimits)

    @classmethod
    def from_hf_config(
        cls, name: str, config: dict, limits: ServingLimits | None = None
    ) -> BaseModelSpec:
        if config.get("model_type") not in (None, "gpt_bigcode"):
            raise ValueError(f"{name}: model_type {config.get('model_type')!r} is not gpt_bigcode")
        keys = ("n_layer", "n_embd", "n_head", "multi_query", "n_inner")
        fields = {k: config[k] for k in keys if config.get(k) is not None}
        return cls(name=name, limits=limits or ServingLimits(), **fields)

    @property
    def shape(self) -> ModelShape:
        return ModelShape(
            self.name, self.n_layer, self.n_embd, self.n_head, self.multi_query, self.n_inner
        )

    def module_shape(self, module: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of ``attn.c_attn`` etc."""
        return self.shape.module_shape(module)


class BaseModelCatalog:
    """Base models adapters may be registered for, by name."""

    def __init__(self, specs: list[BaseModelSpec] | None = None, *, builtin: bool = True):
        self._specs: dict[str, BaseModelSpec] = {}
        if builtin:
            for shape in STARCODER.values():
                self.add(BaseModelSpec.model_validate(asdict(shape)))
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
