"""The fault scenarios under load (:mod:`flora.bench.faults`, which ``scripts/fault_runs.py``
runs too), in a world on this checkout's ``deployments/starcoder.yaml``."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from flora.bench import fault_world
from flora.bench.faults import (
    LONG,
    SHORT,
    FaultResult,
    World,
    all_scenarios,
    disconnects,
    redis_outage,
    render,
    replica_killed,
    s3_outage,
    update_delete,
)
from tests.e2e.conftest import CONFIG, REPO

__all__ = [
    "LONG",
    "SHORT",
    "FaultResult",
    "World",
    "all_scenarios",
    "disconnects",
    "redis_outage",
    "render",
    "replica_killed",
    "s3_outage",
    "update_delete",
    "world",
]


def world(workdir: Path, cache_dir: Path, tenants: int = 8) -> AbstractContextManager[World]:
    """:func:`flora.bench.fault_world.world` running ``serve run`` on the demo YAML."""
    return fault_world.world(workdir, cache_dir, tenants, config=CONFIG, cwd=REPO)
