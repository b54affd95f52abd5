"""``flora bench load``'s table and files: one row per concurrency level."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flora.bench.load import LoadRun, Outcome, percentiles
from flora.bench.replica_state import IdleCheck


@dataclass
class LoadResult:
    run: LoadRun
    idle: IdleCheck
    rss_before: int | None  # the replica's RSS before the run, bytes (None: not reachable)
    rss_after: int | None

    @property
    def concurrency(self) -> int:
        return self.run.workload.concurrency


def _ms(values: list[float]) -> list[str]:
    return [f"{1e3 * v:,.0f}" for v in percentiles(values)]


def _mib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.0f}"


COLUMNS = [
    *["clients", "seconds", "requests", *[o.value for o in Outcome], "tokens", "tokens/s"],
    *["latency p50 (ms)", "p90", "p99", "TTFT p50 (ms)", "p90", "p99"],
    *["idle after", "replica RSS before (MiB)", "after"],
]


def row(r: LoadResult) -> list[str]:
    run = r.run
    ok = run.complete
    latency = _ms([s.latency for s in ok])
    ttft = _ms([t for s in ok if (t := s.ttft) is not None])
    idle = f"{r.idle.seconds:.1f}s" if r.idle.idle else "NOT idle"
    return (
        [str(r.concurrency), f"{run.seconds:.0f}", str(len(run.samples))]
        + [str(run.count(o)) for o in Outcome]
        + [f"{run.tokens:,}", f"{run.throughput:,.0f}", *latency, *ttft, idle]
        + [_mib(r.rss_before), _mib(r.rss_after)]
    )


def table(results: list[LoadResult]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " ---: |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return lines


def checks(results: list[LoadResult]) -> list[str]:
    out = []
    graceful = {Outcome.COMPLETE, Outcome.REJECTED}
    for r in results:
        bad = [s for s in r.run.samples if s.outcome not in graceful]
        verdict = (
            "every request completed or was refused with Retry-After"
            if not bad
            else (f"{len(bad)} requests neither completed nor were refused gracefully")
        )
        out.append(f"- {r.concurrency} clients: {verdict}")
        for s in bad[:5]:
            out.append(f"  - {s.outcome.value}: {s.status} {s.detail[:160]}")
        out.append(f"- {r.concurrency} clients, after the load: {r.idle.describe()}")
        if r.idle.stale:
            out.append(f"  - no probe reached {', '.join(r.idle.stale)}: its gauges are stale")
    return out


def write(
    results: list[LoadResult], out_dir: Path, name: str, *, header: list[str], command: str
) -> Path:
    from flora.bench.report import write_run_report

    columns = [
        *["clients", "seconds", "requests", *[o.name.lower() for o in Outcome], "tokens"],
        *["tokens_per_s", "latency_p50_ms", "latency_p90_ms", "latency_p99_ms"],
        *["ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "idle_after_s"],
        *["rss_before_mib", "rss_after_mib"],
    ]
    return write_run_report(
        out_dir,
        name,
        title="Load: concurrent clients against a running deployment",
        command=command,
        body=[*header, "", *table(results), "", *checks(results)],
        csv_rows=[
            columns,
            *([c.replace(",", "").removesuffix("s") for c in row(r)] for r in results),
        ],
    )
