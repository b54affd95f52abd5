"""`flora bench serve` end to end against the serving API in-process (no Ray): tenants and
adapters over REST, streamed completions, the in-process engine run, the written table.
No timing is asserted; equal greedy outputs over HTTP and in-process are."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from flora.cli import main
from tests.bench.conftest import deployment_file
from tests.serve.conftest import ADMIN_KEY, Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, micro_dir: Path):
    s = Stack(tmp_path_factory.mktemp("stack"), micro_dir)
    yield s
    s.close()


def test_bench_serve_runs_both_paths_and_writes_the_table(stack, tmp_path, capsys):
    config = deployment_file(stack, tmp_path / "deployment.yaml")
    code = main(
        ["bench", "serve", "--url", stack.url, "--admin-key", ADMIN_KEY, "--config", str(config),
         "--model-dir", str(stack.args.model), "--tenants", "3", "--concurrency", "4",
         "--requests", "7", "--prompt-tokens", "6", "--max-tokens", "5", "--out", str(tmp_path),
         "--name", "serve"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    md = (tmp_path / "serve.md").read_text()
    assert "greedy outputs identical over HTTP and in-process: 7/7" in md
    assert "HTTP vs engine in-process tokens/s" in md
    rows = list(csv.DictReader((tmp_path / "serve.csv").read_text().splitlines()))
    assert [r["path"] for r in rows] == ["HTTP (Ray Serve)", "engine in-process"]
    for row in rows:
        assert row["requests"] == "7" and row["errors"] == "0"
        assert 0 < int(row["tokens"]) <= 7 * 5 and float(row["tokens_per_s"]) > 0
    assert rows[0]["tokens"] == rows[1]["tokens"]
    # the run's tenants each got their own adapter, registered through the API
    tenants = [t.name for t in stack.registry.index.list_tenants() if t.name.startswith("bench-")]
    assert len(tenants) == 3


def test_bench_serve_needs_an_admin_key(monkeypatch, capsys):
    monkeypatch.delenv("FLORA_ADMIN_KEY", raising=False)
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9"]) == 2
    assert "admin-key" in capsys.readouterr().err
