"""The kernel benchmark runs end to end and writes a complete table (no timing asserted)."""

from __future__ import annotations

import csv
import random
import subprocess
import sys

from flora.bench.kernels import METHODS, token_slots
from flora.cli import main


def test_token_slots_are_contiguous_requests_with_n_distinct_adapters():
    slots = token_slots(64, 8, random.Random(1))
    assert len(slots) == 64 and sorted(set(slots)) == list(range(8))
    runs = sum(1 for i in range(64) if i == 0 or slots[i] != slots[i - 1])
    assert runs == 8
    assert token_slots(4, 32, random.Random(1)).count(0) == 1  # capped at one per token


def test_bench_kernels_writes_table_csv_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLORA_CACHE_DIR", str(tmp_path / "cache"))
    code = main(
        [
            "bench",
            "kernels",
            "--shapes",
            "1b",
            "--tokens",
            "8",
            "--adapters",
            "2",
            "--ranks",
            "1",
            "2",
            "--dtypes",
            "fp32",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
            "--name",
            "k",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| 1b | fp32 | 8 | 2 | 1 |" in printed and "dispatcher within 10%" in printed
    with open(tmp_path / "k.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == set(METHODS)
    assert len(rows) == 2 * len(METHODS)
    for r in rows:
        if r["method"] == "base":
            assert r["ratio_to_base"] == "1.00"
        assert float(r["seconds"]) > 0
        assert bool(r["dispatcher_choice"]) == r["method"].endswith("_auto")
    md = (tmp_path / "k.md").read_text()
    assert "flora bench kernels" in md and "## Targets" in md and "## Crossover rank" in md
    assert (tmp_path / "k.png").stat().st_size > 1000


def test_unknown_shape_is_a_clear_error(capsys):
    assert main(["bench", "kernels", "--shapes", "70b"]) == 2
    assert "unknown shape" in capsys.readouterr().err


def test_console_script_help():
    for args in ([], ["bench"], ["bench", "kernels"]):
        out = subprocess.run(
            [sys.executable, "-m", "flora.cli", *args, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "usage: flora" in out
