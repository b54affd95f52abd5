"""Serving throughput through HTTP against the same workload through the engine in-process.

``flora bench serve`` drives a running deployment (``serve run deployments/starcoder.yaml``):
it creates ``tenants`` tenants with one distinct rank-1 FLoRA adapter each (random weights at the
served model's shapes, registered over REST), then ``concurrency`` concurrent streams send
``requests`` completions, request ``i`` from tenant ``i mod tenants`` on its adapter, with a
fixed prompt (``prompt_tokens`` random token ids) and ``max_tokens``, greedy. Then the same
requests, adapters and engine settings (the deployment's YAML) run through an in-process
:class:`~flora.engine.AsyncEngine`, the engine a replica runs, so the ratio is what HTTP, Ray
Serve and the ingress cost. Greedy outputs of the two runs are compared too.

Per request the client records when it sent the request and when each streamed event arrived
(one event per engine step, one token per decode step): TTFT = first event − send, per-token
latency = the gaps between later events; tokens are the response's ``usage``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch

from flora.adapters import AdapterKind
from flora.bench.engine import random_adapter_layers
from flora.engine import (
    AsyncEngine,
    EngineConfig,
    LLMEngine,
    LocalAdapterSource,
    Request,
    SamplingParams,
)
from flora.model import ModelArgs, save_adapter_dir

if TYPE_CHECKING:
    from adapter_registry.records import AdapterRecord

ADAPTER = "bench-r1"  # every tenant's adapter has this name: tenants keep names apart


@dataclass(frozen=True)
class ServeWorkload:
    tenants: int = 16
    concurrency: int = 64
    requests: int = 256
    prompt_tokens: int = 64
    max_tokens: int = 64
    seed: int = 0

    def prompts(self, vocab: int) -> list[list[int]]:
        rng = random.Random(self.seed)
        return [
            [rng.randrange(1, vocab) for _ in range(self.prompt_tokens)]
            for _ in range(self.requests)
        ]


@dataclass
class Sample:
    """One request as its client saw it."""

    sent: float
    events: list[float] = field(default_factory=list)  # arrival of each streamed update
    tokens: int = 0
    text: str = ""
    error: str | None = None


@dataclass(frozen=True)
class Timing:
    """Wall seconds of a run and the CPU it took: cores busy machine-wide and in this process."""

    seconds: float
    machine_cores: float | None  # None where psutil is missing
    own_cores: float


@dataclass
class Measurement:
    name: str
    samples: list[Sample]
    timing: Timing

    @property
    def seconds(self) -> float:
        return self.timing.seconds

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.error is None]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.ok)

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds

    def ttft(self, q: float) -> float:
        return percentile([s.events[0] - s.sent for s in self.ok if s.events], q)

    def per_token(self, q: float) -> float:
        gaps = [b - a for s in self.ok for a, b in zip(s.events, s.events[1:], strict=False)]
        return percentile(gaps, q)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _cpu_seconds() -> tuple[float | None, float]:
    """CPU seconds so far: all cores of the machine (psutil, if installed), this process."""
    own = os.times()
    try:
        import psutil
    except ImportError:
        return None, own.user + own.system
    cores = psutil.cpu_times()
    return sum(cores) - cores.idle - getattr(cores, "iowait", 0.0), own.user + own.system


async def _bounded(n: int, concurrency: int, one: Callable[[int], Any]) -> Timing:
    """Run ``one(i)`` for i < n with at most ``concurrency`` at once; time and CPU taken."""
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:  # a shared iterator: each index is taken once
            await one(i)

    machine, own = _cpu_seconds()
    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    seconds = time.perf_counter() - start
    machine_after, own_after = _cpu_seconds()
    busy = None if machine is None or machine_after is None else machine_after - machine
    return Timing(seconds, None if busy is None else busy / seconds, (own_after - own) / seconds)


# --- the deployment over HTTP ----------------------------------------------------------------


class Deployment:
    """A running FLoRA Serve deployment: its served model, and tenants made for this run."""

    def __init__(self, url: str, admin_key: str, timeout: float = 600.0):
        self.url, self.admin_key, self.timeout = url.rstrip("/"), admin_key, timeout
        self.keys: dict[str, str] = {}

    def served_model(self) -> str:
        """The served model's name, from the first tenant's ``GET /v1/models``."""
        key = next(iter(self.keys.values()))
        models = httpx.get(
            self.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        models.raise_for_status()
        return models.json()["data"][0]["id"]

    def create_tenants(self, n: int) -> list[str]:
        from adapter_registry.client import RegistryClient

        run = secrets.token_hex(3)  # fresh names: a deployment may see several runs
        with RegistryClient(self.url, self.admin_key) as admin:
            for k in range(n):
                tenant = f"bench-{run}-{k:02d}"
                self.keys[tenant] = admin.create_tenant(tenant)[1]
        return list(self.keys)

    def register(
        self, tenant: str, directory: Path, base_model: str, name: str = ADAPTER
    ) -> AdapterRecord:
        from adapter_registry.client import RegistryClient

        with RegistryClient(self.url, self.keys[tenant]) as client:
            return client.register(directory, name, base_model=base_model)

    async def _one(
        self, client: httpx.AsyncClient, tenant: str, prompt: list[int], max_tokens: int
    ) -> Sample:
        body = {
            "model": ADAPTER,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        sample = Sample(time.perf_counter())
        path = f"/tenants/{tenant}/v1/completions"
        async with client.stream("POST", path, json=body, headers=headers) as response:
            if response.status_code != 200:
                sample.error = f"{response.status_code} {(await response.aread())[:200]!r}"
                return sample
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    sample.error = str(chunk["error"])[:200]
                    break
                sample.events.append(now)
                sample.text += chunk["choices"][0]["text"]
                if "usage" in chunk:
                    sample.tokens = chunk["usage"]["completion_tokens"]
        return sample

    async def run(
        self, tenants: list[str], prompts: list[list[int]], workload: ServeWorkload
    ) -> Measurement:
        limits = httpx.Limits(max_connections=workload.concurrency, max_keepalive_connections=None)
        async with httpx.AsyncClient(
            base_url=self.url, timeout=self.timeout, limits=limits
        ) as client:
            # warm-up: every tenant's adapter is resolved, fetched and loaded into a slot
            await asyncio.gather(*(self._one(client, t, prompts[0], 2) for t in tenants))
            samples: list[Sample | None] = [None] * len(prompts)

            async def one(i: int) -> None:
                tenant = tenants[i % len(tenants)]
                samples[i] = await self._one(client, tenant, prompts[i], workload.max_tokens)

            timing = await _bounded(len(prompts), workload.concurrency, one)
        return Measurement("HTTP (Ray Serve)", [s for s in samples if s is not None], timing)


# --- the same workload through the engine in this process ------------------------------------


async def run_direct(
    model_dir: Path,
    config: EngineConfig,
    adapters: dict[str, Path],
    tenants: list[str],
    prompts: list[list[int]],
    workload: ServeWorkload,
) -> Measurement:
    """``adapters`` maps tenant → adapter directory; requests run as in :meth:`Deployment.run`."""
    source = LocalAdapterSource(adapters=dict(adapters))
    engine = AsyncEngine(LLMEngine.from_pretrained(model_dir, config, source)).start()

    async def one_request(tenant: str, prompt: list[int], max_tokens: int) -> Sample:
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        request = Request(prompt_ids=prompt, params=params, adapter=tenant, tenant=tenant)
        sample = Sample(time.perf_counter())
        async for out in engine.generate(request):
            if out.token_ids:
                sample.events.append(time.perf_counter())
            sample.text += out.text
            sample.tokens = out.usage.completion_tokens
            if out.error:
                sample.error = out.error
        return sample

    try:
        await asyncio.gather(*(one_request(t, prompts[0], 2) for t in tenants))  # warm-up
        samples: list[Sample | None] = [None] * len(prompts)

        async def one(i: int) -> None:
            tenant = tenants[i % len(tenants)]
            samples[i] = await one_request(tenant, prompts[i], workload.max_tokens)

        timing = await _bounded(len(prompts), workload.concurrency, one)
    finally:
        engine.shutdown()
    return Measurement("engine in-process", [s for s in samples if s is not None], timing)


def write_adapters(
    root: Path, tenants: list[str], args: ModelArgs, base_model: str, seed: int
) -> dict[str, Path]:
    """One distinct rank-1 FLoRA adapter per tenant (random weights at the model's shapes)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        t: random_adapter_dir(root / t, AdapterKind.FLORA, 1, args, base_model, gen)
        for t in tenants
    }


