"""Pick the cheapest correct path per layer and batch from a calibrated cost model.

Every path computes the same function, so the choice is purely about time. Each candidate's
cost is written in the calibrated units of :mod:`flora.adapters.calibration`: base-GEMM time as
a function of rows, seconds per op, element-wise bandwidth and thin-matmul throughput.

Where the model cannot separate the leaders (predictions within ``tune_margin`` of the best),
the dispatcher times them once on the real inputs and remembers the winner for that workload
bucket (token and adapter counts rounded to powers of two, rank, cache state): the model
prunes, a short measurement decides, and every later batch in the bucket pays nothing.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from flora.adapters.calibration import DEFAULT_CALIBRATION, Calibration, DeviceProfile, GemmCurve
from flora.adapters.triton_kernels import triton_available
from flora.adapters.weights import AdapterKind
from flora.rounding import ceil_pow2


class KernelPath(enum.StrEnum):
    """The batched implementations a layer can run."""

    BASE = "base"
    FLORA_VECTORISED = "flora_vectorised"
    FLORA_SEGMENTED = "flora_segmented"
    LORA_GATHER = "lora_gather"
    LORA_SEGMENTED = "lora_segmented"
    LORA_STACKED = "lora_stacked"
    LORA_BMM = "lora_bmm"
    IA3 = "ia3"
    FLORA_TRITON = "flora_triton"
    LORA_BGMV_TRITON = "lora_bgmv_triton"


# The PyTorch paths, which run on every device.
PATHS_BY_KIND: dict[AdapterKind, tuple[KernelPath, ...]] = {
    AdapterKind.FLORA: (KernelPath.FLORA_VECTORISED, KernelPath.FLORA_SEGMENTED),
    AdapterKind.LORA: (
        KernelPath.LORA_GATHER,
        KernelPath.LORA_SEGMENTED,
        KernelPath.LORA_STACKED,
        KernelPath.LORA_BMM,
    ),
    AdapterKind.IA3: (KernelPath.IA3,),
}
# Fused Triton kernels (triton_kernels.py): candidates only where Triton can run them.
TRITON_PATHS_BY_KIND: dict[AdapterKind, tuple[KernelPath, ...]] = {
    AdapterKind.FLORA: (KernelPath.FLORA_TRITON,),
    AdapterKind.LORA: (KernelPath.LORA_BGMV_TRITON,),
    AdapterKind.IA3: (),
}
# A Triton launch binds its arguments in Python: priced as this many small torch ops.
TRITON_LAUNCH_OPS = 2


def kind_paths(kind: AdapterKind, device: torch.device | None = None) -> tuple[KernelPath, ...]:
    """The paths that compute ``kind``; given ``device``, only those that can run there now."""
    triton = TRITON_PATHS_BY_KIND[kind]
    if triton and (device is None or triton_available(device)):
        return PATHS_BY_KIND[kind] + triton
    return PATHS_BY_KIND[kind]


def check_path(kind: AdapterKind, path: KernelPath, device: torch.device | None = None) -> None:
    """Raise ``ValueError`` unless ``path`` computes ``kind`` (and can run on ``device``)."""
    if path not in kind_paths(kind):
        raise ValueError(f"path {path} cannot run {kind} adapters")
    if device is not None and path not in kind_paths(kind, device):
        raise ValueError(
            f"path {path} needs Triton, which cannot run on {device} here: it needs CUDA with "
            "triton installed or, on CPU, its interpreter (TRITON_INTERPRET=1, set before "
            "triton is first imported)"
        )


@dataclass(frozen=True)
class Workload:
    """What one kind's tokens in one layer look like, as the cost model sees them."""

    in_features: int
    out_features: int
    counts: tuple[int, ...]  # tokens per distinct slot (the no-adapter slot included)
    ranks: tuple[int, ...]  # rank per distinct slot (0 for no-adapter)
    runs: int  # contiguous same-slot runs (examples, for the bmm baseline)
    longest_run: int
    cached: tuple[bool, ...]  # per slot: a materialised W ∘ M_i is already cached

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=1) or 1

    @property
    def adapters(self) -> int:
        return sum(1 for r in self.ranks if r > 0)

    def bucket(self) -> tuple:
        """Workloads that share a bucket share a tuned path."""
        cached = sum(self.cached)
        return (
            self.in_features,
            self.out_features,
            ceil_pow2(self.tokens),
            ceil_pow2(self.adapters),
            self.max_rank,
            ceil_pow2(self.runs),
            0 if cached == 0 else 2 if cached == len(self.cached) else 1,
        )


