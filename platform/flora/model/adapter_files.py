"""Adapter directories in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA and IA3 are exactly what the real ``peft`` library saves; FLoRA uses ``peft_type: "FLORA"``
with ``….flora_A.weight`` ``[r, in]`` and ``….flora_B.weight`` ``[out, r]`` (docs/architecture.md,
"The adapter file format").
Reading never unpickles, and checks size, names, shapes, dtype and finiteness against the model
before any tensor reaches a device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_format import (
    CONFIG_FILE,
    PREFIX,
    WEIGHTS_FILE,
    AdapterConfig,
    AdapterFormatError,
    AdapterLayout,
    ServingLimits,
    check_adapter,
    config_json,
    short_target,
)
from flora.adapters import AdapterKind, FloraWeights, IA3Weights, InvalidAdapterError, LoraWeights
from flora.adapters.weights import AdapterWeights
from flora.model.config import ModelArgs
from flora.model.errors import AdapterFileError

MAX_ADAPTER_BYTES = 1 << 30
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class AdapterFile:
    """One adapter read from disk: kind, rank and the weights per HF module path."""

    kind: AdapterKind
    rank: int
    targets: tuple[str, ...]  # short target names, e.g. ("c_attn",)
    layers: dict[str, AdapterWeights]  # "transformer.h.0.attn.c_attn" → weights
    config: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def nbytes(self) -> int:
        total = 0
        for w in self.layers.values():
            tensors = [w.scale] if isinstance(w, IA3Weights) else [w.A, w.B]
            total += sum(t.nbytes for t in tensors)
        return total


def read_config(directory: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, with the format's size and JSON checks."""
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise AdapterFileError(f"{file} not found")
    try:
        return config_json(file.read_bytes())
    except AdapterFormatError as e:
        raise AdapterFileError(e.message) from None


def load_adapter_dir(
    directory: str | Path,
    args: ModelArgs,
    *,
    max_bytes: int = MAX_ADAPTER_BYTES,
    dtype: torch.dtype = torch.float32,
    limits: ServingLimits | None = None,
) -> AdapterFile:
    """Read and validate an adapter directory for a model of shape ``args``: the registry's
    checks (:func:`adapter_format.check_adapter`) against this engine's ``limits``."""
    directory = Path(directory)
    raw_config = read_config(directory)
    try:
        config = AdapterConfig.from_dict(raw_config)
    except AdapterFormatError as e:
        raise AdapterFileError(e.message) from None
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [p.name for p in directory.glob("*.bin")]
        hint = f" (found pickled {pickled}: refused, never unpickled)" if pickled else ""
        raise AdapterFileError(f"{weights} not found{hint}")
    size = weights.stat().st_size
    if size > max_bytes:
        raise AdapterFileError(f"{weights.name} is {size} bytes, over the limit of {max_bytes}")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    tensors = _read_tensors(weights)

    def abs_max(name: str, axis: int | None) -> list[float]:
        values = tensors[name].detach().abs().double()
        if not values.numel():
            return [0.0]
        return (values.amax() if axis is None else values.amax(dim=axis)).reshape(-1).tolist()

    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    try:
        layout = check_adapter(config, shapes, abs_max, args.shape, limits or ServingLimits())
    except AdapterFormatError as e:
        raise AdapterFileError(e.message) from None
    layers = _assemble(config, layout, tensors, args, dtype)
    return AdapterFile(config.kind, layout.rank, tuple(layout.targets), layers, raw_config, digest)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                tensor = f.get_tensor(name)
                if tensor.dtype not in _FLOAT:
                    raise AdapterFileError(
                        f"{name} has dtype {tensor.dtype}, expected a float type"
                    )
                if not bool(torch.isfinite(tensor).all()):
                    raise AdapterFileError(f"{name} holds NaN or infinite values")
                out[name] = tensor
    except AdapterFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AdapterFileError(f"{file.name} is not a valid safetensors file: {e}") from e
    return out


def _assemble(
    config: AdapterConfig,
    layout: AdapterLayout,
    tensors: dict[str, torch.Tensor],
    args: ModelArgs,
    dtype: torch.dtype,
) -> dict[str, AdapterWeights]:
    """The checked tensors as per-module weights in ``dtype``."""
    layers: dict[str, AdapterWeights] = {}
    shape = args.shape
    for module, params in layout.tensors.items():
        n_in, n_out = shape.module_shape(module.split(".", 3)[3])

        def get(param: str, params: dict[str, str] = params) -> torch.Tensor:
            return tensors[params[param]].to(dtype)

        if config.kind is AdapterKind.LORA:
            w: AdapterWeights = LoraWeights(
                get("lora_A.weight"),
                get("lora_B.weight"),
                config.alpha_of(module),
                config.use_rslora,
            )
        elif config.kind is AdapterKind.FLORA:
            w = FloraWeights(get("flora_A.weight"), get("flora_B.weight"))
        else:
            w = IA3Weights(get("ia3_l").flatten(), feedforward=config.is_feedforward(module))
        try:
            w.validate(n_in, n_out)
        except InvalidAdapterError as e:  # finite in the file, not in ``dtype``
            raise AdapterFileError(f"{module}: {e}") from e
        layers[module] = w
    return layers


def save_adapter_dir(
    directory: str | Path,
    kind: AdapterKind,
    layers: dict[str, AdapterWeights],
    *,
    base_model: str = "",
    extra_config: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter in the format :func:`load_adapter_dir` (and PEFT, for LoRA/IA3) reads."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for module, w in layers.items():
        prefix = PREFIX + module
        if isinstance(w, IA3Weights):
            shape = (1, -1) if w.feedforward else (-1, 1)
            tensors[f"{prefix}.ia3_l"] = w.scale.reshape(shape)
        else:
            tag = "lora" if isinstance(w, LoraWeights) else "flora"
            tensors[f"{prefix}.{tag}_A.weight"] = w.A
            tensors[f"{prefix}.{tag}_B.weight"] = w.B
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    rank = max(w.rank for w in layers.values())
    targets = sorted({short_target(m.split(".", 3)[3]) for m in layers})
    config: dict[str, Any] = {
        "peft_type": kind.value.upper(),
        "base_model_name_or_path": base_model,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
    }
    if kind is AdapterKind.FLORA:
        config |= {"r": rank, "reduction": "mean"}
    elif kind is AdapterKind.LORA:
        first = next(iter(layers.values()))
        assert isinstance(first, LoraWeights)
        if len({w.use_rslora for w in layers.values()}) > 1:  # type: ignore[union-attr]
            raise ValueError("a LoRA adapter's layers must agree on use_rslora")
        config |= {"r": rank, "lora_alpha": first.alpha, "use_rslora": first.use_rslora}
        # PEFT's per-module overrides, keyed by the full module name (a literal match)
        config["rank_pattern"] = {m: w.rank for m, w in layers.items() if w.rank != rank}
        config["alpha_pattern"] = {
            m: w.alpha  # type: ignore[union-attr]
            for m, w in layers.items()
            if w.alpha != first.alpha  # type: ignore[union-attr]
        }
        config |= {"bias": "none", "fan_in_fan_out": False}
    else:
        ff = sorted({m.split(".", 3)[3] for m, w in layers.items() if w.feedforward})  # type: ignore[union-attr]
        config |= {"feedforward_modules": ff}
    config |= extra_config or {}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out
