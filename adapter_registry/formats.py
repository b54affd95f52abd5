"""Validate an adapter's two files (PEFT LoRA / IA3, FLoRA) before the registry stores them.

Everything is decided from the bytes: the config's fields, the safetensors structure, each
tensor's name, dtype and shape against the declared base model and rank, and finiteness.
An adapter that passes loads in the engine; one that fails says exactly what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from adapter_registry.base_models import MODULES, BaseModelCatalog, BaseModelSpec
from adapter_registry.errors import AdapterTooLarge, InvalidAdapter
from adapter_registry.records import AdapterKind
from adapter_registry.tensors import TensorInfo, read_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 64 << 10
MAX_RANK = 256
_KEY = re.compile(
    r"base_model\.model\.transformer\.h\.(?P<layer>\d{1,4})\.(?P<module>"
    + "|".join(re.escape(m) for m in MODULES)
    + r")\.(?P<param>lora_[AB]\.weight|flora_[AB]\.weight|ia3_l)"
)
_PARAMS = {
    AdapterKind.LORA: ("lora_A.weight", "lora_B.weight"),
    AdapterKind.FLORA: ("flora_A.weight", "flora_B.weight"),
    AdapterKind.IA3: ("ia3_l",),
}
_QUANTIFIED_GROUP = re.compile(r"\)[*+{]")
_UNBOUNDED = re.compile(r"[*+]|\{\d*,\}")
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save (fully trained layers) are not supported",
    "fan_in_fan_out": "fan_in_fan_out is for Conv1D models; GPTBigCode uses nn.Linear",
}


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
    config = parse_config(config_bytes)
    kind = _kind(config)
    model_name = base_model or config.get("base_model_name_or_path") or ""
    if not isinstance(model_name, str) or not model_name:
        raise InvalidAdapter(
            "no base model: set base_model_name_or_path in adapter_config.json or pass base_model",
            param="base_model",
        )
    spec = catalog.get(model_name)
    _check_declared_targets(config.get("target_modules"))
    rank = _positive_int(config.get("r", 1 if kind is AdapterKind.IA3 else None), "r")
    _patterns(config, "alpha_pattern")  # checked here; the engine applies it
    tensors = read_safetensors(weights, WEIGHTS_FILE)
    modules = _check_tensors(kind, config, rank, tensors, spec)
    alpha = None
    if kind is AdapterKind.LORA:
        alpha = _number(config.get("lora_alpha", rank), "lora_alpha")
    return AdapterInfo(
        kind=kind,
        rank=max(modules.values()),
        alpha=alpha,
        base_model=model_name,
        target_modules=sorted({"c_attn" if m == "attn.c_attn" else m for m in modules}),
        sha256=hashlib.sha256(weights).hexdigest(),
        size=len(weights),
    )


def parse_config(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterTooLarge(
            f"{CONFIG_FILE} is {len(data)} bytes; the limit is {MAX_CONFIG_BYTES}"
        )
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    return config


def _kind(config: dict[str, Any]) -> AdapterKind:
    peft_type = config.get("peft_type")
    kinds = {"LORA": AdapterKind.LORA, "IA3": AdapterKind.IA3, "FLORA": AdapterKind.FLORA}
    if not isinstance(peft_type, str) or peft_type.upper() not in kinds:
        raise InvalidAdapter(f"{CONFIG_FILE}: peft_type {peft_type!r} is not one of {list(kinds)}")
    for key, message in _UNSUPPORTED.items():
        if config.get(key):
            raise InvalidAdapter(f"{CONFIG_FILE}: {message}")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"{CONFIG_FILE}: adapters that train biases are not supported")
    return kinds[peft_type.upper()]


def _check_declared_targets(targets: object) -> None:
    """Every declared target must name a module GPTBigCode has (PEFT matches by suffix)."""
    if isinstance(targets, str):
        return  # a regex over full module names: the tensor names are checked instead
    if not isinstance(targets, list) or not targets:
        raise InvalidAdapter(f"{CONFIG_FILE}: target_modules must be a non-empty list")
    for target in targets:
        if not isinstance(target, str) or not any(
            m == target or m.endswith("." + target) for m in MODULES
        ):
            raise InvalidAdapter(
                f"{CONFIG_FILE}: target module {target!r} does not exist in GPTBigCode; "
                f"adaptable modules are {list(MODULES)}",
                param="target_modules",
            )


def _check_tensors(
    kind: AdapterKind,
    config: dict[str, Any],
    rank: int,
    tensors: list[TensorInfo],
    spec: BaseModelSpec,
) -> dict[str, int]:
    """Shapes per module; returns each module path's rank."""
    found: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    for t in tensors:
        match = _KEY.fullmatch(t.name)
        if match is None or match["param"] not in _PARAMS[kind]:
            raise InvalidAdapter(f"unexpected tensor {t.name!r} in a {kind} adapter")
        layer = int(match["layer"])
        if layer >= spec.n_layer:
            raise InvalidAdapter(f"{t.name}: {spec.name} has only {spec.n_layer} layers")
        found.setdefault((layer, match["module"]), {})[match["param"]] = t.shape
    if not found:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no {kind} weights")
    ranks: dict[str, int] = {}
    for (layer, module), params in sorted(found.items()):
        missing = [p for p in _PARAMS[kind] if p not in params]
        where = f"transformer.h.{layer}.{module}"
        if missing:
            raise InvalidAdapter(f"{where}: {missing[0]} is missing")
        n_in, n_out = spec.module_shape(module)
        expected_rank = _module_rank(config, where, rank)
        if kind is AdapterKind.IA3:
            # PEFT scales a feed-forward module's input, any other module's output
            if _is_feedforward(config, where):
                ok, want = params["ia3_l"] in ((1, n_in), (n_in,)), f"(1, {n_in}) (feed-forward)"
            else:
                ok, want = params["ia3_l"] in ((n_out, 1), (n_out,)), f"({n_out}, 1)"
            got = params["ia3_l"]
        else:
            a, b = _PARAMS[kind]
            got = (params[a], params[b])
            want = f"{a} ({expected_rank}, {n_in}) and {b} ({n_out}, {expected_rank})"
            ok = got == ((expected_rank, n_in), (n_out, expected_rank))
        if not ok:
            hint = f" (r={expected_rank} in {CONFIG_FILE})"
            if kind is AdapterKind.IA3:
                hint = f" (feedforward_modules in {CONFIG_FILE})"
            raise InvalidAdapter(
                f"{where} of {spec.name}: expected {want}{hint}, got {got}", param="weights"
            )
        ranks[module] = max(ranks.get(module, 0), expected_rank)
    return ranks