class CostModel:
    """Seconds each path should take for a workload on one device and dtype."""

    def __init__(self, profile: DeviceProfile, gemm: GemmCurve, element_size: int) -> None:
        self.p, self.gemm, self.esize = profile, gemm, element_size

    def _ew(self, elements: float, ops: int = 1) -> float:
        return ops * self.p.op_seconds + elements * self.esize / self.p.bytes_per_second

    def _thin(self, flops: float, ops: int = 1) -> float:
        return ops * self.p.op_seconds + flops / self.p.thin_flops_per_second

    def cost(self, path: KernelPath, w: Workload) -> float:
        k, d, t, r = w.in_features, w.out_features, w.tokens, w.max_rank
        base = self.gemm(t)
        if path is KernelPath.BASE:
            return base
        if path is KernelPath.IA3:
            return base + self._ew(3 * t * (k + d), ops=4)
        if path is KernelPath.FLORA_VECTORISED:
            return self.gemm(t * r) + self._ew(t * r * (3 * k + 4 * d), ops=6 if r > 1 else 5)
        if path is KernelPath.FLORA_SEGMENTED:
            weight_read = d * k * self.esize / self.p.bytes_per_second
            total = self._ew(2 * t * (k + d), ops=3)
            for count, rank, hit in zip(w.counts, w.ranks, w.cached, strict=True):
                total += self.gemm(count) + (weight_read if rank else 0.0)
                if rank and not hit:
                    total += self._thin(2 * d * k * rank) + self._ew(3 * d * k)
            return total
        if path is KernelPath.FLORA_TRITON:  # no gather copies: x, A rows, z; p, Bt rows, y
            rows = t * r * (2 * k + 2 * d) + t * (k + d)
            return self.gemm(t * r) + self._ew(rows, ops=2 * TRITON_LAUNCH_OPS)
        if path is KernelPath.LORA_BGMV_TRITON:  # no-adapter tokens skip both kernels
            adapted = sum(c for c, rr in zip(w.counts, w.ranks, strict=True) if rr)
            thin = self._thin(2 * adapted * r * (k + d), ops=0)
            moved = adapted * r * (k + d) + adapted * (k + 2 * d)
            return base + thin + self._ew(moved, ops=2 * TRITON_LAUNCH_OPS)
        if path is KernelPath.LORA_GATHER:
            return base + self._ew(3 * t * r * (k + d), ops=6) + self._thin(2 * t * r * (k + d))
        if path is KernelPath.LORA_SEGMENTED:
            n = w.adapters
            return (
                base
                + self._ew(t * k + 2 * t * d, ops=3)
                + sum(
                    self._thin(2 * c * rr * (k + d), ops=2)
                    for c, rr in zip(w.counts, w.ranks, strict=True)
                    if rr
                )
                + self._ew(n * r * (k + d))
            )
        if path is KernelPath.LORA_STACKED:
            nr = w.adapters * r
            return (
                base
                + self._thin(2 * t * nr * (k + d), ops=2)
                + self._ew(nr * (k + d) + 3 * t * nr, ops=6)
            )
        if path is KernelPath.LORA_BMM:
            padded = w.runs * w.longest_run
            return (
                base
                + self._ew(padded * (k + 2 * d) + w.runs * r * (k + d) + t * d, ops=9)
                + self._thin(2 * padded * r * (k + d))
            )
        raise ValueError(f"no cost for path {path}")


class Dispatcher:
    """Chooses a path per (layer, kind, batch); profiles come from a shared calibration.

    Decisions are memoised per workload bucket, so a steady stream of similar batches pays one
    dictionary lookup per layer.

    ``tune_margin`` ≤ 1 turns the measured tie-break off (pure cost model). ``force`` pins a
    path per kind (benchmarks comparing paths end to end).
    """

    def __init__(
        self,
        calibration: Calibration | None = None,
        *,
        tune_margin: float = 1.6,
        tune_repeats: int = 3,
        force: Mapping[AdapterKind, KernelPath] | None = None,
    ) -> None:
        self.force = dict(force or {})
        for kind, path in self.force.items():
            check_path(kind, path)
        self.calibration = calibration or DEFAULT_CALIBRATION
        self.tune_margin, self.tune_repeats = tune_margin, tune_repeats
        self._models: dict[tuple, CostModel] = {}
        self._decided: dict[tuple, KernelPath] = {}
        self._lock = threading.Lock()

    def cost_model(
        self, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype
    ) -> CostModel:
        key = (in_features, out_features, device, dtype)
        model = self._models.get(key)
        if model is None:
            profile = self.calibration.profile(device, dtype)
            gemm = self.calibration.gemm(in_features, out_features, device, dtype)
            model = CostModel(profile, gemm, torch.empty((), dtype=dtype).element_size())
            self._models[key] = model
        return model

    def choose(
        self,
        kind: AdapterKind,
        workload: Workload,
        device: torch.device,
        dtype: torch.dtype,
        measure: Callable[[KernelPath], float] | None = None,
    ) -> KernelPath:
        """The predicted-cheapest path; ``measure(path)`` (seconds) settles close calls."""
        if kind in self.force:
            return self.force[kind]
        candidates = kind_paths(kind, device)
        if len(candidates) == 1:
            return candidates[0]
        key = (kind, device, dtype, len(candidates), workload.bucket())
        decided = self._decided.get(key)
        if decided is not None:
            return decided
        model = self.cost_model(workload.in_features, workload.out_features, device, dtype)
        predicted = sorted((model.cost(path, workload), path) for path in candidates)
        close = [path for cost, path in predicted if cost <= self.tune_margin * predicted[0][0]]
        if len(close) == 1:
            with self._lock:
                self._decided[key] = close[0]
            return close[0]
        if measure is None:  # e.g. training: no side runs; decide on the model alone
            return predicted[0][1]
        timings = dict.fromkeys(close, float("inf"))
        for _ in range(self.tune_repeats):  # interleaved, best of n: robust to drift
            for path in close:
                timings[path] = min(timings[path], measure(path))
        winner = min(close, key=timings.__getitem__)
        with self._lock:
            self._decided[key] = winner
        return winner
