"""bf16 engine with and without prepacked weights, interleaved (on off off on …), one process.

Reproduce: .venv/bin/python prepack_ab.py OUT_DIR  (tiny config, 64 requests, prompts 32–256,
128 new tokens, greedy: the `flora bench engine` workload)."""

import csv
import statistics
import sys
from pathlib import Path

from flora.bench.engine import Bench, Workload, methods
from flora.model import ModelArgs

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
chosen = [m for m in methods([1], baselines=False) if m.name in ("no adapters", "flora r1")]
bench = Bench(ModelArgs.preset("tiny"), Workload(), device="cpu", dtype="bf16", method_list=chosen)
rows = []
for rnd, order in enumerate([(True, False), (False, True), (True, False), (False, True)]):
    for packed in order:
        bench.engine_config["prepack_weights"] = packed
        for m in chosen:
            run = bench.run(m)
            rows.append(
                {
                    "round": rnd + 1,
                    "prepacked": packed,
                    "method": m.name,
                    "tokens": run.tokens,
                    "seconds": round(run.seconds, 3),
                    "tokens_per_s": round(run.throughput, 1),
                }
            )
            print(rows[-1], flush=True)
with open(out / "prepack-ab.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
lines = [
    "| method | prepacked tok/s (median) | plain tok/s (median) | ratio | spread |",
    "|---|---:|---:|---:|---:|",
]
for m in chosen:
    on = [r["tokens_per_s"] for r in rows if r["method"] == m.name and r["prepacked"]]
    off = [r["tokens_per_s"] for r in rows if r["method"] == m.name and not r["prepacked"]]
    a, b = statistics.median(on), statistics.median(off)
    spread = (max(on) - min(on)) / 2 / a + (max(off) - min(off)) / 2 / b
    lines.append(f"| {m.name} | {a:,.0f} | {b:,.0f} | {a / b:.2f}× | ±{spread:.0%} |")
(out / "prepack-ab.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