def _module_rank(config: dict[str, Any], module: str, default: int) -> int:
    """PEFT's ``rank_pattern``: the first key matching a dotted suffix of the module name."""
    for key, value in _patterns(config, "rank_pattern").items():
        if key.fullmatch(module):
            return _positive_int(value, f"rank_pattern[{key.pattern!r}]")
    return default


def _is_feedforward(config: dict[str, Any], module: str) -> bool:
    """PEFT's IA3 ``feedforward_modules``: a regex over the full module name, or suffixes."""
    targets = config.get("feedforward_modules") or []
    if isinstance(targets, str):
        return _safe_regex(targets, "feedforward_modules").fullmatch(module) is not None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter(f"{CONFIG_FILE}: feedforward_modules must be a list or a regex")
    return any(module.endswith(t) for t in targets)


def _patterns(config: dict[str, Any], field: str) -> dict[re.Pattern[str], Any]:
    """PEFT's per-module override keys as compiled regexes (see ``_safe_regex``)."""
    table = config.get(field) or {}
    if not isinstance(table, dict):
        raise InvalidAdapter(f"{CONFIG_FILE}: {field} must be an object")
    return {_safe_regex(rf"(.*\.)?({key})", field, key): value for key, value in table.items()}


def _safe_regex(pattern: str, field: str, shown: str | None = None) -> re.Pattern[str]:
    """``pattern`` compiled, refusing ones that could backtrack for minutes (the engine
    evaluates them too): long keys, quantified groups, or more than two unbounded repeats."""
    shown = pattern if shown is None else shown
    risky = (
        len(shown) > 200 or _QUANTIFIED_GROUP.search(shown) or len(_UNBOUNDED.findall(shown)) > 2
    )
    try:
        if risky:
            raise re.error("too complex to evaluate safely")
        return re.compile(pattern)
    except re.error as e:
        raise InvalidAdapter(f"{CONFIG_FILE}: {field} key {shown[:80]!r}: {e}") from e


def _positive_int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RANK:
        raise InvalidAdapter(f"{CONFIG_FILE}: {what} must be an integer in 1..{MAX_RANK}")
    return value


def _number(value: object, what: str) -> float:
    finite = isinstance(value, int | float) and abs(value) <= sys.float_info.max  # no NaN, inf
    if not finite or isinstance(value, bool):
        raise InvalidAdapter(f"{CONFIG_FILE}: {what} must be a finite number")
    return float(value)
