"""Engine benchmark results → table, target checks, Markdown, CSV and a plot under docs/."""

from __future__ import annotations

import math
from pathlib import Path

from flora.bench.engine import Result
from flora.bench.report import write_run_report
from flora.bench.verdict import verdict

NO_ADAPTERS = "no adapters"


def _by_name(results: list[Result]) -> dict[str, Result]:
    return {r.method.name: r for r in results}


def _ms(seconds: float) -> str:
    """Milliseconds, or a dash where a runner reports no per-token times (vLLM's offline API)."""
    return "–" if math.isnan(seconds) else f"{1e3 * seconds:.1f}"


def table(results: list[Result]) -> list[str]:
    base = _by_name(results)[NO_ADAPTERS].throughput
    lines = [
        "| method | tokens/s | × no adapters | per-token latency p50 (ms) | p99 (ms) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.method.name} | {r.throughput:,.0f} ±{100 * r.spread:.0f}% | "
            f"{r.throughput / base:.2f} | {_ms(r.itl_percentile(0.5))} | "
            f"{_ms(r.itl_percentile(0.99))} |"
        )
    return lines


def greedy_lines(results: list[Result]) -> list[str]:
    """Whether another engine's greedy tokens equal ours, request by request (in fp32 they
    must: same weights, same prompts; a difference is a numerics or model-port bug)."""
    out = []
    for r in results:
        if r.greedy_match is None:
            continue
        same, total, ours = r.greedy_match
        out.append(f"- greedy tokens, {r.method.name} vs {ours}: {same}/{total} requests identical")
    return out


def checks(results: list[Result]) -> list[str]:
    named = _by_name(results)
    out = []

    def check(label: str, name: str, versus: str | None, target: float) -> None:
        if name not in named or (versus and versus not in named):
            return
        ref = named[versus or NO_ADAPTERS]
        ratio = named[name].throughput / ref.throughput
        spread = named[name].spread + ref.spread
        result = verdict(ratio, spread, target)
        out.append(f"- {label}: {ratio:.2f}× ±{spread:.0%} (target ≥ {target}×) — {result}")

    check("distinct rank-1 FLoRA vs no adapters", "flora r1", None, 0.95)
    check(
        "distinct rank-1 FLoRA vs PEFT mixed-adapter generate", "flora r1", "peft mixed lora r8", 3
    )
    check("distinct rank-8 LoRA (gather) vs no adapters", "lora gather r8", None, 0.85)
    check(
        "distinct rank-1 FLoRA vs rank-1 bmm LoRA (the paper's baseline)",
        "flora r1",
        "lora bmm r1",
        1,
    )
    check(
        "distinct rank-1 FLoRA vs vLLM no adapter (a bf16 target)", "flora r1", "vllm no adapter", 1
    )
    check("compiled vs eager, no adapters", "no adapters (compiled)", None, 1.2)
    check("compiled vs eager, distinct rank-1 FLoRA", "flora r1 (compiled)", "flora r1", 1.2)
    return out + greedy_lines(results)


def latency_table(rows: list[tuple[str, int, float, float]]) -> list[str]:
    lines = [
        "| method | rank | mean per-token latency (ms) | p99 (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {m} | {r} | {1e3 * mean:.1f} | {1e3 * p99:.1f} |" for m, r, mean, p99 in rows]
    return lines


def write(
    results: list[Result],
    latency: list[tuple[str, int, float, float]],
    out_dir: Path,
    name: str,
    *,
    device,
    header: list[str],
    command: str,
) -> Path:
    body = [*header, "", *table(results), "", "## Targets", "", *checks(results)]
    if latency:
        body += ["", "## Per-token latency under Poisson arrivals", "", *latency_table(latency)]
    columns = ["method", "kind", "rank", "tokens_per_s", "spread", "itl_p50_ms", "itl_p99_ms"]
    columns.append("greedy_match")  # "64/64" on another engine's rows: requests equal to ours
    rows = [
        [
            r.method.name,
            r.method.kind or "",
            r.method.rank,
            f"{r.throughput:.1f}",
            f"{r.spread:.3f}",
            f"{1e3 * r.itl_percentile(0.5):.2f}",
            f"{1e3 * r.itl_percentile(0.99):.2f}",
            f"{r.greedy_match[0]}/{r.greedy_match[1]}" if r.greedy_match else "",
        ]
        for r in results
    ]
    md = write_run_report(
        out_dir,
        name,
        title=f"Engine throughput: {name}",
        command=command,
        body=body,
        csv_rows=[columns, *rows],
        device=device,
    )
    _plot(results, out_dir / f"{name}.png", name)
    return md


def _plot(results: list[Result], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = _by_name(results)[NO_ADAPTERS].throughput
    fig, ax = plt.subplots(figsize=(7, 4))
    for prefix, label in (
        ("flora r", "FLoRA"),
        ("lora gather r", "LoRA gather"),
        ("lora bmm r", "LoRA bmm"),
    ):
        points = sorted(
            (r.method.rank, r.throughput / base)
            for r in results
            if r.method.name.startswith(prefix)
        )
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.axhline(1.0, color="grey", linestyle="--", label="no adapters")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank (every request a different adapter)")
    ax.set_ylabel("throughput / no-adapter throughput")
    ax.set_title(f"Engine throughput vs rank ({title})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
