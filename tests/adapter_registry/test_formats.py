"""Adapter validation from the bytes alone, torch-free: every malformed, hostile or mismatched
file is refused with a typed error that names the problem; real PEFT / FLoRA layouts pass."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import struct
from collections.abc import Callable

import numpy as np
import pytest
from safetensors.numpy import save

from adapter_registry import BaseModelCatalog
from adapter_registry.errors import AdapterTooLarge, InvalidAdapter, RegistryError
from adapter_registry.formats import MAX_CONFIG_BYTES, AdapterInfo, validate_adapter
from adapter_registry.tensors import MAX_HEADER_BYTES, TensorInfo, read_safetensors
from tests.adapter_registry.conftest import (
    MAX_BYTES,
    PREFIX,
    SPEC,
    adapter_config,
    adapter_tensors,
    module_shape,
    raw_safetensors,
)

CATALOG = BaseModelCatalog([SPEC])
C_ATTN = f"{PREFIX}.0.attn.c_attn"
N_IN, N_OUT = module_shape("attn.c_attn")  # (64, 96)
FC_IN, FC_OUT = module_shape("mlp.c_fc")  # (64, 128)


def validate(config: dict | bytes, weights: dict[str, np.ndarray] | bytes, **kwargs) -> AdapterInfo:
    config_bytes = config if isinstance(config, bytes) else json.dumps(config).encode()
    weight_bytes = weights if isinstance(weights, bytes) else save(weights)
    kwargs.setdefault("max_bytes", MAX_BYTES)
    return validate_adapter(config_bytes, weight_bytes, CATALOG, **kwargs)


def raw(tensors: dict[str, tuple[str, list[int], bytes]]) -> bytes:
    """Safetensors bytes laid out back to back from ``name → (dtype, shape, data)``."""
    header, data = {}, b""
    for name, (dtype, shape, chunk) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(chunk)],
        }
        data += chunk
    return raw_safetensors(header, data)


def bf16(values: np.ndarray) -> bytes:
    """Truncate float32 to bfloat16 bytes (numpy has no bfloat16)."""
    return (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()


def flora_raw(dtype: str, encode: Callable[[np.ndarray], bytes]) -> bytes:
    """A valid rank-2 FLoRA adapter on c_attn of both layers, in a hand-written dtype."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(SPEC.n_layer):
        for param, shape in (("flora_A", [2, N_IN]), ("flora_B", [N_OUT, 2])):
            data = encode(rng.standard_normal(shape))
            tensors[f"{PREFIX}.{layer}.attn.c_attn.{param}.weight"] = (dtype, shape, data)
    return raw(tensors)


def with_value(dtype: str, bits: int) -> bytes:
    """A FLoRA adapter whose first flora_A element is the raw 16/32-bit pattern ``bits``."""
    width = {"F32": "<u4", "F16": "<u2", "BF16": "<u2"}[dtype]
    if dtype == "F32":
        weights = flora_raw("F32", lambda a: a.astype("<f4").tobytes())
    elif dtype == "F16":
        weights = flora_raw("F16", lambda a: a.astype("<f2").tobytes())
    else:
        weights = flora_raw("BF16", bf16)
    start = 8 + struct.unpack("<Q", weights[:8])[0]
    size = np.dtype(width).itemsize
    return weights[:start] + np.array([bits], dtype=width).tobytes() + weights[start + size :]


def tensors_without(kind: str, rank: int, *names: str, **kwargs) -> dict[str, np.ndarray]:
    tensors = adapter_tensors(kind, rank, **kwargs)
    for name in names:
        del tensors[name]
    return tensors


def valid_weights() -> bytes:
    return save(adapter_tensors("flora", 2))


def expect(error: type[RegistryError], status: int, match: str, config, weights, **kwargs):
    with pytest.raises(error, match=match) as caught:
        validate(config, weights, **kwargs)
    assert type(caught.value) is error and caught.value.status == status
    assert caught.value.to_json()["error"]["message"] == caught.value.message
    return caught.value


