"""Setting up a load run: make tenants and adapters on a reachable deployment, warm them, and
run one concurrency level with the idle check and the replica's RSS around it."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from flora.bench.deployment_args import serve_args
from flora.bench.load import LoadClient, LoadWorkload, Target, make_targets
from flora.bench.load_report import LoadResult
from flora.bench.replica_state import wait_idle
from flora.bench.serve import Deployment


@dataclass
class LoadSetup:
    deployment: Deployment
    targets: list[Target]
    served: str
    model_dir: Path
    vocab: int

    def client(self, workload: LoadWorkload) -> LoadClient:
        return LoadClient(self.deployment, self.targets, workload, self.vocab)

    def workload(self, **fields: Any) -> LoadWorkload:
        return dataclasses.replace(LoadWorkload(tenants=len(self.targets)), **fields)

    @property
    def summary(self) -> str:
        kinds = sorted({name for t in self.targets for name in t.adapters})
        n = sum(len(t.adapters) for t in self.targets)
        return (
            f"Deployment {self.deployment.url} serving `{self.served}` (`{self.model_dir}`): "
            f"{len(self.targets)} tenants, {n} adapters ({', '.join(kinds)})."
        )

    @property
    def method(self) -> list[str]:
        return [
            "Each client loops until the run's time is up: a random tenant, one of its adapters "
            "(10% the base model), streamed or not (50/50), a prompt of 8-64 random token ids, "
            "max_tokens drawn from 8..max, greedy, through `/tenants/{t}/v1/completions`, with "
            "a client timeout. After a 429/503 with Retry-After the client waits that long.",
            "",
            "Outcomes: `complete` = 200 with finish_reason, usage consistent with the request "
            "and `x-flora-adapter` naming the adapter asked for; `rejected` = 429/503 with "
            "Retry-After (graceful); the rest are failures. Latency: send → last byte of "
            "complete requests; TTFT: send → first streamed token (streamed requests only); "
            "tokens/s: completion tokens of complete requests / run time (seconds: from the "
            "start until the last request in flight at the deadline ended). Idle after: the time "
            "from the end of the run until every replica's `flora_engine_state` reads running 0, "
            "waiting 0, all KV blocks free and no adapter slot in use (one-token probes refresh "
            "the gauges). RSS: the replica process (its pid is in the replica label), read "
            "with psutil on this machine.",
        ]


def prepare(
    deployment: Deployment,
    tenants: int,
    model_dir: Path | None,
    config: Path,
    seed: int = 0,
) -> LoadSetup:
    from flora.model import ModelArgs
    from flora.serve.model_dir import prepare_model

    model_dir = model_dir or prepare_model(serve_args(config).model)
    names = deployment.create_tenants(tenants)
    served = deployment.served_model()
    root = Path(tempfile.mkdtemp(prefix="flora-bench-load-"))
    args = ModelArgs.from_dir(model_dir)
    targets = make_targets(deployment, names, root, args, served, seed)
    setup = LoadSetup(deployment, targets, served, model_dir, args.vocab_size)
    asyncio.run(warm(setup))
    return setup


async def warm(setup: LoadSetup) -> None:
    """One 2-token request per adapter: fetched, parsed and placed before the timed run."""
    client = setup.client(LoadWorkload(request_timeout=300))
    async with httpx.AsyncClient(base_url=setup.deployment.url, timeout=300) as http:
        await asyncio.gather(
            *(
                client.one(http, t, name, False, [1, 2, 3], 2)
                for t in setup.targets
                for name in t.adapters
            )
        )


async def run_level(setup: LoadSetup, workload: LoadWorkload, idle_timeout: float) -> LoadResult:
    d, probe_from = setup.deployment, setup.targets[0].tenant
    key = d.keys[probe_from]
    before = await wait_idle(d.url, d.admin_key, probe_from, key, timeout=idle_timeout)
    run = await setup.client(workload).run()
    after = await wait_idle(d.url, d.admin_key, probe_from, key, timeout=idle_timeout)
    rss_before = next((s.rss_bytes for s in before.states.values()), None)
    rss_after = next((s.rss_bytes for s in after.states.values()), None)
    return LoadResult(run, after, rss_before, rss_after)