def random_adapter_dir(
    directory: Path,
    kind: AdapterKind,
    rank: int,
    args: ModelArgs,
    base_model: str,
    gen: torch.Generator,
) -> Path:
    """An adapter of ``kind`` and ``rank`` on every layer's ``c_attn`` (random weights at the
    model's shapes), written as the registry accepts it."""
    layers = random_adapter_layers(args, kind, rank, gen)
    return save_adapter_dir(directory, kind, layers, base_model=base_model)


# --- report ----------------------------------------------------------------------------------


def table(results: list[Measurement]) -> list[str]:
    lines = [
        "| path | requests | errors | tokens | seconds | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) "
        "| per-token p50 (ms) | per-token p99 (ms) | CPU cores busy: machine | this process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in results:
        machine = m.timing.machine_cores
        lines.append(
            f"| {m.name} | {len(m.samples)} | {m.errors} | {m.tokens:,} | {m.seconds:.1f} | "
            f"{m.throughput:,.0f} | {1e3 * m.ttft(0.5):.0f} | {1e3 * m.ttft(0.99):.0f} | "
            f"{1e3 * m.per_token(0.5):.1f} | {1e3 * m.per_token(0.99):.1f} | "
            f"{'—' if machine is None else f'{machine:.2f}'} | {m.timing.own_cores:.2f} |"
        )
    return lines


def checks(http: Measurement, direct: Measurement | None, workload: ServeWorkload) -> list[str]:
    full = sum(s.tokens == workload.max_tokens for s in http.ok)
    out = [f"- HTTP requests that ran to max_tokens: {full}/{len(http.samples)}"]
    if direct is None:
        return out
    ratio = http.throughput / direct.throughput
    verdict = "met" if ratio >= 0.85 else "MISSED"
    out.insert(
        0, f"- HTTP vs engine in-process tokens/s: {ratio:.2f}× (target ≥ 0.85×) — {verdict}"
    )
    same = sum(
        a.error is None and a.text == b.text
        for a, b in zip(http.samples, direct.samples, strict=True)
    )
    out.append(f"- greedy outputs identical over HTTP and in-process: {same}/{len(http.samples)}")
    return out


def write(
    results: list[Measurement],
    lines: list[str],
    out_dir: Path,
    name: str,
    *,
    header: list[str],
    command: str,
) -> Path:
    from flora.bench.report import write_run_report

    columns = ["path", "requests", "errors", "tokens", "seconds", "tokens_per_s", "ttft_p50_ms",
               "ttft_p99_ms", "per_token_p50_ms", "per_token_p99_ms", "machine_cores_busy",
               "own_cores_busy"]  # fmt: skip
    rows = [
        [m.name, len(m.samples), m.errors, m.tokens, f"{m.seconds:.2f}",
         f"{m.throughput:.1f}", f"{1e3 * m.ttft(0.5):.1f}", f"{1e3 * m.ttft(0.99):.1f}",
         f"{1e3 * m.per_token(0.5):.2f}", f"{1e3 * m.per_token(0.99):.2f}",
         "" if m.timing.machine_cores is None else f"{m.timing.machine_cores:.2f}",
         f"{m.timing.own_cores:.2f}"]
        for m in results
    ]  # fmt: skip
    return write_run_report(
        out_dir,
        name,
        title="Serving throughput: HTTP through Ray Serve vs the engine in-process",
        command=command,
        body=[*header, "", *table(results), "", *lines],
        csv_rows=[columns, *rows],
    )
