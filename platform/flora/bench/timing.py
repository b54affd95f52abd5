"""Side-by-side timing: methods are interleaved round by round, so drift on a noisy machine
hits every method alike; each is summarised by its median and its spread between rounds."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], object], calls: int) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / calls
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - begin) / calls


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over rounds and the interquartile range relative to it."""

    median: float
    spread: float

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        median = statistics.median(samples)
        if len(samples) < 4:
            return cls(median, (max(samples) - min(samples)) / median)
        q1, _, q3 = statistics.quantiles(samples, n=4)
        return cls(median, (q3 - q1) / median)


def interleaved_timings(
    fns: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    rounds: int = 7,
    min_sample_seconds: float = 0.02,
) -> dict[str, Timing]:
    """Seconds per call of each function, sampled in interleaved rounds after warm-up."""
    clock = _Clock(device)
    calls: dict[str, int] = {}
    for name, fn in fns.items():
        fn()  # warm-up: allocations, caches, lazy calibration
        once = clock.time(fn, 1)
        calls[name] = max(1, min(1000, int(min_sample_seconds / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(clock.time(fn, calls[name]))
    return {name: Timing.of(values) for name, values in samples.items()}
