"""`flora bench load` against the serving API in-process (no Ray): tenants and mixed adapters
over REST, concurrent streamed and whole completions, every outcome classified, the idle check,
the written table. No timing is asserted."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from flora.bench.replica_state import parse_states
from flora.cli import main
from flora.serve.config import LimitsConfig
from tests.bench.conftest import deployment_file
from tests.serve.conftest import ADMIN_KEY, Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, micro_dir: Path):
    # a low rate per tenant, so the run meets 429s with Retry-After too
    limits = LimitsConfig(requests_per_second=2, burst=2, max_concurrent=2)
    s = Stack(tmp_path_factory.mktemp("stack"), micro_dir, limits=limits)
    yield s
    s.close()


def test_bench_load_classifies_every_request_and_sees_the_replica_idle(stack, tmp_path, capsys):
    config = deployment_file(stack, tmp_path / "deployment.yaml")
    code = main(
        ["bench", "load", "--url", stack.url, "--admin-key", ADMIN_KEY, "--config", str(config),
         "--tenants", "3", "--concurrency", "6", "--seconds", "4", "--max-tokens", "10",
         "--request-timeout", "30", "--out", str(tmp_path), "--name", "load"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    rows = list(csv.DictReader((tmp_path / "load.csv").read_text().splitlines()))
    assert len(rows) == 1
    row = rows[0]
    assert int(row["complete"]) > 0 and int(row["rejected"]) > 0, row  # 429s with Retry-After
    failures = ["no_retry_after", "http_error", "stream_error", "inconsistent", "timeout"]
    assert all(row[k] == "0" for k in [*failures, "connection"]), row
    assert int(row["requests"]) == int(row["complete"]) + int(row["rejected"])
    assert row["idle_after_s"] != "NOT idle" and float(row["rss_after_mib"]) > 0
    md = (tmp_path / "load.md").read_text()
    assert "every request completed or was refused with Retry-After" in md
    assert ADMIN_KEY not in md and "--admin-key ***" in md  # the command, without the key
    # 3 tenants: 1, 2 and 1 adapters of the mix
    adapters = [r.name for r in stack.registry.index.list_tenants() if r.name.startswith("bench-")]
    assert len(adapters) == 3


def test_parse_states_reads_each_replica_gauges_and_totals():
    text = "\n".join(
        [
            'flora_engine_total{replica="h:1",what="steps"} 12.0',
            'flora_engine_state{replica="h:1",what="running"} 0.0',
            'flora_engine_state{replica="h:1",what="waiting"} 0.0',
            'flora_engine_state{replica="h:1",what="kv_blocks_free"} 10.0',
            'flora_engine_state{replica="h:1",what="kv_blocks_total"} 10.0',
            'flora_engine_state{replica="h:1",what="adapter_slots_in_use"} 0.0',
            'flora_engine_state{replica="h:2",what="running"} 3.0',
        ]
    )
    states = parse_states(text)
    assert states["h:1"].idle and states["h:1"].totals["steps"] == 12
    assert not states["h:2"].idle
