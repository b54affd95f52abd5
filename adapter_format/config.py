"""``adapter_config.json``, parsed once into typed fields that the registry and the engine share.

Every field an adapter may set is checked here, so the registry's verdict at upload and the
engine's at load are the same function's: numbers are numbers (finite, bounded), patterns are
linear-time regexes, flags we cannot serve are refused with the reason.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from adapter_format.errors import AdapterFormatError
from adapter_format.kinds import AdapterKind
from adapter_format.modules import MODULES
from adapter_format.patterns import compile_pattern, matches_suffix, matches_whole

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 64 << 10
MAX_RANK = 256  # the format's ceiling; an engine's own max_rank is usually lower
MAX_ALPHA = 1e6  # |lora_alpha|: real adapters use 1-512
MAX_PATTERN_KEYS = 512
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save (fully trained layers) are not supported",
    "fan_in_fan_out": "fan_in_fan_out is for Conv1D models; GPTBigCode uses nn.Linear",
}
_KINDS = {"LORA": AdapterKind.LORA, "IA3": AdapterKind.IA3, "FLORA": AdapterKind.FLORA}


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of ``adapter_config.json`` that decide how an adapter is applied."""

    kind: AdapterKind
    rank: int  # ``r``: the rank of modules no ``rank_pattern`` key matches (1 for IA3)
    alpha: float | None  # ``lora_alpha`` (LoRA only)
    use_rslora: bool
    base_model: str | None
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    target_modules: tuple[str, ...] | str
    feedforward_modules: tuple[str, ...] | str

    @classmethod
    def parse(cls, data: bytes) -> AdapterConfig:
        return cls.from_dict(config_json(data))

    @classmethod
    def from_dict(cls, config: object) -> AdapterConfig:
        if not isinstance(config, dict):
            raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object")
        kind = _kind(config)
        base = config.get("base_model_name_or_path")
        if base is not None and not isinstance(base, str):
            raise AdapterFormatError(f"{CONFIG_FILE}: base_model_name_or_path must be a string")
        low_rank = kind is not AdapterKind.IA3
        default_rank = 8 if kind is AdapterKind.LORA else None  # PEFT LoraConfig's default
        rank = _rank(config.get("r", default_rank), "r") if low_rank else 1
        alpha = None
        if kind is AdapterKind.LORA:
            alpha = _alpha(config.get("lora_alpha", rank), "lora_alpha")
        rslora = config.get("use_rslora", False)
        if not isinstance(rslora, bool):
            raise AdapterFormatError(f"{CONFIG_FILE}: use_rslora must be true or false")
        ranks = _table(config, "rank_pattern", _rank)
        alphas = _table(config, "alpha_pattern", _alpha)
        return cls(
            kind=kind,
            rank=rank,
            alpha=alpha,
            use_rslora=rslora,
            base_model=base or None,
            rank_pattern=ranks if low_rank else (),
            alpha_pattern=alphas if kind is AdapterKind.LORA else (),
            target_modules=_targets(config.get("target_modules")),
            feedforward_modules=_feedforward(config.get("feedforward_modules")),
        )

    def rank_of(self, module: str) -> int:
        """The rank of ``transformer.h.{i}.{target}``: PEFT's first matching ``rank_pattern``."""
        for key, rank in self.rank_pattern:
            if matches_suffix(key, module, "rank_pattern"):
                return rank
        return self.rank

    def alpha_of(self, module: str) -> float:
        """LoRA's alpha for ``module``: PEFT's first matching ``alpha_pattern``, else
        ``lora_alpha``."""
        for key, alpha in self.alpha_pattern:
            if matches_suffix(key, module, "alpha_pattern"):
                return alpha
        assert self.alpha is not None, "alpha_of is for LoRA adapters"
        return self.alpha

    def lora_scale(self, module: str, rank: int) -> float:
        """PEFT's scaling: ``alpha / r``, or ``alpha / √r`` with rsLoRA."""
        return self.alpha_of(module) / (math.sqrt(rank) if self.use_rslora else rank)

    def is_feedforward(self, module: str) -> bool:
        """PEFT's IA3 ``feedforward_modules``: a regex over the full name, or name suffixes."""
        ff = self.feedforward_modules
        if isinstance(ff, str):
            return matches_whole(ff, module, "feedforward_modules")
        return any(module.endswith(t) for t in ff)


def config_json(data: bytes) -> dict[str, Any]:
    """The raw ``adapter_config.json`` object: size, UTF-8, JSON and object checked."""
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(
            f"{CONFIG_FILE} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}"
        )
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{CONFIG_FILE} must hold a JSON object")
    return config


def _kind(config: dict[str, Any]) -> AdapterKind:
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() not in _KINDS:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: peft_type {peft_type!r} is not one of {list(_KINDS)}"[:300]
        )
    for key, message in _UNSUPPORTED.items():
        if config.get(key):
            raise AdapterFormatError(f"{CONFIG_FILE}: {message}")
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterFormatError(
            f"{CONFIG_FILE}: adapters that train biases are not supported (bias={bias!r})"[:300]
        )
    return _KINDS[peft_type.upper()]


def _rank(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RANK:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: {what} must be an integer in 1..{MAX_RANK}, got {value!r}"[:300],
            param=what,
        )
    return value


def _alpha(value: object, what: str) -> float:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or abs(value) > MAX_ALPHA:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: {what} must be a finite number within ±{MAX_ALPHA:g}, got {value!r}"[
                :300
            ],
            param=what,
        )
    return float(value)


def _table(config: dict[str, Any], field: str, value_of: Any) -> tuple[tuple[str, Any], ...]:
    """PEFT's per-module overrides: every key a valid linear-time pattern, every value typed."""
    table = config.get(field) or {}
    if not isinstance(table, dict):
        raise AdapterFormatError(f"{CONFIG_FILE}: {field} must be an object", param=field)
    if len(table) > MAX_PATTERN_KEYS:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: {field} has {len(table)} keys; the limit is {MAX_PATTERN_KEYS}",
            param=field,
        )
    out = []
    for key, value in table.items():
        compile_pattern(key, field, r"(?:.*\.)?(?:{})")
        out.append((key, value_of(value, f"{field}[{key[:80]!r}]")))
    return tuple(out)


def _targets(targets: object) -> tuple[str, ...] | str:
    """Every declared target names a GPTBigCode module (PEFT matches by suffix), or the
    whole is one regex over full module names (the tensor names are then what counts)."""
    if isinstance(targets, str):
        compile_pattern(targets, "target_modules")
        return targets
    if not isinstance(targets, list) or not targets:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: target_modules must be a non-empty list", param="target_modules"
        )
    for target in targets:
        if not isinstance(target, str) or not any(
            m == target or m.endswith("." + target) for m in MODULES
        ):
            raise AdapterFormatError(
                f"{CONFIG_FILE}: target module {str(target)[:80]!r} does not exist in "
                f"GPTBigCode; adaptable modules are {list(MODULES)}",
                param="target_modules",
            )
    return tuple(targets)


def _feedforward(value: object) -> tuple[str, ...] | str:
    if value is None:
        return ()
    if isinstance(value, str):
        compile_pattern(value, "feedforward_modules")
        return value
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise AdapterFormatError(f"{CONFIG_FILE}: feedforward_modules must be a list or a regex")
    return tuple(value)
