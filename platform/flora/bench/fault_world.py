"""The world the fault scenarios (:mod:`flora.bench.faults`) run in: ``serve run`` on a
persistent redis-server and an S3-compatible server (moto), each a subprocess that can be killed
and restarted; what one scenario measures (:class:`FaultResult`); the helpers they share."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from flora.bench.load import LoadRun, LoadWorkload, Outcome, Sample
from flora.bench.load_setup import LoadSetup, prepare
from flora.bench.processes import RedisServer, S3Server
from flora.bench.replica_state import read_states, wait_idle
from flora.bench.serve import Deployment
from flora.bench.serve_run import ServeRun

BUCKET = "flora-faults"
GRACEFUL = {Outcome.COMPLETE, Outcome.REJECTED}


@dataclass
class World:
    """A deployment on redis + S3 and the tenants and adapters made for the load."""

    serve: ServeRun
    redis: RedisServer
    s3: S3Server
    setup: LoadSetup
    workdir: Path
    spares: int = 0

    @property
    def deployment(self) -> Deployment:
        return self.setup.deployment

    def create_bucket(self) -> None:
        import boto3

        boto3.client(
            "s3",
            endpoint_url=self.s3.url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket=BUCKET)

    async def idle(self, timeout: float = 60.0):
        d, tenant = self.deployment, self.setup.targets[0].tenant
        return await wait_idle(d.url, d.admin_key, tenant, d.keys[tenant], timeout=timeout)

    def spare_adapter(self, name: str) -> Path:
        """A fresh rank-1 FLoRA adapter directory (random weights at the served shapes)."""
        import torch

        from flora.adapters import AdapterKind
        from flora.bench.serve import random_adapter_dir
        from flora.model import ModelArgs

        self.spares += 1
        gen = torch.Generator().manual_seed(1000 + self.spares)
        args = ModelArgs.from_dir(self.setup.model_dir)
        directory = self.workdir / "spare" / f"{name}-{self.spares}"
        return random_adapter_dir(directory, AdapterKind.FLORA, 1, args, self.setup.served, gen)

    async def replica_pids(self) -> list[int]:
        async with httpx.AsyncClient(base_url=self.deployment.url, timeout=30) as client:
            states = await read_states(client, self.deployment.admin_key)
        return [int(r.rpartition(":")[2]) for r in states]


@contextmanager
def world(
    workdir: Path,
    cache_dir: Path,
    tenants: int = 8,
    *,
    config: Path,
    cwd: Path | None = None,
) -> Iterator[World]:
    """redis (append-only, fsync always: a restart keeps tenants and adapters) + moto S3 +
    ``serve run <config>`` (in ``cwd``) on them; tenants with mixed adapters, warmed."""
    with ExitStack() as stack:
        redis = RedisServer(workdir / "redis", persistent=True).start()
        stack.callback(redis.stop)
        s3 = S3Server(workdir / "s3").start()
        stack.callback(s3.stop)
        env = {
            "AWS_ENDPOINT_URL": s3.url,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "FLORA_REDIS_URL": redis.url,
            "FLORA_STORE_URL": f"s3://{BUCKET}/adapters",
        }
        run = ServeRun(workdir, cache_dir, config, extra_env=env, cwd=cwd)
        w = World(run, redis, s3, None, workdir)  # type: ignore[arg-type]
        w.create_bucket()
        run.start()
        stack.callback(run.stop)
        deployment = Deployment(run.url, run.admin_key)
        w.setup = prepare(deployment, tenants, run.model_dir, Path("unused"))
        yield w


# --- one scenario ----------------------------------------------------------------------------


@dataclass
class FaultResult:
    name: str
    expectation: str
    run: LoadRun
    events: dict[str, float]  # event → monotonic time
    checks: dict[str, bool] = field(default_factory=dict)  # what was checked → passed
    figures: dict[str, str] = field(default_factory=dict)  # recovery times, counts, …

    @property
    def passed(self) -> bool:
        return all(self.checks.values())

    def counts(self, samples: list[Sample] | None = None) -> dict[str, int]:
        found = Counter(s.outcome.value for s in (self.run.samples if samples is None else samples))
        return dict(found.most_common())

    def window(self, start: str, end: str | None = None) -> list[Sample]:
        """Samples sent between two events (``end`` None: until the run's end)."""
        t0, t1 = self.events[start], self.events[end] if end else float("inf")
        return [s for s in self.run.samples if t0 <= s.sent < t1]

    def recovery(self, after: str) -> float | None:
        """Seconds from ``after`` until a request sent after it had completed (its last byte)."""
        t0 = self.events[after]
        done = [s.ended for s in self.run.samples if s.sent >= t0 and s.outcome is Outcome.COMPLETE]
        return min(done) - t0 if done else None


Fault = Callable[[World, dict[str, float]], Awaitable[None]]


async def under_load(world: World, workload: LoadWorkload, fault: Fault) -> tuple[LoadRun, dict]:
    """Run the load and ``fault`` together; ``fault`` stamps its events in the dict it gets."""
    events: dict[str, float] = {}
    client = world.setup.client(workload)
    load = asyncio.create_task(client.run())
    events["load start"] = time.monotonic()
    await fault(world, events)
    return await load, events


def stamp(events: dict[str, float], name: str) -> None:
    events[name] = time.monotonic()


async def sleep_until(events: dict[str, float], seconds: float) -> None:
    await asyncio.sleep(max(0.0, events["load start"] + seconds - time.monotonic()))


def no_hang(result: FaultResult, timeout: float) -> None:
    """Nothing ran past the client's timeout (a hang would show as ``timeout``)."""
    longest = max((s.latency for s in result.run.samples), default=0.0)
    result.checks[f"no request hung (timeouts 0, longest {longest:.1f}s < {timeout:g}s)"] = (
        result.run.count(Outcome.TIMEOUT) == 0 and longest < timeout
    )


def kill_replica(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


# --- helpers the scenarios share ------------------------------------------------------------
async def post_adapter(world: World, tenant: str, name: str) -> tuple[int, str]:
    """Register a fresh random adapter for ``tenant`` over REST; (status, message)."""
    from adapter_registry import RegistryError

    directory = world.spare_adapter(name)
    try:
        record = await asyncio.to_thread(
            world.deployment.register, tenant, directory, world.setup.served, name
        )
        return 200, record.label
    except RegistryError as e:
        return e.status, str(e)


async def until_ok(
    action: Callable[[], Awaitable[tuple[int, str]]], timeout: float, every: float = 0.5
) -> tuple[float | None, tuple[int, str]]:
    """Retry ``action`` until it returns 200: (seconds it took or None, the last answer)."""
    start, last = time.monotonic(), (0, "")
    while time.monotonic() - start < timeout:
        last = await action()
        if last[0] == 200:
            return time.monotonic() - start, last
        await asyncio.sleep(every)
    return None, last


def graceful(result: FaultResult, samples: list[Sample], what: str) -> None:
    bad = Counter(s.outcome.value for s in samples if s.outcome not in GRACEFUL)
    result.checks[
        f"{what}: every request completed or got 429/503 + Retry-After {dict(bad)}"
    ] = not bad


def fmt_seconds(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.1f}"


def headers_of(samples: list[Sample]) -> dict[str, int]:
    return dict(Counter(f"{s.outcome.value} {s.adapter_header}" for s in samples))


async def request_adapter(world: World, tenant: str, name: str) -> tuple[int, str]:
    """One request on an adapter no replica has fetched yet: (status, message)."""
    async with httpx.AsyncClient(base_url=world.deployment.url, timeout=60) as http:
        response = await http.post(
            f"/tenants/{tenant}/v1/completions",
            json={"model": name, "prompt": [1, 2], "max_tokens": 2},
            headers={"Authorization": f"Bearer {world.deployment.keys[tenant]}"},
        )
    retry = response.headers.get("retry-after")
    return response.status_code, f"{response.text[:200]} (Retry-After: {retry})"
