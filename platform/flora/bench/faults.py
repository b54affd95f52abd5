"""Faults under load against a real deployment (the world: :mod:`flora.bench.fault_world`).

Each scenario runs :class:`~flora.bench.load.LoadClient` clients while a fault coroutine acts at
fixed times, stamps its events, and then judges the samples by when they were sent and ended.
Used by ``scripts/fault_runs.py`` (the long runs, written to docs/reliability.md) and by
``tests/reliability/test_faults.py`` (a short CI run and the slow full one).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import httpx

from flora.bench.fault_world import (
    FaultResult,
    World,
    fmt_seconds,
    graceful,
    headers_of,
    kill_replica,
    no_hang,
    post_adapter,
    request_adapter,
    sleep_until,
    stamp,
    under_load,
    until_ok,
    world,
)
from flora.bench.load import LoadRun, LoadWorkload, Outcome

__all__ = ["LONG", "SHORT", "FaultResult", "World", "all_scenarios", "render", "world"]


# --- the scenarios ---------------------------------------------------------------------------


async def redis_outage(
    world: World,
    workload: LoadWorkload,
    kill_at: float = 8,
    down_for: float = 8,
    settle: float = 5,
) -> FaultResult:
    """(a) redis-server killed mid-load, restarted ``down_for`` s later."""
    answers: dict[str, tuple[int, str]] = {}
    write_recovery: list[float | None] = []

    async def fault(w: World, events: dict[str, float]) -> None:
        await sleep_until(events, kill_at)
        await asyncio.to_thread(w.redis.stop)
        stamp(events, "redis killed")
        await asyncio.sleep(1)
        answers["write while down"] = await post_adapter(w, w.setup.targets[0].tenant, "new-a1")
        await sleep_until(events, kill_at + down_for)
        await asyncio.to_thread(w.redis.start)
        stamp(events, "redis restarted")
        took, answers["write after restart"] = await until_ok(
            lambda: post_adapter(w, w.setup.targets[0].tenant, "new-a2"), 30
        )
        write_recovery.append(took)

    run, events = await under_load(world, workload, fault)
    r = FaultResult(
        "a. redis-server killed mid-load, then restarted",
        "cached adapters keep serving; registry writes answer 503; full recovery after restart",
        run,
        events,
    )
    down = r.window("redis killed", "redis restarted")
    after = [s for s in r.window("redis restarted") if s.sent > events["redis restarted"] + settle]
    r.figures |= {
        "before": str(r.counts(r.window("load start", "redis killed"))),
        "while down": str(r.counts(down)),
        "after restart": str(r.counts(r.window("redis restarted"))),
        "first request sent after the restart completed after (s)": fmt_seconds(
            r.recovery("redis restarted")
        ),
        "registry write while down": f"{answers['write while down']}",
        "registry write after restart": f"{answers['write after restart']}, "
        f"{fmt_seconds(write_recovery[0])} s after restart",
    }
    r.checks["cached adapters kept serving while redis was down (all complete)"] = bool(down) and (
        all(s.outcome is Outcome.COMPLETE for s in down)
    )
    r.checks["registry write while down answered 503"] = answers["write while down"][0] == 503
    r.checks["registry write after restart succeeded"] = write_recovery[0] is not None
    r.checks[f"every request sent {settle:g} s after the restart completed"] = bool(after) and all(
        s.outcome is Outcome.COMPLETE for s in after
    )
    graceful(r, run.samples, "whole run")
    no_hang(r, workload.request_timeout)
    return r


async def disconnects(world: World, streams: int = 8, after_events: int = 2) -> FaultResult:
    """(e) clients hang up mid-stream: the engine frees their sequences at once."""
    setup = world.setup
    client = setup.client(LoadWorkload(request_timeout=60))
    events = {"load start": time.monotonic()}
    run = LoadRun(client.workload, started=events["load start"])
    async with httpx.AsyncClient(base_url=setup.deployment.url, timeout=60) as http:
        targets = [t for t in setup.targets if t.adapters]
        jobs = [
            client.one(http, t, next(iter(t.adapters)), True, [5, 6, 7, 8], 200, after_events)
            for t in (targets * streams)[:streams]
        ]
        run.samples = list(await asyncio.gather(*jobs))
    stamp(events, "disconnected")
    idle = await world.idle(timeout=30)
    run.seconds = time.monotonic() - run.started
    r = FaultResult(
        "e. clients disconnect mid-stream",
        "the engine's running/KV/slot gauges return to idle at once",
        run,
        events,
    )
    r.figures |= {
        "streams cut": str(run.count(Outcome.DISCONNECTED)),
        "after the disconnects": idle.describe(),
    }
    r.checks[f"all {streams} streams were cut mid-stream"] = run.count(Outcome.DISCONNECTED) == (
        streams
    )
    r.checks["idle within 2 s of the last disconnect"] = idle.idle and idle.seconds < 2
    return r


async def update_delete(
    world: World, workload: LoadWorkload, update_at: float = 8, delete_at: float = 16
) -> FaultResult:
    """(d) a new version of an adapter registered, then the adapter deleted, while the load
    uses it; all clients aim at one tenant with two adapters."""
    target = next(t for t in world.setup.targets if len(t.adapters) == 2)
    name = next(iter(target.adapters))
    labels: dict[str, str] = {"old": target.adapters[name]}

    async def fault(w: World, events: dict[str, float]) -> None:
        await sleep_until(events, update_at)
        target.adapters[name] = None  # type: ignore[assignment]  # either version while it runs
        stamp(events, "update sent")
        status, labels["new"] = await post_adapter(w, target.tenant, name)
        stamp(events, "update done")
        target.adapters[name] = labels["new"] if status == 200 else labels["old"]
        await sleep_until(events, delete_at)
        target.adapters[name] = None  # type: ignore[assignment]
        stamp(events, "delete sent")
        from adapter_registry.client import RegistryClient

        with RegistryClient(w.deployment.url, w.deployment.keys[target.tenant]) as c:
            labels["deleted"] = str(await asyncio.to_thread(c.delete, name))
        stamp(events, "delete done")

    client = world.setup.client(workload)
    client.targets = [target]
    events: dict[str, float] = {}
    load = asyncio.create_task(client.run())
    events["load start"] = time.monotonic()
    await fault(world, events)
    run = await load
    del target.adapters[name]  # later scenarios use its other adapter
    r = FaultResult(
        "d. adapter updated (new version), then deleted, while requests use it",
        "requests sent after an event never use stale weights (x-flora-adapter names the "
        "version); in-flight ones finish on the version they started with",
        run,
        events,
    )
    on = [s for s in run.samples if s.model == name]
    e = events
    in_flight_update = [s for s in on if s.sent < e["update sent"] < s.ended]
    after_update = [s for s in on if e["update done"] <= s.sent < e["delete sent"]]
    in_flight_delete = [s for s in on if s.sent < e["delete sent"] and s.ended > e["delete done"]]
    after_delete = [s for s in on if s.sent >= e["delete done"]]
    r.figures |= {
        "versions": f"{labels['old']} → {labels.get('new')}; deleted {labels.get('deleted')}",
        "in flight at the update": str(headers_of(in_flight_update)),
        "sent after the update": str(headers_of(after_update)),
        "in flight at the delete": str(headers_of(in_flight_delete)),
        "sent after the delete": str(r.counts(after_delete)),
        "everything else": str(r.counts([s for s in run.samples if s.model != name])),
    }
    r.checks["in flight at the update: complete, on the old version"] = all(
        s.outcome is Outcome.COMPLETE and s.adapter_header == labels["old"]
        for s in in_flight_update
    )
    r.checks["sent after the update: complete, on the new version"] = bool(after_update) and all(
        s.outcome is Outcome.COMPLETE and s.adapter_header == labels.get("new")
        for s in after_update
    )
    r.checks["in flight at the delete: finished on the version they started with"] = all(
        s.outcome is Outcome.COMPLETE for s in in_flight_delete
    )
    r.checks["sent after the delete: 404"] = bool(after_delete) and all(
        s.status == 404 for s in after_delete
    )
    graceful(r, [s for s in run.samples if s.model != name], "requests on other models")
    no_hang(r, workload.request_timeout)
    return r


async def s3_outage(
    world: World, workload: LoadWorkload, kill_at: float = 8, down_for: float = 8
) -> FaultResult:
    """(b) the S3 server down: cached adapters keep serving, a new one is refused clearly."""
    tenant = world.setup.targets[0].tenant
    answers: dict[str, tuple[int, str]] = {}
    took: list[float | None] = []
    cold = "cold-b"
    status, label = await post_adapter(world, tenant, cold)  # registered, never fetched
    assert status == 200, label

    async def fault(w: World, events: dict[str, float]) -> None:
        await sleep_until(events, kill_at)
        await asyncio.to_thread(w.s3.stop)
        stamp(events, "s3 killed")
        await asyncio.sleep(1)
        answers["register while down"] = await post_adapter(w, tenant, "new-b1")
        answers["first use of a never-fetched adapter while down"] = await request_adapter(
            w, tenant, cold
        )
        await sleep_until(events, kill_at + down_for)
        await asyncio.to_thread(w.s3.start)
        await asyncio.to_thread(w.create_bucket)  # moto keeps its state in memory: it is gone
        stamp(events, "s3 restarted")

        async def register_and_use() -> tuple[int, str]:
            status, label = await post_adapter(w, tenant, "new-b2")
            if status != 200:
                return status, label
            return await request_adapter(w, tenant, "new-b2")

        seconds, answers["register + use a new adapter after restart"] = await until_ok(
            register_and_use, 30
        )
        took.append(seconds)

    run, events = await under_load(world, workload, fault)
    r = FaultResult(
        "b. S3 server down mid-load, then back",
        "cached adapters keep serving; a brand-new adapter → 503 with a clear message; recovery",
        run,
        events,
    )
    down = r.window("s3 killed", "s3 restarted")
    r.figures |= {
        "while down": str(r.counts(down)),
        "after": str(r.counts(r.window("s3 restarted"))),
    }
    r.figures |= {k: f"{v[0]} {v[1][:200]}" for k, v in answers.items()}
    r.figures["new adapter usable after restart (s)"] = fmt_seconds(took[0])
    r.checks["cached adapters kept serving while S3 was down (all complete)"] = bool(down) and all(
        s.outcome is Outcome.COMPLETE for s in down
    )
    r.checks["register while down → 503"] = answers["register while down"][0] == 503
    first_use = answers["first use of a never-fetched adapter while down"]
    r.checks["a never-fetched adapter while down → 503 with Retry-After"] = first_use[
        0
    ] == 503 and ("Retry-After: None" not in first_use[1])
    r.checks["a new adapter registers and serves after the restart"] = took[0] is not None
    graceful(r, run.samples, "whole run")
    no_hang(r, workload.request_timeout)
    return r


async def replica_killed(world: World, workload: LoadWorkload, kill_at: float = 8) -> FaultResult:
    """(c) the replica's worker process killed (SIGKILL) mid-load; Ray starts a new one."""
    pids: list[int] = []

    async def fault(w: World, events: dict[str, float]) -> None:
        await sleep_until(events, kill_at)
        pids.extend(await w.replica_pids())
        for pid in pids:
            kill_replica(pid)
        stamp(events, "replica killed")

    run, events = await under_load(world, workload, fault)
    r = FaultResult(
        "c. replica process killed (SIGKILL) mid-load",
        "Ray restarts it; in-flight requests end with an error or a retry, none hangs past "
        "its timeout",
        run,
        events,
    )
    in_flight = [s for s in run.samples if s.sent < events["replica killed"] < s.ended]
    recovered = r.recovery("replica killed")
    new_pids = await world.replica_pids()
    r.figures |= {
        "killed": str(pids),
        "in flight at the kill": str(r.counts(in_flight)),
        "their HTTP statuses": str(dict(Counter(s.status for s in in_flight))),
        "sent after the kill": str(r.counts(r.window("replica killed"))),
        "first request sent after the kill completed after (s)": fmt_seconds(recovered),
        "replicas now": str(new_pids),
    }
    r.checks["in flight at the kill: complete, 503 + Retry-After, or a broken stream"] = all(
        s.outcome in (Outcome.COMPLETE, Outcome.REJECTED, Outcome.STREAM_ERROR) for s in in_flight
    )
    r.checks["a new replica process serves"] = bool(set(new_pids) - set(pids))
    r.checks["serving recovered within the run"] = recovered is not None
    no_hang(r, workload.request_timeout)
    return r


