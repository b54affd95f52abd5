"""Adapter directories in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

LoRA and IA3 are exactly what the real ``peft`` library saves; FLoRA uses ``peft_type: "FLORA"``
with ``….flora_A.weight`` ``[r, in]`` and ``….flora_B.weight`` ``[out, r]`` (design.md §3).
Reading never unpickles, and checks size, names, shapes, dtype and finiteness against the model
before any tensor reaches a device.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flora.adapters import AdapterKind, FloraWeights, IA3Weights, InvalidAdapterError, LoraWeights
from flora.adapters.weights import AdapterWeights
from flora.model.config import ModelArgs
from flora.model.errors import AdapterFileError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_ADAPTER_BYTES = 1 << 30
_PREFIX = "base_model.model."
_KEY = re.compile(
    r"^base_model\.model\.(?P<module>transformer\.h\.(?P<layer>\d+)\.(?P<target>attn\.c_attn|"
    r"attn\.c_proj|mlp\.c_fc|mlp\.c_proj))\.(?P<param>lora_A\.weight|lora_B\.weight|"
    r"flora_A\.weight|flora_B\.weight|ia3_l)$"
)
_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PARAMS = {
    AdapterKind.LORA: ("lora_A.weight", "lora_B.weight"),
    AdapterKind.FLORA: ("flora_A.weight", "flora_B.weight"),
    AdapterKind.IA3: ("ia3_l",),
}


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


def _short_target(target: str) -> str:
    return "c_attn" if target == "attn.c_attn" else target


def _module_shape(args: ModelArgs, target: str) -> tuple[int, int]:
    """``(in, out)`` of a target linear."""
    kv = 2 * args.kv_heads * args.head_dim
    return {
        "attn.c_attn": (args.n_embd, args.n_embd + kv),
        "attn.c_proj": (args.n_embd, args.n_embd),
        "mlp.c_fc": (args.n_embd, args.inner),
        "mlp.c_proj": (args.inner, args.n_embd),
    }[target]


def _kind(config: dict[str, Any]) -> AdapterKind:
    peft_type = str(config.get("peft_type", "")).upper()
    kinds = {"LORA": AdapterKind.LORA, "IA3": AdapterKind.IA3, "FLORA": AdapterKind.FLORA}
    if peft_type not in kinds:
        raise AdapterFileError(f"peft_type {peft_type or None!r} is not one of {sorted(kinds)}")
    if config.get("use_dora"):
        raise AdapterFileError("DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterFileError(
            f"adapters that train biases are not supported (bias={config['bias']!r})"
        )
    if config.get("modules_to_save"):
        raise AdapterFileError("modules_to_save (full trained layers) are not supported")
    if config.get("fan_in_fan_out"):
        raise AdapterFileError("fan_in_fan_out is for Conv1D models; GPTBigCode uses nn.Linear")
    return kinds[peft_type]


def read_config(directory: str | Path) -> dict[str, Any]:
    file = Path(directory) / CONFIG_FILE
    if not file.is_file():
        raise AdapterFileError(f"{file} not found")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file} must hold a JSON object")
    return config


def load_adapter_dir(
    directory: str | Path,
    args: ModelArgs,
    *,
    max_bytes: int = MAX_ADAPTER_BYTES,
    dtype: torch.dtype = torch.float32,
) -> AdapterFile:
    """Read and validate an adapter directory for a model of shape ``args``."""
    directory = Path(directory)
    config = read_config(directory)
    kind = _kind(config)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [p.name for p in directory.glob("*.bin")]
        hint = f" (found pickled {pickled}: refused, never unpickled)" if pickled else ""
        raise AdapterFileError(f"{weights} not found{hint}")
    size = weights.stat().st_size
    if size > max_bytes:
        raise AdapterFileError(f"{weights.name} is {size} bytes, over the limit of {max_bytes}")
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    raw = _read_tensors(weights, args)
    layers = _assemble(kind, config, raw, args, dtype)
    if not layers:
        raise AdapterFileError(f"{weights.name} holds no {kind} weights for this model")
    targets = tuple(sorted({_short_target(m.split(".", 3)[3]) for m in layers}))
    rank = max(w.rank for w in layers.values())
    return AdapterFile(kind, rank, targets, layers, config, digest)


def _read_tensors(file: Path, args: ModelArgs) -> dict[tuple[str, str], torch.Tensor]:
    out: dict[tuple[str, str], torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            names = list(f.keys())
            for name in names:
                match = _KEY.match(name)
                if not match:
                    raise AdapterFileError(f"unexpected tensor {name!r} in {file.name}")
                if int(match["layer"]) >= args.n_layer:
                    raise AdapterFileError(f"{name}: the model has only {args.n_layer} layers")
                tensor = f.get_tensor(name)
                if tensor.dtype not in _FLOAT:
                    raise AdapterFileError(
                        f"{name} has dtype {tensor.dtype}, expected a float type"
                    )
                out[(match["module"], match["param"])] = tensor
    except AdapterFileError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise AdapterFileError(f"{file.name} is not a valid safetensors file: {e}") from e
    return out


def _assemble(
    kind: AdapterKind,
    config: dict[str, Any],
    raw: dict[tuple[str, str], torch.Tensor],
    args: ModelArgs,
    dtype: torch.dtype,
) -> dict[str, AdapterWeights]:
    layers: dict[str, AdapterWeights] = {}
    modules = sorted({m for m, _ in raw})
    foreign = sorted(f"{m}.{p}" for m, p in raw if p not in _PARAMS[kind])
    if foreign:
        raise AdapterFileError(f"a {kind} adapter cannot hold {foreign[:3]}")
    feedforward = config.get("feedforward_modules") or []
    for module in modules:
        target = module.split(".", 3)[3]
        n_in, n_out = _module_shape(args, target)

        def get(param: str, module: str = module) -> torch.Tensor:
            if (module, param) not in raw:
                raise AdapterFileError(f"{module}: {param} is missing")
            return raw[(module, param)].to(dtype)

        if kind is AdapterKind.LORA:
            r = _pattern(config, "rank_pattern", module, _number(config, "r", 8, int))
            alpha = _pattern(
                config, "alpha_pattern", module, _number(config, "lora_alpha", r, float)
            )
            w: AdapterWeights = LoraWeights(
                get("lora_A.weight"), get("lora_B.weight"), alpha, bool(config.get("use_rslora"))
            )
        elif kind is AdapterKind.FLORA:
            w = FloraWeights(get("flora_A.weight"), get("flora_B.weight"))
        else:
            if isinstance(feedforward, str):  # PEFT: a string is a regex for the full name
                ff = _regex(feedforward, "feedforward_modules").fullmatch(module) is not None
            else:
                ff = any(module.endswith(t) for t in feedforward)
            w = IA3Weights(get("ia3_l").flatten(), feedforward=ff)
        try:
            w.validate(n_in, n_out)
        except InvalidAdapterError as e:
            raise AdapterFileError(f"{module}: {e}") from e
        layers[module] = w
    return layers


def _pattern(config: dict[str, Any], key: str, module: str, default: Any) -> Any:
    """PEFT's per-module overrides (``rank_pattern``/``alpha_pattern``): the first key that
    matches as a regex for a dotted suffix of the module name (PEFT's ``get_pattern_key``)."""
    for pattern, value in (config.get(key) or {}).items():
        if _regex(rf"(.*\.)?({pattern})$", key).match(module):
            return _number({key: value}, key, default, type(default))
    return default


def _regex(pattern: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise AdapterFileError(f"{key}: invalid pattern {pattern!r}: {e}") from e


def _number(config: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    try:
        return kind(config.get(key, default))
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"{key} must be a number, got {config.get(key)!r}") from e


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
        prefix = _PREFIX + module
        if isinstance(w, IA3Weights):
            shape = (1, -1) if w.feedforward else (-1, 1)
            tensors[f"{prefix}.ia3_l"] = w.scale.reshape(shape)
        else:
            tag = "lora" if isinstance(w, LoraWeights) else "flora"
            tensors[f"{prefix}.{tag}_A.weight"] = w.A
            tensors[f"{prefix}.{tag}_B.weight"] = w.B
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    rank = max(w.rank for w in layers.values())
    targets = sorted({_short_target(m.split(".", 3)[3]) for m in layers})
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
