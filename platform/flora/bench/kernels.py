"""Layer-level reproduction of the paper's Figure 2 (left): every path's time over the base
linear, for StarCoder-shaped ``c_attn`` layers, across ranks, token counts and adapter mixes."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from flora.adapters import (
    AdaptedLinear,
    AdapterBatch,
    AdapterKind,
    BankConfig,
    Dispatcher,
    FloraWeights,
    IA3Weights,
    KernelPath,
    LoraWeights,
    MaterialisedCache,
)
from flora.adapters.dispatch import kind_paths
from flora.adapters.triton_kernels import triton_available
from flora.bench.timing import interleaved_timings

# c_attn of StarCoder (GPTBigCode, multi-query): hidden → hidden + 2 · head_dim (head_dim 128).
SHAPES: dict[str, tuple[int, int]] = {
    "1b": (2048, 2304),
    "3b": (2816, 3072),
    "15b": (6144, 6400),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# method → (kind, forced path or None for the dispatcher's own choice)
METHODS: dict[str, tuple[AdapterKind | None, KernelPath | None]] = {
    "base": (None, KernelPath.BASE),
    "flora": (AdapterKind.FLORA, KernelPath.FLORA_VECTORISED),
    "flora_seg": (AdapterKind.FLORA, KernelPath.FLORA_SEGMENTED),
    "flora_auto": (AdapterKind.FLORA, None),
    "lora_gather": (AdapterKind.LORA, KernelPath.LORA_GATHER),
    "lora_seg": (AdapterKind.LORA, KernelPath.LORA_SEGMENTED),
    "lora_stacked": (AdapterKind.LORA, KernelPath.LORA_STACKED),
    "lora_bmm": (AdapterKind.LORA, KernelPath.LORA_BMM),
    "lora_auto": (AdapterKind.LORA, None),
    "ia3": (AdapterKind.IA3, KernelPath.IA3),
}
# Timed (and reported) only where Triton runs: CUDA, or the interpreter on CPU.
TRITON_METHODS: dict[str, tuple[AdapterKind | None, KernelPath | None]] = {
    "flora_triton": (AdapterKind.FLORA, KernelPath.FLORA_TRITON),
    "lora_bgmv_triton": (AdapterKind.LORA, KernelPath.LORA_BGMV_TRITON),
}


def methods(device: torch.device) -> dict[str, tuple[AdapterKind | None, KernelPath | None]]:
    """The methods timed on ``device``: every PyTorch path, and the Triton ones where they run."""
    return {**METHODS, **TRITON_METHODS} if triton_available(device) else METHODS


def methods_in(results: list[Result]) -> list[str]:
    """The methods a report shows: every PyTorch one, and the Triton ones that were timed."""
    timed = {r.method for r in results}
    return [*METHODS, *(m for m in TRITON_METHODS if m in timed)]


@dataclass(frozen=True)
class Cell:
    shape: str
    dtype: str
    tokens: int
    adapters: int
    rank: int


@dataclass
class Result:
    cell: Cell
    method: str
    seconds: float | None  # None: skipped, predicted too slow to time here
    chosen: str = ""  # for *_auto: the path the dispatcher ran
    spread: float = 0.0  # interquartile range between rounds, relative to the median


def token_slots(tokens: int, adapters: int, rng: random.Random) -> list[int]:
    """Packed requests: ``adapters`` contiguous runs (one per request), in shuffled slot order."""
    adapters = min(adapters, tokens)
    bounds = [round(i * tokens / adapters) for i in range(adapters + 1)]
    order = list(range(adapters))
    rng.shuffle(order)
    return [order[i] for i in range(adapters) for _ in range(bounds[i + 1] - bounds[i])]


def _random_adapters(kind: AdapterKind, n: int, rank: int, k: int, d: int, gen):
    for _ in range(n):
        if kind is AdapterKind.FLORA:
            yield FloraWeights(
                A=1 + 0.1 * torch.randn(rank, k, generator=gen),
                B=1 + 0.1 * torch.randn(d, rank, generator=gen),
            )
        elif kind is AdapterKind.LORA:
            yield LoraWeights(
                A=torch.randn(rank, k, generator=gen) / k**0.5,
                B=torch.randn(d, rank, generator=gen),
                alpha=2.0 * rank,
            )
        else:
            yield IA3Weights(scale=1 + 0.1 * torch.randn(d, generator=gen))


def _layers(cell: Cell, device: torch.device, cache_bytes: int, dispatcher: Dispatcher):
    """One layer per kind over one shared base weight, each bank filled with ``adapters``."""
    k, d = SHAPES[cell.shape]
    dtype = DTYPES[cell.dtype]
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(k, d, device=device, dtype=dtype)
    n = min(cell.adapters, cell.tokens)
    layers = {}
    for kind in AdapterKind:
        config = BankConfig(max_slots=n, max_rank=cell.rank, kinds=frozenset({kind}))
        cache = MaterialisedCache(cache_bytes) if kind is AdapterKind.FLORA else None
        layer = AdaptedLinear(base, config, dispatcher=dispatcher, cache=cache)
        for slot, weights in enumerate(_random_adapters(kind, n, cell.rank, k, d, gen)):
            layer.load_adapter(slot, weights)
        layers[kind] = layer
    return base, layers


def run_cell(
    cell: Cell,
    device: torch.device,
    *,
    dispatcher: Dispatcher,
    cache_bytes: int,
    max_call_seconds: float,
    rounds: int,
) -> list[Result]:
    base, layers = _layers(cell, device, cache_bytes, dispatcher)
    k, _ = SHAPES[cell.shape]
    rng = random.Random(cell.tokens * 1000 + cell.adapters)
    batch = AdapterBatch.from_slots(token_slots(cell.tokens, cell.adapters, rng), device=device)
    x = torch.randn(cell.tokens, k, device=device, dtype=DTYPES[cell.dtype])
    predicted: dict[KernelPath, float] = {}
    for kind in (AdapterKind.FLORA, AdapterKind.LORA):
        layer = layers[kind]
        model = dispatcher.cost_model(*SHAPES[cell.shape], device, DTYPES[cell.dtype])
        workload = layer.workload(kind, batch)
        for path in kind_paths(kind, device):
            predicted[path] = model.cost(path, workload)
    fns: dict[str, Callable[[], object]] = {}
    results: list[Result] = []
    for method, (kind, path) in methods(device).items():
        if path in predicted and predicted[path] > max_call_seconds:
            results.append(Result(cell, method, None))
            continue
        if kind is None:
            fns[method] = lambda: base(x)
        else:
            layer = layers[kind]
            forced = {kind: path} if path is not None else None
            fns[method] = lambda layer=layer, forced=forced: layer(x, batch, paths=forced)
    with torch.inference_mode():
        timings = interleaved_timings(fns, device, rounds=rounds)
        plans = {kind: str(layers[kind].plan(batch).get(kind, "")) for kind in layers}
    for method, timing in timings.items():
        kind = methods(device)[method][0]
        chosen = plans[kind] if method.endswith("_auto") else ""
        results.append(Result(cell, method, timing.median, chosen, timing.spread))
    return results


def grid(shapes, dtypes, tokens, adapters, ranks) -> Iterator[Cell]:
    for shape in shapes:
        for dtype in dtypes:
            for t in tokens:
                for n in adapters:
                    n_eff = t if n in ("T", "t") else min(int(n), t)
                    for r in ranks:
                        yield Cell(shape, dtype, t, n_eff, r)


def run(
    cells: list[Cell],
    device: torch.device,
    *,
    cache_bytes: int,
    max_call_seconds: float,
    rounds: int,
    log=sys.stderr,
) -> list[Result]:
    dispatcher = Dispatcher()
    results: list[Result] = []
    seen: set[Cell] = set()
    for i, cell in enumerate(cells, 1):
        if cell in seen:
            continue
        seen.add(cell)
        print(
            f"[{i}/{len(cells)}] {cell.shape} {cell.dtype} T={cell.tokens} "
            f"N={cell.adapters} r={cell.rank}",
            file=log,
            flush=True,
        )
        results += run_cell(
            cell,
            device,
            dispatcher=dispatcher,
            cache_bytes=cache_bytes,
            max_call_seconds=max_call_seconds,
            rounds=rounds,
        )
    return results
