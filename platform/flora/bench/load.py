"""Load against a running deployment: many concurrent clients, every outcome classified.

``flora bench load`` (and the fault runs in ``scripts/fault_runs.py``) drive a deployment with
``concurrency`` clients for ``seconds``. Each client loops: pick a tenant, one of its adapters
(FLoRA rank 1 or 4, LoRA rank 8, IA3) or the base model, streamed or not, a prompt of random
token ids and ``max_tokens``; send it with a client-side ``request_timeout``; classify what came
back (:class:`Outcome`); after a 429/503 with ``Retry-After`` wait that long before the next.

A request is ``complete`` only if it is well formed: status 200, a ``finish_reason``, ``usage``
that matches the request (prompt tokens = the prompt's length, 1 ≤ completion tokens ≤
max_tokens, = max_tokens when the reason is ``length``), and an ``x-flora-adapter`` header
naming the adapter version that was current when the request was sent. Anything else is
counted, never dropped.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import torch

from flora.adapters import AdapterKind
from flora.bench.serve import Deployment, percentile, random_adapter_dir
from flora.model import ModelArgs

# (name, kind, rank): the mix tenants draw their adapters from
ADAPTER_MIX = (
    ("flora-r1", AdapterKind.FLORA, 1),
    ("flora-r4", AdapterKind.FLORA, 4),
    ("lora-r8", AdapterKind.LORA, 8),
    ("ia3", AdapterKind.IA3, 1),
)


class Outcome(StrEnum):
    COMPLETE = "complete"  # 200, finish_reason, consistent usage and adapter header
    REJECTED = "rejected"  # 429/503 with Retry-After: graceful
    NO_RETRY_AFTER = "429/503 without Retry-After"
    HTTP_ERROR = "other 4xx/5xx"
    STREAM_ERROR = "broken stream"  # 200, then an error event or no finish
    INCONSISTENT = "inconsistent"  # 200 and finished, but usage or adapter header is wrong
    TIMEOUT = "timeout"  # no answer within the client's timeout
    CONNECTION = "connection error"
    DISCONNECTED = "client disconnected"  # on purpose (fault runs)


@dataclass(frozen=True)
class LoadWorkload:
    tenants: int = 16
    concurrency: int = 64
    seconds: float = 60.0
    request_timeout: float = 120.0
    prompt_tokens: tuple[int, int] = (8, 64)  # drawn uniformly
    max_tokens: tuple[int, int] = (8, 64)
    stream_fraction: float = 0.5
    base_fraction: float = 0.1  # requests on the base model, no adapter
    seed: int = 0


@dataclass
class Target:
    """What a client can ask for: a tenant, and its adapters' names → current label."""

    tenant: str
    adapters: dict[str, str]  # name → "name@version", as x-flora-adapter says it


@dataclass
class Sample:
    """One request as its client saw it."""

    tenant: str
    model: str
    stream: bool
    sent: float
    ended: float = 0.0
    outcome: Outcome = Outcome.COMPLETE
    status: int | None = None
    first_token: float | None = None
    completion_tokens: int = 0
    adapter_header: str | None = None
    retry_after: float | None = None
    detail: str = ""

    @property
    def latency(self) -> float:
        return self.ended - self.sent

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent


@dataclass
class LoadRun:
    workload: LoadWorkload
    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0
    seconds: float = 0.0

    def count(self, outcome: Outcome) -> int:
        return sum(s.outcome is outcome for s in self.samples)

    @property
    def complete(self) -> list[Sample]:
        return [s for s in self.samples if s.outcome is Outcome.COMPLETE]

    @property
    def tokens(self) -> int:
        return sum(s.completion_tokens for s in self.complete)

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def make_targets(
    deployment: Deployment,
    tenants: list[str],
    root: Path,
    args: ModelArgs,
    base_model: str,
    seed: int = 0,
) -> list[Target]:
    """Tenant ``k`` gets 1 or 2 adapters (``k`` even: 1) from :data:`ADAPTER_MIX`, in turn."""
    gen = torch.Generator().manual_seed(seed + 1)
    targets, turn = [], 0
    for k, tenant in enumerate(tenants):
        adapters = {}
        for _ in range(1 + k % 2):
            name, kind, rank = ADAPTER_MIX[turn % len(ADAPTER_MIX)]
            turn += 1
            directory = random_adapter_dir(root / tenant / name, kind, rank, args, base_model, gen)
            adapters[name] = deployment.register(tenant, directory, base_model, name).label
        targets.append(Target(tenant, adapters))
    return targets


