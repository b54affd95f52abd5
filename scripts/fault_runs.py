"""Faults under load: start `serve run deployments/starcoder.yaml` on its own redis-server and
S3-compatible server, run every fault scenario of ``flora.bench.faults`` under load and write
the results into docs/reliability.md ("Faults under load").

    .venv/bin/python scripts/fault_runs.py                 # 32 clients, 30 s per scenario
    .venv/bin/python scripts/fault_runs.py --concurrency 64 --seconds 60

Exits 1 if any scenario's expectation failed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from flora.bench import faults
from flora.bench.load import LoadWorkload

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deployments" / "starcoder.yaml"

SECTION, NEXT = "## Faults under load", "## Bad input"
# what the first runs found, and what was fixed (each fix has a regression test)
FOUND = [
    "What the first runs found, now fixed:",
    "",
    "- **a.** With redis-server down every completion failed: the ingress authenticates the key "
    "and resolves the adapter in the index on each request, so cached adapters could not serve, "
    "and the 503s had no `Retry-After`. Now the registry answers reads it made before the outage "
    "from the last known index for up to 300 s (`adapter_registry/last_known.py`; writes and "
    "never-read lookups still answer 503), and every 503 carries `Retry-After: 2` "
    "(`tests/adapter_registry/test_stale_reads.py`).",
    "- **b.** The first use of an adapter whose fetch met the S3 outage answered 500; it is now "
    "503 + `Retry-After` with the store's message (`tests/serve/test_unavailable.py`).",
    "- **c.** Requests in flight on a killed replica answered 500 (`KeyError` in the ingress on "
    "Ray's `ActorDiedError`); now a whole answer is 503 + `Retry-After` and a stream ends with an "
    "`unavailable` error event (`tests/serve/test_unavailable.py`).",
    "",
    "Still open: after a replica dies, `/metrics` keeps its last `flora_engine_state` series "
    "(the ingress keeps the last report per replica and never drops one), so a dead replica "
    "shows `running` > 0 for ever; and the engine gauges are refreshed only by finished "
    "responses, so `flora bench load` and these runs send a one-token probe before reading "
    "them (`flora.bench.replica_state`). With several replicas a probe refreshes only the one "
    "it reaches.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=faults.LONG.concurrency)
    parser.add_argument("--seconds", type=float, default=faults.LONG.seconds)
    parser.add_argument("--request-timeout", type=float, default=faults.LONG.request_timeout)
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, help="FLORA_CACHE_DIR (the tiny model)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "reliability.md")
    args = parser.parse_args(argv)
    workload = dataclasses.replace(
        faults.LONG,
        concurrency=args.concurrency,
        seconds=args.seconds,
        request_timeout=args.request_timeout,
    )
    workdir = Path(tempfile.mkdtemp(prefix="flora-faults-"))
    cache = args.cache_dir or workdir / "cache"
    with faults.world(workdir, cache, args.tenants, config=CONFIG, cwd=REPO) as world:
        summary = world.setup.summary  # before scenario d deletes an adapter
        print(summary, flush=True)
        results = asyncio.run(faults.all_scenarios(world, workload))
    command = "python scripts/fault_runs.py " + shlex.join(argv or sys.argv[1:])
    lines = section(results, workload, command, summary)
    print("\n".join(lines))
    write_section(args.out, lines)
    print(f"wrote {args.out} ({SECTION})")
    return 0 if all(r.passed for r in results) else 1


def section(
    results: list[faults.FaultResult], workload: LoadWorkload, command: str, summary: str
) -> list[str]:
    import torch

    from flora.bench.report import machine

    passed = sum(r.passed for r in results)
    return [
        SECTION,
        "",
        f"Command: `{command}` — {passed}/{len(results)} scenarios pass. "
        f"Machine: {machine(torch.device('cpu'))}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"`serve run deployments/starcoder.yaml` (a copy on a free port) on a redis-server "
        f"(append-only, fsync always) and moto's S3 server, both subprocesses the script kills "
        f"and restarts. {summary} Load per scenario: {workload.concurrency} clients for "
        f"{workload.seconds:g} s, client timeout {workload.request_timeout:g} s, the mix of "
        "`flora bench load`. Outcomes as in [benchmarks/load.md](benchmarks/load.md); the "
        "short version runs in CI: `tests/reliability/test_faults.py` (slow: every scenario).",
        "",
        *FOUND,
        "",
        *[line for r in results for line in faults.render(r)],
    ]


def write_section(path: Path, lines: list[str]) -> None:
    """Replace the section (up to the next one) in ``path``, keeping the rest."""
    text = path.read_text() if path.exists() else f"# Reliability\n\n{SECTION}\n\n{NEXT}\n"
    start = text.index(SECTION)
    end = text.index(NEXT, start) if NEXT in text[start:] else len(text)
    path.write_text(text[:start] + "\n".join(lines) + "\n" + text[end:])


if __name__ == "__main__":
    raise SystemExit(main())
