"""A strict, torch-free reader for safetensors files coming from strangers.

Checks the header before trusting any number in it (size cap, JSON object, dtypes, shapes,
offsets that tile the data exactly), then checks every value is finite. Nothing is executed or
unpickled; the only allocation is the file itself, whose size the caller has already capped.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field

import numpy as np

from adapter_registry.errors import InvalidAdapter

MAX_HEADER_BYTES = 1 << 20  # 1 MiB of JSON describes ~10k tensors; real adapters need far less
_FLOATS = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # widened to float32 for the finiteness check
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # the values, shaped (a view of the file's bytes; BF16 widened to float32)
    values: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.empty(0))


def read_safetensors(data: bytes, filename: str = "adapter_model.safetensors") -> list[TensorInfo]:
    """The tensors in ``data`` after checking its structure and that every value is finite."""
    header, base = _header(data, filename)
    infos: list[TensorInfo] = []
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise InvalidAdapter(f"{filename}: __metadata__ must map strings to strings")
            continue
        info, (begin, end) = _entry(name, entry, filename)
        spans.append((begin, end, name))
        infos.append(info)
    _check_tiling(spans, len(data) - base, filename)
    return [
        _with_values(info, data[base + begin : base + end], filename)
        for info, (begin, end, _) in zip(infos, spans, strict=True)
    ]


def _header(data: bytes, filename: str) -> tuple[dict, int]:
    if len(data) < 8:
        raise InvalidAdapter(f"{filename} is not a safetensors file (only {len(data)} bytes)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or size > len(data) - 8:
        raise InvalidAdapter(
            f"{filename} is not a valid safetensors file: header of {size} bytes "
            f"(file {len(data)} bytes, limit {MAX_HEADER_BYTES})"
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidAdapter(f"{filename} is not a valid safetensors file: {e}") from e
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{filename}: the safetensors header must be a JSON object")
    return header, 8 + size


def _entry(name: str, entry: object, filename: str) -> tuple[TensorInfo, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise InvalidAdapter(f"{filename}: entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _FLOATS:
        raise InvalidAdapter(
            f"{filename}: tensor {name!r} has dtype {dtype!r}; adapters must be one of "
            f"{sorted(_FLOATS)}"
        )
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape) and len(shape) <= 4):
        raise InvalidAdapter(f"{filename}: tensor {name!r} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise InvalidAdapter(f"{filename}: tensor {name!r} has invalid data_offsets")
    begin, end = offsets
    expected = math.prod(shape) * _FLOATS[dtype].itemsize
    if end - begin != expected:
        raise InvalidAdapter(
            f"{filename}: tensor {name!r} declares {end - begin} bytes for shape {shape} "
            f"({expected} expected)"
        )
    return TensorInfo(name, dtype, tuple(shape)), (begin, end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(spans: list[tuple[int, int, str]], data_bytes: int, filename: str) -> None:
    """Tensors must cover the data exactly once: no overlap, no gap, nothing trailing."""
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise InvalidAdapter(f"{filename}: tensor {name!r} overlaps or leaves a gap")
        position = end
    if position != data_bytes:
        raise InvalidAdapter(
            f"{filename}: tensors describe {position} bytes but the file holds {data_bytes}"
        )


def _with_values(info: TensorInfo, raw: bytes, filename: str) -> TensorInfo:
    """``info`` with its values, after checking every one is finite."""
    values = np.frombuffer(raw, dtype=_FLOATS[info.dtype])
    if info.dtype == "BF16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    if values.size and not np.isfinite(values).all():
        raise InvalidAdapter(f"{filename}: tensor {info.name!r} holds NaN or infinite values")
    return TensorInfo(info.name, info.dtype, info.shape, values.reshape(info.shape))