class LoadClient:
    """Sends requests and classifies their outcome; :meth:`run` loops clients until a deadline."""

    def __init__(
        self, deployment: Deployment, targets: list[Target], workload: LoadWorkload, vocab: int
    ):
        self.deployment, self.targets, self.workload = deployment, targets, workload
        self.vocab = vocab  # prompts are random token ids below this

    def _pick(self, rng: random.Random) -> tuple[Target, str, bool, list[int], int]:
        w = self.workload
        target = rng.choice(self.targets)
        names = list(target.adapters)
        model = "base" if rng.random() < w.base_fraction or not names else rng.choice(names)
        prompt = [rng.randrange(1, self.vocab) for _ in range(rng.randint(*w.prompt_tokens))]
        return target, model, rng.random() < w.stream_fraction, prompt, rng.randint(*w.max_tokens)

    async def one(
        self,
        client: httpx.AsyncClient,
        target: Target,
        model: str,
        stream: bool,
        prompt: list[int],
        max_tokens: int,
        disconnect_after: int | None = None,
    ) -> Sample:
        """One completion; ``disconnect_after`` events, the client hangs up (a fault)."""
        sample = Sample(target.tenant, model, stream, time.monotonic())
        expected = "base" if model == "base" else target.adapters.get(model)
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
        body["stream"] = stream
        headers = {"Authorization": f"Bearer {self.deployment.keys[target.tenant]}"}
        path = f"/tenants/{target.tenant}/v1/completions"
        try:
            async with asyncio.timeout(self.workload.request_timeout):
                async with client.stream("POST", path, json=body, headers=headers) as response:
                    sample.status = response.status_code
                    sample.adapter_header = response.headers.get("x-flora-adapter")
                    if response.status_code != 200:
                        _refused(sample, response, await response.aread())
                    elif stream:
                        await _read_stream(sample, response, len(prompt), disconnect_after)
                    else:
                        _check(sample, json.loads(await response.aread()), len(prompt))
        except TimeoutError:
            sample.outcome, sample.detail = Outcome.TIMEOUT, f"{self.workload.request_timeout}s"
        except httpx.TimeoutException as e:
            sample.outcome, sample.detail = Outcome.TIMEOUT, type(e).__name__
        except (httpx.TransportError, httpx.StreamError) as e:
            sample.outcome, sample.detail = Outcome.CONNECTION, f"{type(e).__name__}: {e}"[:200]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
            sample.outcome, sample.detail = Outcome.STREAM_ERROR, f"{type(e).__name__}: {e}"[:200]
        sample.ended = time.monotonic()
        if sample.outcome is Outcome.COMPLETE:
            _check_adapter(sample, expected, max_tokens)
        return sample

    async def run(self, seed_offset: int = 0) -> LoadRun:
        """``concurrency`` clients, each sending one request after another for ``seconds``."""
        w = self.workload
        result = LoadRun(w, started=time.monotonic())
        deadline = result.started + w.seconds
        limits = httpx.Limits(max_connections=w.concurrency + 8, max_keepalive_connections=None)
        timeout = httpx.Timeout(w.request_timeout, connect=10)
        async with httpx.AsyncClient(
            base_url=self.deployment.url, timeout=timeout, limits=limits
        ) as client:

            async def loop(i: int) -> None:
                rng = random.Random(w.seed * 100_003 + seed_offset * 1_009 + i)
                while time.monotonic() < deadline:
                    sample = await self.one(client, *self._pick(rng))
                    result.samples.append(sample)
                    if sample.retry_after is not None:  # honour it, within the run
                        await asyncio.sleep(min(sample.retry_after, deadline - time.monotonic()))
                    elif sample.outcome is not Outcome.COMPLETE:
                        await asyncio.sleep(0.2)  # no hot loop against a failing server

            await asyncio.gather(*(loop(i) for i in range(w.concurrency)))
        result.seconds = time.monotonic() - result.started
        return result


def _refused(sample: Sample, response: httpx.Response, body: bytes) -> None:
    sample.detail = body[:200].decode(errors="replace")
    if response.status_code in (429, 503):
        retry = response.headers.get("retry-after")
        try:
            sample.retry_after = float(retry) if retry is not None else None
        except ValueError:
            sample.retry_after = None
        sample.outcome = (
            Outcome.REJECTED if sample.retry_after is not None else Outcome.NO_RETRY_AFTER
        )
    else:
        sample.outcome = Outcome.HTTP_ERROR


async def _read_stream(
    sample: Sample, response: httpx.Response, prompt_tokens: int, disconnect_after: int | None
) -> None:
    """SSE chunks: the first with text is the first token; the last has finish_reason + usage."""
    last: dict[str, Any] | None = None
    events = 0
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            sample.outcome, sample.detail = Outcome.STREAM_ERROR, str(chunk["error"])[:200]
            return
        events += 1
        if sample.first_token is None and chunk["choices"][0].get("text"):
            sample.first_token = time.monotonic()
        last = chunk
        if disconnect_after is not None and events >= disconnect_after:
            sample.outcome = Outcome.DISCONNECTED
            return  # leaving the context manager closes the connection mid-stream
    if last is None or not last["choices"][0].get("finish_reason"):
        sample.outcome, sample.detail = Outcome.STREAM_ERROR, "the stream ended without a finish"
        return
    _check(sample, last, prompt_tokens)


def _check(sample: Sample, body: dict[str, Any], prompt_tokens: int) -> None:
    """A finished body (or the last streamed chunk): finish_reason and usage present."""
    choice = body["choices"][0]
    usage = body.get("usage") or {}
    sample.completion_tokens = int(usage.get("completion_tokens", 0))
    if not choice.get("finish_reason"):
        sample.outcome, sample.detail = Outcome.INCONSISTENT, "no finish_reason"
    elif usage.get("prompt_tokens") != prompt_tokens:
        sample.outcome = Outcome.INCONSISTENT
        sample.detail = f"usage.prompt_tokens {usage.get('prompt_tokens')} != {prompt_tokens}"
    else:
        sample.detail = str(choice["finish_reason"])


def _check_adapter(sample: Sample, expected: str | None, max_tokens: int) -> None:
    tokens, reason = sample.completion_tokens, sample.detail
    if not 1 <= tokens <= max_tokens or (reason == "length" and tokens != max_tokens):
        sample.outcome = Outcome.INCONSISTENT
        sample.detail = f"completion_tokens {tokens}, max_tokens {max_tokens}, {reason}"
        return
    if expected is not None and sample.adapter_header != expected:
        sample.outcome = Outcome.INCONSISTENT
        sample.detail = f"x-flora-adapter {sample.adapter_header!r}, expected {expected!r}"


def percentiles(values: list[float], qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[float]:
    return [percentile(values, q) for q in qs]