# --- all of them, and the report -------------------------------------------------------------

LONG = LoadWorkload(concurrency=32, seconds=30, request_timeout=60)
SHORT = LoadWorkload(concurrency=16, seconds=10, request_timeout=30, max_tokens=(8, 24))


async def all_scenarios(world: World, workload: LoadWorkload) -> list[FaultResult]:
    """In the brief's order of value: a, e, d, b, c (the replica kill last: it restarts)."""
    import dataclasses

    w = dataclasses.replace(workload, tenants=len(world.setup.targets))
    at, down = w.seconds * 0.3, w.seconds * 0.3
    scenarios = [
        lambda: redis_outage(world, w, at, down),
        lambda: disconnects(world),
        lambda: update_delete(world, w, at, 2 * at),
        lambda: s3_outage(world, w, at, down),
        lambda: replica_killed(world, w, at),
    ]
    results = []
    for scenario in scenarios:
        result = await scenario()
        idle = await world.idle(timeout=60)
        result.figures["engine after the scenario"] = idle.describe()
        result.checks["the engine is idle after the scenario"] = idle.idle
        results.append(result)
    return results


def render(result: FaultResult) -> list[str]:
    verdict = "PASS" if result.passed else "FAIL"
    lines = [f"### {result.name} — {verdict}", "", f"Expected: {result.expectation}.", ""]
    lines += [f"- outcomes, whole run ({result.run.seconds:.0f} s): {result.counts()}"]
    lines += [f"- {k}: {v}" for k, v in result.figures.items()]
    lines += [""] + [f"- [{'x' if ok else ' '}] {what}" for what, ok in result.checks.items()]
    return [*lines, ""]
