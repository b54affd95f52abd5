"""Validate an adapter's two files (PEFT LoRA / IA3, FLoRA) before the registry stores them.

Everything is decided from the bytes with :mod:`adapter_format`, the same checks the engine
runs when it loads an adapter: the config's fields, the safetensors structure, each tensor's
name, dtype and shape against the declared base model and rank, finiteness, the magnitude
bound, and the limits of the engines serving that model. An adapter that passes loads in the
engine; one that fails says exactly what is wrong.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from adapter_format import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    AdapterConfig,
    AdapterFormatError,
    AdapterKind,
    check_adapter,
)
from adapter_registry.base_models import BaseModelCatalog
from adapter_registry.errors import AdapterTooLarge, InvalidAdapter
from adapter_registry.tensors import read_safetensors

__all__ = ["CONFIG_FILE", "MAX_CONFIG_BYTES", "WEIGHTS_FILE", "AdapterInfo", "validate_adapter"]


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned: the facts a record needs."""

    kind: AdapterKind
    rank: int
    alpha: float | None
    base_model: str
    target_modules: list[str]
    sha256: str
    size: int


@contextmanager
def _as_invalid() -> Iterator[None]:
    """The format's verdicts answered as the registry's 422."""
    try:
        yield
    except AdapterFormatError as e:
        raise InvalidAdapter(e.message, param=e.param) from None


def validate_adapter(
    config_bytes: bytes,
    weights: bytes,
    catalog: BaseModelCatalog,
    *,
    base_model: str | None = None,
    max_bytes: int,
) -> AdapterInfo:
    """Check an adapter's files. ``base_model`` overrides ``base_model_name_or_path``."""
    if len(weights) > max_bytes:
        raise AdapterTooLarge(f"{WEIGHTS_FILE} is {len(weights)} bytes; the limit is {max_bytes}")
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise AdapterTooLarge(
            f"{CONFIG_FILE} is {len(config_bytes)} bytes; the limit is {MAX_CONFIG_BYTES}"
        )
    with _as_invalid():
        config = AdapterConfig.parse(config_bytes)
    model_name = base_model or config.base_model
    if not model_name:
        raise InvalidAdapter(
            "no base model: set base_model_name_or_path in adapter_config.json or pass base_model",
            param="base_model",
        )
    spec = catalog.get(model_name)
    tensors = {t.name: t for t in read_safetensors(weights, WEIGHTS_FILE)}

    def abs_max(name: str, axis: int | None) -> list[float]:
        values = np.abs(tensors[name].values)
        if not values.size:
            return [0.0]
        return np.atleast_1d(values.max(axis=axis)).astype(float).tolist()

    shapes = {name: t.shape for name, t in tensors.items()}
    with _as_invalid():
        layout = check_adapter(config, shapes, abs_max, spec.shape, spec.limits)
    return AdapterInfo(
        kind=config.kind,
        rank=layout.rank,
        alpha=config.alpha,
        base_model=model_name,
        target_modules=layout.targets,
        sha256=hashlib.sha256(weights).hexdigest(),
        size=len(weights),
    )
