"""Faults under load against `serve run` on a real redis-server and S3-compatible server.

The short test (CI) runs 16 streams for 10 s, kills redis-server mid-load and restarts it, then
cuts streams mid-way: every request completes or gets 429/503 with Retry-After, none hangs, and
the engine returns to idle. The slow test runs every scenario of ``scripts/fault_runs.py``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from flora.bench.load import LoadWorkload
from tests.reliability import faults


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[faults.World]:
    cache = os.environ.get("FLORA_CACHE_DIR")  # CI keeps the tiny model between runs
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("flora-cache")
    with faults.world(tmp_path_factory.mktemp("faults"), cache_dir, tenants=4) as w:
        yield w


def _assert(result: faults.FaultResult) -> None:
    report = "\n".join(faults.render(result))
    assert result.passed, report


def test_redis_outage_under_load_then_disconnects(world: faults.World) -> None:
    load = LoadWorkload(concurrency=16, seconds=10, request_timeout=30, max_tokens=(8, 24))
    _assert(asyncio.run(faults.redis_outage(world, load, kill_at=3, down_for=3, settle=2)))
    _assert(asyncio.run(faults.disconnects(world, streams=4)))


@pytest.mark.slow
def test_every_fault_scenario(world: faults.World) -> None:
    for result in asyncio.run(faults.all_scenarios(world, faults.LONG)):
        _assert(result)