# --- the safetensors structure -------------------------------------------------------------------
def _overlap() -> bytes:
    chunk = np.ones(4, "<f4").tobytes()
    header = {
        f"{C_ATTN}.flora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        f"{C_ATTN}.flora_B.weight": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
    }
    return raw_safetensors(header, chunk + chunk[:8])


def _gap() -> bytes:
    chunk = np.ones(4, "<f4").tobytes()
    header = {
        f"{C_ATTN}.flora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        f"{C_ATTN}.flora_B.weight": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
    }
    return raw_safetensors(header, chunk + b"\0" * 8 + chunk)


def _wrong_span() -> bytes:
    header = {f"{C_ATTN}.flora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}
    return raw_safetensors(header, b"\0" * 12)


def _nested(depth: int) -> bytes:
    text = b"[" * depth + b"]" * depth
    return struct.pack("<Q", len(text)) + text


STRUCTURE = {
    "pickle": (
        pickle.dumps({"lora_A": [1.0] * 64, "lora_B": [0.5] * 64}),
        "not a valid safetensors",
    ),
    "empty": (b"", r"only 0 bytes"),
    "seven bytes": (b"\x10\0\0\0\0\0\0", r"only 7 bytes"),
    "zip": (b"PK\x03\x04" + b"\0" * 60, r"header of \d+ bytes"),
    "header longer than file": (
        struct.pack("<Q", 1000) + b"{}",
        r"header of 1000 bytes \(file 10 bytes",
    ),
    "10 GB header": (struct.pack("<Q", 10 * 10**9) + b"{}", r"header of 10000000000 bytes"),
    "header over 1 MiB": (
        raw_safetensors({"__metadata__": {"pad": "x" * MAX_HEADER_BYTES}}, b""),
        rf"limit {MAX_HEADER_BYTES}\)",
    ),
    "corrupt header JSON": (
        b"\x0c\0\0\0\0\0\0\0{not json!!}",
        r"not a valid safetensors file: Expecting",
    ),
    "header not UTF-8": (b"\x04\0\0\0\0\0\0\0\xff\xfe{}", r"not a valid safetensors file"),
    "header not an object": (raw_safetensors([1, 2], b""), r"header must be a JSON object"),  # type: ignore[arg-type]
    "deeply nested header": (_nested(200_000), r"not a valid safetensors file"),
    "truncated data": (valid_weights()[:-10], r"tensors describe \d+ bytes but the file holds \d+"),
    "truncated header": (valid_weights()[:40], r"header of \d+ bytes"),
    "trailing bytes": (
        valid_weights() + b"\0" * 4,
        r"tensors describe \d+ bytes but the file holds \d+",
    ),
    "overlapping offsets": (_overlap(), r"overlaps or leaves a gap"),
    "gap between tensors": (_gap(), r"overlaps or leaves a gap"),
    "offsets disagree with shape": (
        _wrong_span(),
        r"declares 12 bytes for shape \[4\] \(16 expected\)",
    ),
    "negative offset": (
        raw_safetensors({"t": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b""),
        r"invalid data_offsets",
    ),
    "bad shape": (
        raw_safetensors(
            {"t": {"dtype": "F32", "shape": [2, "x"], "data_offsets": [0, 8]}}, b"\0" * 8
        ),
        r"invalid shape",
    ),
    "I32 dtype": (
        raw({f"{C_ATTN}.flora_A.weight": ("I32", [4], b"\0" * 16)}),
        r"dtype 'I32'; adapters must be one of \['BF16', 'F16', 'F32', 'F64'\]",
    ),
    "metadata not strings": (
        raw_safetensors({"__metadata__": {"format": 1}}, b""),
        r"__metadata__ must map strings to strings",
    ),
    "F32 NaN": (with_value("F32", 0x7FC00000), r"'.*flora_A.weight' holds NaN or infinite"),
    "F32 +Inf": (with_value("F32", 0x7F800000), r"holds NaN or infinite"),
    "F32 -Inf": (with_value("F32", 0xFF800000), r"holds NaN or infinite"),
    "F16 NaN": (with_value("F16", 0x7E00), r"holds NaN or infinite"),
    "F16 Inf": (with_value("F16", 0x7C00), r"holds NaN or infinite"),
    "BF16 NaN": (with_value("BF16", 0x7FC0), r"holds NaN or infinite"),
    "BF16 -Inf": (with_value("BF16", 0xFF80), r"holds NaN or infinite"),
}


@pytest.mark.parametrize("case", STRUCTURE, ids=list(STRUCTURE))
def test_bad_safetensors_are_invalid_adapters(case: str):
    weights, message = STRUCTURE[case]
    config = adapter_config("flora", 2)
    error = expect(InvalidAdapter, 422, message, config, weights, max_bytes=4 * MAX_BYTES)
    assert "adapter_model.safetensors" in error.message


def test_read_safetensors_lists_tensors_and_checks_every_one():
    weights = flora_raw("F16", lambda a: a.astype("<f2").tobytes())
    infos = read_safetensors(weights, "w.safetensors")
    assert infos[0] == TensorInfo(f"{PREFIX}.0.attn.c_attn.flora_A.weight", "F16", (2, N_IN))
    assert [i.shape for i in infos] == [(2, N_IN), (N_OUT, 2)] * SPEC.n_layer
    # a NaN in the very last element of the last tensor is found too
    last = len(weights) - 2
    with pytest.raises(InvalidAdapter, match=r"w.safetensors: tensor '.*1.attn.c_attn.flora_B"):
        read_safetensors(weights[:last] + np.array([0x7E00], "<u2").tobytes(), "w.safetensors")


def test_finite_extremes_and_zero_sized_tensors_are_values_not_errors():
    big = np.array([np.finfo(np.float16).max, -np.finfo(np.float16).max, 0.0, -0.0], "<f2")
    tensors = {"big": ("F16", [4], big.tobytes()), "none": ("F32", [0, 64], b"")}
    tensors["bf16"] = ("BF16", [1], np.array([0x7F7F], "<u2").tobytes())  # the largest bf16
    assert [i.name for i in read_safetensors(raw(tensors))] == ["big", "none", "bf16"]


# --- the config and its agreement with the tensors ------------------------------------------------
def lora(rank: int = 2, **extra) -> dict:
    return adapter_config("lora", rank, **extra)


def flora(rank: int = 2, **extra) -> dict:
    return adapter_config("flora", rank, **extra)


def _huge_config() -> bytes:
    return json.dumps(flora(description="x" * MAX_CONFIG_BYTES)).encode()


def _wrong_shape() -> dict:
    tensors = adapter_tensors("flora", 2)
    tensors[f"{C_ATTN}.flora_A.weight"] = np.ones((2, N_IN - 1), np.float32)
    return tensors


def _mixed_ranks() -> dict:
    tensors = adapter_tensors("lora", 2)
    tensors[f"{PREFIX}.1.attn.c_attn.lora_A.weight"] = np.ones((4, N_IN), np.float32)
    tensors[f"{PREFIX}.1.attn.c_attn.lora_B.weight"] = np.ones((N_OUT, 4), np.float32)
    return tensors


def _layer(n: int) -> dict:
    return adapter_tensors("flora", 2) | {
        f"{PREFIX}.{n}.attn.c_attn.flora_A.weight": np.ones((2, N_IN), np.float32),
        f"{PREFIX}.{n}.attn.c_attn.flora_B.weight": np.ones((N_OUT, 2), np.float32),
    }


def _ia3(shape: tuple[int, ...], module: str = "attn.c_attn") -> dict:
    return {f"{PREFIX}.{layer}.{module}.ia3_l": np.ones(shape, np.float32) for layer in range(2)}


FLORA2 = adapter_tensors("flora", 2)
LORA_CONFIG = json.dumps(lora(lora_alpha="ALPHA")).encode().replace(b'"ALPHA"', b"ALPHA")
LORA2 = adapter_tensors("lora", 2)
CONFIG_CASES = {
    # name: (error, status, message, config, weights, kwargs)
    "config not JSON": (
        InvalidAdapter,
        422,
        r"adapter_config.json is not valid JSON",
        b"{peft_type: LORA",
        FLORA2,
        {},
    ),
    "config not UTF-8": (InvalidAdapter, 422, r"is not valid JSON", b'{"r": "\xff"}', FLORA2, {}),
    "config a list": (
        InvalidAdapter,
        422,
        r"adapter_config.json must hold a JSON object",
        b"[1, 2]",
        FLORA2,
        {},
    ),
    "config deeply nested": (
        InvalidAdapter,
        422,
        r"is not valid JSON",
        b'{"a":' + b"[" * 30_000 + b"]" * 30_000 + b"}",
        FLORA2,
        {},
    ),
    "config over 64 KiB": (
        AdapterTooLarge,
        413,
        rf"adapter_config.json is \d+ bytes; the limit is {MAX_CONFIG_BYTES}",
        _huge_config(),
        FLORA2,
        {},
    ),
    "weights over the limit": (
        AdapterTooLarge,
        413,
        r"adapter_model.safetensors is \d+ bytes; the limit is 1000",
        flora(),
        FLORA2,
        {"max_bytes": 1000},
    ),
    "peft_type wrong": (
        InvalidAdapter,
        422,
        r"peft_type 'PREFIX_TUNING' is not one of \['LORA', 'IA3', 'FLORA'\]",
        flora(peft_type="PREFIX_TUNING"),
        FLORA2,
        {},
    ),
    "peft_type missing": (
        InvalidAdapter,
        422,
        r"peft_type None",
        {"r": 2, "base_model_name_or_path": SPEC.name, "target_modules": ["c_attn"]},
        FLORA2,
        {},
    ),
    "use_dora": (
        InvalidAdapter,
        422,
        r"DoRA adapters are not supported",
        lora(use_dora=True),
        LORA2,
        {},
    ),
    "bias all": (
        InvalidAdapter,
        422,
        r"adapters that train biases are not supported",
        lora(bias="all"),
        LORA2,
        {},
    ),
    "bias lora_only": (InvalidAdapter, 422, r"train biases", lora(bias="lora_only"), LORA2, {}),
    "modules_to_save": (
        InvalidAdapter,
        422,
        r"modules_to_save \(fully trained layers\)",
        lora(modules_to_save=["lm_head"]),
        LORA2,
        {},
    ),
    "fan_in_fan_out": (
        InvalidAdapter,
        422,
        r"fan_in_fan_out",
        lora(fan_in_fan_out=True),
        LORA2,
        {},
    ),
    "unknown base model": (
        InvalidAdapter,
        422,
        r"unknown base model 'meta/llama'; this registry accepts adapters for "
        r"bigcode/starcoder,.* test/mqa",
        flora(base_model_name_or_path="meta/llama"),
        FLORA2,
        {},
    ),
    "unknown base model override": (
        InvalidAdapter,
        422,
        r"unknown base model 'other'",
        flora(),
        FLORA2,
        {"base_model": "other"},
    ),
    "missing base model": (
        InvalidAdapter,
        422,
        r"no base model: set base_model_name_or_path",
        flora(base_model_name_or_path=None),
        FLORA2,
        {},
    ),
    "base model not a string": (
        InvalidAdapter,
        422,
        r"base_model_name_or_path must be a string",
        flora(base_model_name_or_path=["test/mqa"]),
        FLORA2,
        {},
    ),
    "unknown target module": (
        InvalidAdapter,
        422,
        r"target module 'q_proj' does not exist in GPTBigCode; adaptable modules are",
        flora(target_modules=["c_attn", "q_proj"]),
        FLORA2,
        {},
    ),
    "target_modules empty": (
        InvalidAdapter,
        422,
        r"target_modules must be a non-empty list",
        flora(target_modules=[]),
        FLORA2,
        {},
    ),
    "target_modules missing": (
        InvalidAdapter,
        422,
        r"target_modules must be a non-empty list",
        flora(target_modules=None),
        FLORA2,
        {},
    ),
    "r missing": (
        InvalidAdapter,
        422,
        r"r must be an integer in 1..256",
        flora(r=None),
        FLORA2,
        {},
    ),
    "r zero": (InvalidAdapter, 422, r"r must be an integer in 1..256", flora(r=0), FLORA2, {}),
    "r too big": (InvalidAdapter, 422, r"r must be an integer", flora(r=257), FLORA2, {}),
    "r a string": (InvalidAdapter, 422, r"r must be an integer", flora(r="2"), FLORA2, {}),
    "r a bool": (InvalidAdapter, 422, r"r must be an integer", flora(r=True), FLORA2, {}),
    "lora_alpha infinite": (
        InvalidAdapter,
        422,
        r"lora_alpha must be a finite number",
        LORA_CONFIG.replace(b"ALPHA", b"Infinity"),
        LORA2,
        {},
    ),
    "lora_alpha NaN": (
        InvalidAdapter,
        422,
        r"lora_alpha must be a finite number",
        LORA_CONFIG.replace(b"ALPHA", b"NaN"),
        LORA2,
        {},
    ),
    "lora_alpha a string": (
        InvalidAdapter,
        422,
        r"lora_alpha must be a finite number",
        lora(lora_alpha="16"),
        LORA2,
        {},
    ),
    "rank_pattern invalid regex": (
        InvalidAdapter,
        422,
        r"rank_pattern key '\[' is not a pattern this server can match in linear time",
        lora(rank_pattern={"[": 4}),
        LORA2,
        {},
    ),
    "rank_pattern not an object": (
        InvalidAdapter,
        422,
        r"rank_pattern must be an object",
        lora(rank_pattern=["c_attn"]),
        LORA2,
        {},
    ),
    "rank_pattern bad rank": (
        InvalidAdapter,
        422,
        r"rank_pattern\[.*\] must be an integer",
        lora(rank_pattern={"c_attn": 0}),
        LORA2,
        {},
    ),
    "wrong shape": (
        InvalidAdapter,
        422,
        r"transformer.h.0.attn.c_attn of test/mqa: expected flora_A.weight \(2, 64\) and "
        r"flora_B.weight \(96, 2\) \(r=2 in adapter_config.json\), got \(\(2, 63\), \(96, 2\)\)",
        flora(),
        _wrong_shape(),
        {},
    ),
    "rank differs from config": (
        InvalidAdapter,
        422,
        r"expected lora_A.weight \(4, 64\) and lora_B.weight \(96, 4\) \(r=4 in",
        lora(4),
        LORA2,
        {},
    ),
    "rank_pattern not followed": (
        InvalidAdapter,
        422,
        r"transformer.h.1.attn.c_attn .*\(r=2 in",
        lora(),
        _mixed_ranks(),
        {},
    ),
    "missing lora_B": (
        InvalidAdapter,
        422,
        r"transformer.h.1.attn.c_attn: lora_B.weight is missing",
        lora(),
        tensors_without("lora", 2, f"{PREFIX}.1.attn.c_attn.lora_B.weight"),
        {},
    ),
    "missing flora_A": (
        InvalidAdapter,
        422,
        r"transformer.h.0.attn.c_attn: flora_A.weight is missing",
        flora(),
        tensors_without("flora", 2, f"{C_ATTN}.flora_A.weight"),
        {},
    ),
    "lora tensors in a FLoRA config": (
        InvalidAdapter,
        422,
        r"unexpected tensor '.*lora_A.weight' in a flora adapter",
        flora(),
        LORA2,
        {},
    ),
    "flora tensors in a LoRA config": (
        InvalidAdapter,
        422,
        r"unexpected tensor '.*flora_A.weight' in a lora adapter",
        lora(),
        FLORA2,
        {},
    ),
    "ia3 tensor in a LoRA config": (
        InvalidAdapter,
        422,
        r"unexpected tensor '.*ia3_l' in a lora adapter",
        lora(),
        LORA2 | _ia3((N_OUT, 1)),
        {},
    ),
    "unknown module": (
        InvalidAdapter,
        422,
        r"unexpected tensor 'base_model.model.transformer.h.0.attn.q_proj.lora_A.weight'",
        lora(),
        LORA2 | {f"{PREFIX}.0.attn.q_proj.lora_A.weight": np.ones((2, 64), np.float32)},
        {},
    ),
    "tensor outside the layers": (
        InvalidAdapter,
        422,
        r"unexpected tensor 'lm_head.weight'",
        flora(),
        FLORA2 | {"lm_head.weight": np.ones((2, 2), np.float32)},
        {},
    ),
    "layer index = n_layer": (
        InvalidAdapter,
        422,
        r"transformer.h.2.attn.c_attn.flora_A.weight: test/mqa has only 2 layers",
        flora(),
        _layer(2),
        {},
    ),
    "layer index far out": (InvalidAdapter, 422, r"has only 2 layers", flora(), _layer(9999), {}),
    "no tensors": (
        InvalidAdapter,
        422,
        r"adapter_model.safetensors holds no flora weights",
        flora(),
        raw({}),
        {},
    ),
    "ia3 as (1, in) without feedforward_modules": (
        InvalidAdapter,
        422,
        r"transformer.h.0.attn.c_attn of test/mqa: expected \(96, 1\) "
        r"\(feedforward_modules in adapter_config.json\), got \(1, 64\)",
        adapter_config("ia3", 1),
        _ia3((1, N_IN)),
        {},
    ),
    "ia3 feed-forward as (out, 1)": (
        InvalidAdapter,
        422,
        r"mlp.c_fc of test/mqa: expected \(1, 64\) \(feed-forward\)",
        adapter_config("ia3", 1, target_modules=["mlp.c_fc"], feedforward_modules=["mlp.c_fc"]),
        _ia3((FC_OUT, 1), "mlp.c_fc"),
        {},
    ),
    "ia3 wrong length": (
        InvalidAdapter,
        422,
        r"expected \(96, 1\)",
        adapter_config("ia3", 1),
        _ia3((N_OUT + 1, 1)),
        {},
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_adapters_are_refused_with_the_reason(case: str):
    error, status, message, config, weights, kwargs = CONFIG_CASES[case]
    expect(error, status, message, config, weights, **kwargs)


def test_unknown_base_model_is_reported_on_the_base_model_param():
    error = expect(InvalidAdapter, 422, "unknown base model", flora(), FLORA2, base_model="x/y")
    assert error.param == "base_model"
    for known in ("test/mqa", "bigcode/starcoderbase-1b"):
        assert known in error.message


# --- adapters that pass ---------------------------------------------------------------------------
def test_flora_adapter_is_described():
    weights = save(FLORA2)
    info = validate(flora(), weights)
    assert info == AdapterInfo(
        kind="flora",
        rank=2,
        alpha=None,
        base_model=SPEC.name,
        target_modules=["c_attn"],
        sha256=hashlib.sha256(weights).hexdigest(),
        size=len(weights),
    )


@pytest.mark.parametrize(("alpha", "recorded"), [(8, 8.0), (3.5, 3.5), (None, 4.0)])
def test_lora_alpha_is_recorded(alpha: float | None, recorded: float):
    config = lora(4, lora_alpha=alpha)
    if alpha is None:
        del config["lora_alpha"]  # PEFT's default: alpha = r
    info = validate(config, adapter_tensors("lora", 4))
    assert (info.kind, info.rank, info.alpha) == ("lora", 4, recorded)


def test_base_model_argument_overrides_the_config():
    info = validate(flora(base_model_name_or_path="somewhere/else"), FLORA2, base_model=SPEC.name)
    assert info.base_model == SPEC.name


@pytest.mark.parametrize(
    "key",
    ["transformer.h.1.attn.c_attn", "h.1.attn.c_attn", r"transformer\.h\.1\.attn\.c_attn"],
)
def test_rank_pattern_gives_a_module_its_own_rank(key: str):
    info = validate(lora(2, rank_pattern={key: 4}), _mixed_ranks())
    assert info.rank == 4


def test_rank_pattern_that_matches_nothing_keeps_the_default_rank():
    with pytest.raises(InvalidAdapter, match=r"transformer.h.1.attn.c_attn .*\(r=2 in"):
        validate(lora(2, rank_pattern={"h.7.attn.c_attn": 4}), _mixed_ranks())
    assert validate(lora(2, rank_pattern={"h.7.attn.c_attn": 4}), LORA2).rank == 2


def test_ia3_scales_outputs_and_feed_forward_inputs():
    tensors = _ia3((N_OUT, 1)) | _ia3((1, FC_IN), "mlp.c_fc")
    config = adapter_config(
        "ia3", 1, target_modules=["c_attn", "mlp.c_fc"], feedforward_modules=["mlp.c_fc"]
    )
    info = validate(config, tensors)
    assert (info.kind, info.rank, info.alpha) == ("ia3", 1, None)
    assert info.target_modules == ["c_attn", "mlp.c_fc"]
    # feedforward_modules as PEFT's regex over the full module name
    regex = config | {"feedforward_modules": r"transformer\.h\.\d+\.mlp\.c_fc"}
    assert validate(regex, tensors).target_modules == ["c_attn", "mlp.c_fc"]
    # the same shape on a module that is not feed-forward is refused
    with pytest.raises(InvalidAdapter, match=r"mlp.c_fc of test/mqa: expected \(128, 1\)"):
        validate(config | {"feedforward_modules": []}, tensors)


def test_ia3_from_conftest_passes():
    info = validate(adapter_config("ia3", 1), adapter_tensors("ia3", 1))
    assert (info.kind, info.rank, info.target_modules) == ("ia3", 1, ["c_attn"])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_numpy_float_dtypes_pass(dtype):
    info = validate(lora(), adapter_tensors("lora", 2, dtype=dtype))
    assert (info.kind, info.rank) == ("lora", 2)


def test_bf16_weights_pass():
    weights = flora_raw("BF16", bf16)
    assert [i.dtype for i in read_safetensors(weights)] == ["BF16"] * 4
    info = validate(flora(), weights)
    assert (info.kind, info.rank, info.size) == ("flora", 2, len(weights))


def test_metadata_is_allowed():
    weights = save(FLORA2, metadata={"format": "pt"})
    assert b"__metadata__" in weights
    assert validate(flora(), weights).rank == 2


def test_multiple_target_modules_are_recorded():
    modules = ("attn.c_attn", "mlp.c_fc")
    config = lora(2, target_modules=["c_attn", "mlp.c_fc"])
    info = validate(config, adapter_tensors("lora", 2, modules=modules))
    assert info.target_modules == ["c_attn", "mlp.c_fc"]
    # PEFT's suffix matching: "c_fc" and "c_proj" name modules that exist
    every = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    config = lora(2, target_modules=["c_attn", "c_proj", "c_fc"])
    info = validate(config, adapter_tensors("lora", 2, modules=every))
    assert info.target_modules == ["attn.c_proj", "c_attn", "mlp.c_fc", "mlp.c_proj"]
    # the recorded modules come from the tensors, not the config's claim
    assert validate(config, LORA2).target_modules == ["c_attn"]


def test_regex_target_modules_are_checked_through_the_tensors():
    info = validate(lora(2, target_modules=r".*\.c_attn"), LORA2)
    assert info.target_modules == ["c_attn"]


def test_error_messages_never_echo_huge_input():
    long_key = "k" * 5000
    with pytest.raises(InvalidAdapter) as caught:
        validate(lora(rank_pattern={long_key: 2}), LORA2)
    assert len(caught.value.message) < 300 and re.search("the limit is 200", caught.value.message)
