"""Turn kernel-benchmark results into the table, the target checks, CSV, Markdown and a plot."""

from __future__ import annotations

import csv
import os
import platform as stdlib_platform
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path as FsPath

import torch

from flora.bench.kernels import Cell, Result, methods_in

# per kind, the methods "best" ranges over (the Triton ones count only where they were timed)
LORA_PATHS = ("lora_gather", "lora_seg", "lora_stacked", "lora_bmm", "lora_bgmv_triton")
FLORA_PATHS = ("flora", "flora_seg", "flora_triton")


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = stdlib_platform.processor() or stdlib_platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )


def ratios(results: list[Result]) -> dict[Cell, dict[str, float | None]]:
    """Per cell: each method's time over the base linear's (None: skipped)."""
    by_cell: dict[Cell, dict[str, float | None]] = defaultdict(dict)
    base = {r.cell: r.seconds for r in results if r.method == "base"}
    for r in results:
        by_cell[r.cell][r.method] = None if r.seconds is None else r.seconds / base[r.cell]
    return by_cell


def _best(row: dict[str, float | None], names: tuple[str, ...]) -> float | None:
    values = [row[n] for n in names if row.get(n) is not None]
    return min(values) if values else None


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _spreads(results: list[Result]) -> dict[tuple[Cell, str], str]:
    """Round-to-round interquartile range of each timing, as "±x%" (half the IQR)."""
    return {(r.cell, r.method): f"±{50 * r.spread:.0f}%" for r in results if r.seconds}


