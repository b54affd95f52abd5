"""End-to-end serving throughput: the engine with every request on its own adapter, against the
engine without adapters, PEFT's mixed-adapter ``generate`` and plain transformers ``generate``.

Random weights at a real config time the same as trained ones (``ignore_eos``, fixed output
lengths). Methods run in interleaved rounds so machine drift hits each alike; adapters are
loaded and the dispatcher tuned in a warm-up pass, as on a replica that has been serving.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flora.adapters import AdapterKind, FloraWeights, IA3Weights, KernelPath, LoraWeights
from flora.bench.engine_methods import Method, Run, adapter_names
from flora.engine import EngineConfig, LLMEngine, LocalAdapterSource, Request, SamplingParams
from flora.model import GPTBigCode, ModelArgs, save_adapter_dir, save_model


def methods(ranks: list[int], baselines: bool = True, compile: str = "off") -> list[Method]:
    """Every method the table can hold; ``compile`` (default, max) adds compiled twins of the
    no-adapter and rank-1 FLoRA rows, measured in the same rounds as the eager ones."""
    out = [
        Method("no adapters", "engine"),
        Method("same flora r1", "engine", AdapterKind.FLORA, 1, distinct=False),
    ]
    if compile != "off":
        out.append(Method("no adapters (compiled)", "engine", compile=compile))
        out.append(Method("flora r1 (compiled)", "engine", AdapterKind.FLORA, 1, compile=compile))
    for r in ranks:
        out.append(Method(f"flora r{r}", "engine", AdapterKind.FLORA, r))
    out.append(Method("ia3", "engine", AdapterKind.IA3, 1))
    for r in ranks:
        out.append(
            Method(f"lora gather r{r}", "engine", AdapterKind.LORA, r, path=KernelPath.LORA_GATHER)
        )
        out.append(
            Method(f"lora bmm r{r}", "engine", AdapterKind.LORA, r, path=KernelPath.LORA_BMM)
        )
    if baselines:
        out.append(Method("peft mixed lora r8", "peft", AdapterKind.LORA, 8))
        out.append(Method("transformers generate", "hf"))
    return out


@dataclass(frozen=True)
class Workload:
    requests: int = 64
    prompt_min: int = 32
    prompt_max: int = 256
    output_tokens: int = 128
    seed: int = 0

    def prompts(self, vocab: int) -> list[list[int]]:
        """Log-uniform prompt lengths (the vLLM throughput benchmark's long tail, scaled)."""
        rng = random.Random(self.seed)
        ratio = self.prompt_max / self.prompt_min
        lengths = [int(self.prompt_min * ratio ** rng.random()) for _ in range(self.requests)]
        return [[rng.randrange(1, vocab) for _ in range(n)] for n in lengths]


def random_adapter_layers(args: ModelArgs, kind: AdapterKind, rank: int, gen: torch.Generator):
    k, d = args.n_embd, args.n_embd + 2 * args.kv_heads * args.head_dim
    layers = {}
    for i in range(args.n_layer):
        name = f"transformer.h.{i}.attn.c_attn"
        if kind is AdapterKind.FLORA:
            a = 1 + 0.1 * torch.randn(rank, k, generator=gen)
            layers[name] = FloraWeights(a, 1 + 0.1 * torch.randn(d, rank, generator=gen))
        elif kind is AdapterKind.LORA:
            a = torch.randn(rank, k, generator=gen) * k**-0.5
            layers[name] = LoraWeights(a, 0.01 * torch.randn(d, rank, generator=gen), 2.0 * rank)
        else:
            layers[name] = IA3Weights(1 + 0.1 * torch.randn(d, generator=gen))
    return layers


def _cast(w, dtype: torch.dtype):
    """Adapters stored in the model's dtype, as a trainer would save them (half the bytes)."""
    if isinstance(w, IA3Weights):
        return IA3Weights(w.scale.to(dtype), w.feedforward)
    if isinstance(w, LoraWeights):
        return LoraWeights(w.A.to(dtype), w.B.to(dtype), w.alpha, w.use_rslora)
    return FloraWeights(w.A.to(dtype), w.B.to(dtype))


class Bench:
    """Owns the model, the adapter files and the runners for one configuration."""

    def __init__(
        self,
        args: ModelArgs,
        workload: Workload,
        *,
        device: str,
        dtype: str,
        method_list: list[Method],
        budget_tokens: int = 2048,
        progress: Callable[[str], None] = print,
    ) -> None:
        self.args, self.workload, self.device, self.dtype = args, workload, device, dtype
        self.methods, self.progress = method_list, progress
        self.config = EngineConfig(device=device, dtype=dtype)
        with torch.device("meta"):  # allocate once, in the target dtype, on the device
            model = GPTBigCode(args).to(self.config.torch_dtype)
        self.model = model.to_empty(device=device).init_weights(seed=workload.seed)
        self.model.eval().requires_grad_(False)
        max_rank = max([m.rank for m in method_list if m.kind] + [1])
        self.root = Path(tempfile.mkdtemp(prefix="flora-bench-"))
        per_token = 2 * args.n_layer * args.kv_heads * args.head_dim * self.model.dtype.itemsize
        room = workload.requests * (workload.prompt_max + workload.output_tokens + 32)
        self.engine_config = dict(
            kv_cache_bytes=int(1.1 * room * per_token),  # every request fits: no preemption
            device=device,
            dtype=dtype,
            adapter_slots=workload.requests,
            max_rank=max_rank,
            max_num_seqs=workload.requests,
            max_num_batched_tokens=budget_tokens,
            adapter_cache_dir=self.root / "cache",
        )
        self.prompts = workload.prompts(args.vocab_size)
        self._write_adapters()
        self._baselines: dict[tuple, object] = {}  # transformers/PEFT models, built on first use
        self.greedy: dict[str, list[list[int]]] = {}  # method → last run's tokens per prompt

    def _names(self, m: Method) -> list[str | None]:
        return adapter_names(m, self.workload.requests)

    def _write_adapters(self) -> None:
        gen = torch.Generator().manual_seed(self.workload.seed + 1)
        made: set[str] = set()
        for m in self.methods:
            for name in self._names(m):
                if name is None or name in made:
                    continue
                self._write_adapter(self.root / "adapters" / name, m, gen)
                made.add(name)
        self.progress(f"wrote {len(made)} adapters under {self.root / 'adapters'}")

    def _write_adapter(self, path: Path, m: Method, gen: torch.Generator) -> None:
        """A random adapter of ``m``'s kind and rank, in the model's dtype, saved at ``path``."""
        layers = random_adapter_layers(self.args, m.kind, m.rank, gen)
        layers = {k: _cast(w, self.model.dtype) for k, w in layers.items()}
        save_adapter_dir(path, m.kind, layers)

    def model_dir(self) -> Path:
        """The model as an HF checkpoint (config.json + safetensors), written on first use, so
        another engine (vLLM) can load exactly these weights."""
        out = self.root / "model"
        if not (out / "config.json").is_file():
            save_model(self.model, out)
        return out

    def adapter_dirs(self, m: Method) -> list[Path]:
        """Each request's adapter directory under ``m``; writes those no engine method wrote
        (own generator: the adapters other methods use stay as they were)."""
        gen = torch.Generator().manual_seed(self.workload.seed + 2)
        dirs = []
        for name in self._names(m):
            if name is None:
                raise ValueError(f"{m.name} has no adapters")
            path = self.root / "adapters" / name
            if not (path / "adapter_config.json").is_file():
                self._write_adapter(path, m, gen)
            dirs.append(path)
        return dirs

    # --- runners ---------------------------------------------------------------------------

    def run(self, m: Method) -> Run:
        if m.runner == "engine":
            return self._run_engine(m)
        return self._run_generate(m)

    def _requests(self, m: Method, max_tokens: int, prompts=None) -> list[Request]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return [
            Request(prompt_ids=p, params=params, adapter=n)
            for p, n in zip(prompts or self.prompts, self._names(m), strict=True)
        ]

    def engine_for(self, m: Method) -> LLMEngine:
        paths = {m.kind: m.path} if m.path else {}
        config = EngineConfig(**self.engine_config, adapter_paths=paths, compile=m.compile)
        source = LocalAdapterSource(root=self.root / "adapters")
        engine = LLMEngine(self.model, None, config, source)
        warm = self._requests(m, 2)  # load every adapter, tune the dispatcher
        drive(engine, warm)
        return engine

    def _run_engine(self, m: Method) -> Run:
        engine = self.engine_for(m)
        tokens: dict[str, list[int]] = {}
        try:
            requests = self._requests(m, self.workload.output_tokens)
            stamps = drive(engine, requests, tokens)
        finally:
            engine.close()
            del engine
        self.greedy[m.name] = [tokens.get(r.request_id, []) for r in requests]
        return _summarise(stamps)

    def _run_generate(self, m: Method) -> Run:
        from flora.bench import hf_baselines

        names = self._names(m)
        key = (m.runner, m.kind, m.rank)
        if key not in self._baselines:
            self.progress(f"building the {m.name} baseline model")
            if m.runner == "peft":
                root = self.root / "adapters"
                built = hf_baselines.peft_model(self.model, self.device, root, names)
            else:
                built = hf_baselines.hf_model(self.model, self.device)
            self._baselines[key] = built
        adapters = names if m.runner == "peft" else None
        return hf_baselines.generate_run(
            self._baselines[key], self.prompts, self.workload.output_tokens, self.device, adapters
        )


def drive(
    engine: LLMEngine, requests: list[Request], tokens: dict[str, list[int]] | None = None
) -> dict[str, list[float]]:
    """Run to completion; per request, the wall time at which each token came out (and, into
    ``tokens``, the token ids, for comparing greedy output with another engine)."""
    stamps: dict[str, list[float]] = {}
    for r in requests:
        engine.add_request(r)
        stamps[r.request_id] = [time.perf_counter()]
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            stamps[o.request_id].extend([now] * len(o.token_ids))
            if tokens is not None:
                tokens.setdefault(o.request_id, []).extend(o.token_ids)
        if not outs and engine.adapters is not None and engine.adapters.pending():
            time.sleep(0.001)
    return stamps


def _summarise(stamps: dict[str, list[float]]) -> Run:
    start = min(s[0] for s in stamps.values())
    end = max(s[-1] for s in stamps.values())
    tokens = sum(len(s) - 1 for s in stamps.values())
    itl = [b - a for s in stamps.values() for a, b in itertools.pairwise(s[1:])]  # after TTFT
    return Run(tokens, end - start, itl)


@dataclass
class Result:
    method: Method
    runs: list[Run]
    # another engine's rows: (requests whose greedy tokens equal ours, requests, which of ours)
    greedy_match: tuple[int, int, str] | None = None

    @property
    def throughput(self) -> float:
        return statistics.median(r.throughput for r in self.runs)

    @property
    def spread(self) -> float:
        values = [r.throughput for r in self.runs]
        return (max(values) - min(values)) / 2 / statistics.median(values)

    def itl_percentile(self, q: float) -> float:
        values = sorted(v for r in self.runs for v in r.itl)
        if not values:
            return math.nan
        return values[min(len(values) - 1, int(q * len(values)))]


def run_all(bench: Bench, rounds: int, warmup: int = 0) -> list[Result]:
    """``warmup`` untimed rounds first: GPU kernels' first-use costs hit no method's figures."""
    for i in range(warmup):
        for m in bench.methods:
            bench.progress(
                f"warm-up {i + 1}/{warmup}  {m.name}: {bench.run(m).throughput:.0f} tok/s"
            )
    results = {m.name: Result(m, []) for m in bench.methods}
    for i in range(rounds):
        for m in bench.methods:
            run = bench.run(m)
            results[m.name].runs.append(run)
            bench.progress(
                f"round {i + 1}/{rounds}  {m.name:<24} {run.throughput:8.0f} tok/s "
                f"({run.tokens} tokens in {run.seconds:.1f}s)"
            )
    return list(results.values())


def poisson_latency(
    bench: Bench, method: Method, rate: float, requests: int, seed: int = 0
) -> tuple[float, float]:
    """Mean and p99 per-token latency (s) with Poisson arrivals at ``rate`` requests/s."""
    engine = bench.engine_for(method)
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    todo = bench._requests(method, bench.workload.output_tokens)[:requests]
    stamps: dict[str, list[float]] = {}
    start = time.perf_counter()
    while todo or engine.has_unfinished():
        now = time.perf_counter() - start
        while todo and arrivals[len(arrivals) - len(todo)] <= now:
            r = todo.pop(0)
            engine.add_request(r)
            stamps[r.request_id] = [time.perf_counter()]
        if not engine.has_unfinished():
            time.sleep(min(0.005, max(0.0, arrivals[len(arrivals) - len(todo)] - now)))
            continue
        outs = engine.step()
        stamp = time.perf_counter()
        for o in outs:
            stamps[o.request_id].extend([stamp] * len(o.token_ids))
    engine.close()
    per_token = [(s[-1] - s[0]) / (len(s) - 1) for s in stamps.values() if len(s) > 1]
    per_token.sort()
    return statistics.mean(per_token), per_token[
        min(len(per_token) - 1, int(0.99 * len(per_token)))
    ]
