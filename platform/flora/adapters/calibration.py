"""Measured speed of the running device, the constants behind the dispatcher's cost model.

Three numbers per (device, dtype) — the fixed cost of one small op, element-wise bandwidth and
thin-matmul throughput — plus, per layer shape, a curve of base-GEMM time against row count.
A short micro-benchmark measures them once; results are kept for the process and, for the
per-device constants, on disk (``$FLORA_CACHE_DIR`` or ``~/.cache/flora``).
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from flora.cache import cache_root

GEMM_ROWS = (1, 8, 32, 128)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, device: torch.device, *, repeats: int = 5, min_seconds: float = 2e-3) -> float:
    """Best-of-``repeats`` seconds per call, each sample long enough to beat timer noise."""
    fn()
    _synchronize(device)
    calls = 1
    while True:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _synchronize(device)
        if time.perf_counter() - start >= min_seconds or calls >= 1 << 16:
            break
        calls *= 4
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        _synchronize(device)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


@dataclass(frozen=True)
class DeviceProfile:
    """Per-(device, dtype) constants: seconds per op, bytes/s element-wise, flop/s thin matmul."""

    op_seconds: float
    bytes_per_second: float
    thin_flops_per_second: float

    @classmethod
    def measure(cls, device: torch.device, dtype: torch.dtype) -> DeviceProfile:
        tiny = torch.ones(8, device=device, dtype=dtype)
        big = torch.ones(1 << 22, device=device, dtype=dtype)
        op = measure(lambda: tiny * tiny, device)
        stream = measure(lambda: big * big, device)
        x = torch.ones(256, 1024, device=device, dtype=dtype)
        w = torch.ones(16, 1024, device=device, dtype=dtype)
        thin = measure(lambda: F.linear(x, w), device)
        return cls(
            op_seconds=op,
            bytes_per_second=3 * big.numel() * big.element_size() / max(stream - op, 1e-9),
            thin_flops_per_second=2 * 256 * 1024 * 16 / max(thin - op, 1e-9),
        )


class GemmCurve:
    """Seconds of ``F.linear`` on ``[m, in] × [out, in]``, measured at a few ``m``."""

    def __init__(self, rows: tuple[int, ...], seconds: tuple[float, ...]) -> None:
        self.rows, self.seconds = rows, seconds

    @classmethod
    def measure(
        cls, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype
    ) -> GemmCurve:
        w = torch.randn(out_features, in_features, device=device, dtype=dtype)
        seconds = []
        for m in GEMM_ROWS:
            x = torch.randn(m, in_features, device=device, dtype=dtype)
            seconds.append(measure(lambda x=x: F.linear(x, w), device, repeats=3))
        return cls(GEMM_ROWS, tuple(seconds))

    def __call__(self, m: float) -> float:
        rows, secs = self.rows, self.seconds
        if m <= rows[0]:
            return secs[0]
        i = min(bisect.bisect_left(rows, m), len(rows) - 1)
        r0, r1, s0, s1 = rows[i - 1], rows[i], secs[i - 1], secs[i]
        slope = max((s1 - s0) / (r1 - r0), 0.0)
        return s0 + slope * (m - r0)


class Calibration:
    """Process-wide store of measured profiles and GEMM curves (thread-safe, lazy)."""

    def __init__(self, persist: bool = True) -> None:
        self.persist = persist
        self._profiles: dict[tuple[str, str], DeviceProfile] = {}
        self._curves: dict[tuple[str, str, int, int], GemmCurve] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _device_key(device: torch.device) -> str:
        if device.type == "cuda":
            return f"cuda:{torch.cuda.get_device_name(device)}"
        return f"cpu:{os.cpu_count()}x{torch.get_num_threads()}t:torch{torch.__version__}"

    def _disk_path(self) -> Path:
        return cache_root() / "calibration.json"

    def profile(self, device: torch.device, dtype: torch.dtype) -> DeviceProfile:
        key = (self._device_key(device), str(dtype))
        with self._lock:
            found = self._profiles.get(key)
            if found is None and self.persist:
                found = self._load(key)
            if found is None:
                found = DeviceProfile.measure(device, dtype)
                if self.persist:
                    self._save(key, found)
            self._profiles[key] = found
            return found

    def gemm(
        self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype
    ) -> GemmCurve:
        key = (self._device_key(device), str(dtype), in_features, out_features)
        with self._lock:
            curve = self._curves.get(key)
            if curve is None:
                curve = GemmCurve.measure(in_features, out_features, device, dtype)
                self._curves[key] = curve
            return curve

    def _load(self, key: tuple[str, str]) -> DeviceProfile | None:
        try:
            stored = json.loads(self._disk_path().read_text())[" | ".join(key)]
            return DeviceProfile(**stored)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _save(self, key: tuple[str, str], profile: DeviceProfile) -> None:
        path = self._disk_path()
        try:
            stored = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            stored = {}
        stored[" | ".join(key)] = asdict(profile)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(stored, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home only costs a re-measure next process


DEFAULT_CALIBRATION = Calibration()