def table(results: list[Result]) -> list[str]:
    chosen = {(r.cell, r.method): r.chosen for r in results if r.chosen}
    methods = methods_in(results)
    lines = [
        "| shape | dtype | T | N | r | base ms (spread) | " + " | ".join(methods[1:]) + " |",
        "|" + "---|" * (6 + len(methods) - 1),
    ]
    base_ms = {r.cell: r.seconds * 1e3 for r in results if r.method == "base"}
    spread = _spreads(results)
    for cell, row in ratios(results).items():
        cells = []
        for m in methods[1:]:
            text = _fmt(row.get(m))
            if m.endswith("_auto") and (cell, m) in chosen:
                text += f" ({chosen[cell, m].split('_', 1)[1]})"
            cells.append(text)
        lines.append(
            f"| {cell.shape} | {cell.dtype} | {cell.tokens} | {cell.adapters} | "
            f"{cell.rank} | {base_ms[cell]:.2f} ({spread[cell, 'base']}) | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def checks(results: list[Result]) -> list[str]:
    """The issue's targets, each stated with the measured number and PASS/MISS."""
    out = []
    rows = ratios(results)
    spread = _spreads(results)
    for cell, row in rows.items():
        if cell.rank == 1 and row.get("flora") is not None:
            flora, lora = row["flora"], _best(row, LORA_PATHS)
            verdict = "PASS" if flora <= 1.15 else "MISS"
            line = (
                f"- {cell.shape} {cell.dtype} T={cell.tokens} N={cell.adapters}: FLoRA r1 = "
                f"{flora:.3f}× base (target ≤ 1.15: {verdict}; spread between rounds: base "
                f"{spread[cell, 'base']}, FLoRA {spread[cell, 'flora']})"
            )
            if lora is not None:
                ok = (flora - 1) <= 0.5 * (lora - 1) or flora <= 1.0
                line += (
                    f"; overhead {flora - 1:+.3f} vs best LoRA {lora - 1:+.3f} "
                    f"(target ≤ half: {'PASS' if ok else 'MISS'})"
                )
            out.append(line)
    worst = defaultdict(float)
    for cell, row in rows.items():
        best_lora = _best(row, LORA_PATHS)
        if cell.rank <= 16 and best_lora is not None:
            key = (cell.shape, cell.dtype, cell.tokens, cell.adapters)
            worst[key] = max(worst[key], best_lora)
    for (shape, dtype, t, n), value in worst.items():
        out.append(
            f"- {shape} {dtype} T={t} N={n}: best LoRA path up to r16 ≤ {value:.2f}× base "
            f"(target ≤ 1.5: {'PASS' if value <= 1.5 else 'MISS'})"
        )
    misses, total = [], 0
    for cell, row in rows.items():
        for auto, names in (("flora_auto", FLORA_PATHS), ("lora_auto", LORA_PATHS)):
            best = _best(row, names)
            if row.get(auto) is None or best is None:
                continue
            total += 1
            if row[auto] > 1.10 * best:
                misses.append(
                    f"{cell.shape}/{cell.dtype}/T={cell.tokens}/N={cell.adapters}/"
                    f"r={cell.rank} {auto} {row[auto]:.2f} ({spread[cell, auto]}) "
                    f"vs best {best:.2f}"
                )
    out.append(
        f"- dispatcher within 10% of the best path: {total - len(misses)}/{total} cells"
        + ("" if not misses else "; misses: " + "; ".join(misses))
    )
    return out


def crossover(results: list[Result]) -> list[str]:
    """Smallest measured rank at which the best LoRA path beats vectorised FLoRA."""
    rows = ratios(results)
    series: dict[tuple, list[tuple[int, float | None, float | None]]] = defaultdict(list)
    for cell, row in rows.items():
        key = (cell.shape, cell.dtype, cell.tokens, cell.adapters)
        series[key].append((cell.rank, row.get("flora"), _best(row, LORA_PATHS)))
    out = []
    for (shape, dtype, t, n), points in series.items():
        points.sort()
        if len(points) < 2:
            continue
        rank = next((r for r, f, lo in points if f is None or (lo is not None and lo < f)), None)
        where = f"r = {rank}" if rank else f"none up to r = {points[-1][0]}"
        out.append(f"- {shape} {dtype} T={t} N={n}: LoRA cheaper than FLoRA from {where}")
    return out


def write_run_report(
    out_dir: FsPath,
    name: str,
    *,
    title: str,
    command: str,
    body: list[str],
    csv_rows: list[list[object]],
    device: torch.device | None = None,
) -> FsPath:
    """``name.md`` (title, command, this machine with ``device``, the date, then ``body``) and
    ``name.csv`` (``csv_rows``, the first one its header) under ``out_dir``; returns the
    markdown's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    text = [
        f"# {title}",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine(device or torch.device('cpu'))}; "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        *body,
    ]
    md.write_text("\n".join(text) + "\n")
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        csv.writer(f).writerows(csv_rows)
    return md


def write(
    results: list[Result], out_dir: FsPath, device: torch.device, name: str, command: str
) -> FsPath:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "shape",
                "dtype",
                "tokens",
                "adapters",
                "rank",
                "method",
                "seconds",
                "ratio_to_base",
                "dispatcher_choice",
            ]
        )
        rows = ratios(results)
        for r in results:
            c = r.cell
            w.writerow(
                [
                    c.shape,
                    c.dtype,
                    c.tokens,
                    c.adapters,
                    c.rank,
                    r.method,
                    "" if r.seconds is None else f"{r.seconds:.6g}",
                    _fmt(rows[c][r.method]),
                    r.chosen,
                ]
            )
    md = [
        f"# Kernel benchmark ({device.type})",
        "",
        f"- command: `{command}`",
        f"- machine: {machine(device)}",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "- numbers: median time of each method over the base linear (`F.linear` with bias) "
        "in the same cell, methods interleaved round by round; spread = half the "
        "interquartile range of a time between rounds, relative to its median (this "
        "machine's noise); — = skipped, predicted "
        "slower than the per-call budget.",
        "- T: tokens in the batch; N: distinct adapters (contiguous requests in shuffled "
        "order); r: rank. `*_auto` is the dispatcher, with the path it ran.",
        f"- plot: [{name}.png]({name}.png), raw data: [{name}.csv]({name}.csv)",
        "",
        "## Targets",
        "",
        *checks(results),
        "",
        "## Crossover rank",
        "",
        *crossover(results),
        "",
        "## Ratios to the base linear",
        "",
        *table(results),
        "",
    ]
    path = out_dir / f"{name}.md"
    path.write_text("\n".join(md))
    plot(results, out_dir / f"{name}.png")
    return path


def plot(results: list[Result], path: FsPath) -> None:
    """Figure 2 (left) style: ratio to base vs rank, one line per method, one panel per setting."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping the plot", file=sys.stderr)
        return
    rows = ratios(results)
    panels = sorted({(c.shape, c.dtype, c.tokens, c.adapters) for c in rows})
    ranks = sorted({c.rank for c in rows})
    if len(ranks) < 2:
        return
    cols = min(4, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, (shape, dtype, t, n) in zip(axes.flat, panels, strict=False):
        for method in methods_in(results)[1:]:
            xs, ys = [], []
            for r in ranks:
                value = rows.get(Cell(shape, dtype, t, n, r), {}).get(method)
                if value is not None:
                    xs.append(r)
                    ys.append(value)
            if xs:
                ax.plot(
                    xs, ys, marker="o", label=method, linestyle="--" if "auto" in method else "-"
                )
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{shape} {dtype} T={t} N={n}", fontsize=9)
        ax.set_xlabel("rank")
        ax.set_ylabel("time / base linear")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
