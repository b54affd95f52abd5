"""The adapter file format (PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``, and
FLoRA's), torch-free, shared by the registry (upload) and the engine (load): same inputs, same
verdicts. The engine adds only the conversion to tensors."""

from adapter_format.config import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    MAX_RANK,
    WEIGHTS_FILE,
    AdapterConfig,
    config_json,
)
from adapter_format.errors import AdapterFormatError
from adapter_format.kinds import AdapterKind
from adapter_format.layout import AdapterLayout, ModelShape, check_adapter
from adapter_format.limits import ALL_TARGETS, ServingLimits
from adapter_format.magnitude import DEFAULT_MAX_MAGNITUDE, check_magnitude, effect_bound
from adapter_format.models import STARCODER
from adapter_format.modules import MODULES, PARAMS, PREFIX, TENSOR_KEY, short_target
from adapter_format.patterns import MAX_PATTERN_CHARS, compile_pattern

__all__ = [
    "ALL_TARGETS",
    "CONFIG_FILE",
    "DEFAULT_MAX_MAGNITUDE",
    "MAX_CONFIG_BYTES",
    "MAX_PATTERN_CHARS",
    "MAX_RANK",
    "MODULES",
    "PARAMS",
    "PREFIX",
    "STARCODER",
    "TENSOR_KEY",
    "WEIGHTS_FILE",
    "AdapterConfig",
    "AdapterFormatError",
    "AdapterKind",
    "AdapterLayout",
    "ModelShape",
    "ServingLimits",
    "check_adapter",
    "check_magnitude",
    "compile_pattern",
    "config_json",
    "effect_bound",
    "short_target",
]
