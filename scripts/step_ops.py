"""Operators per engine step: what the host issues each step, counted, not timed.

    python scripts/step_ops.py --out runs/step-ops [--label NAME] [--device cuda]

On a GPU every non-view operator is (at least) one kernel launch the host pays for, so the
count per decode step is the host-bound engine's cost, and unlike a timing it does not move
with a noisy machine. Also reports host wall time per decode step on a micro model, where the
arithmetic is negligible and what is left is overhead. Writes ``step-ops.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import profile

from flora.bench.engine import Bench, Workload, methods
from flora.model import ModelArgs

# Operators that only re-describe memory: no kernel on any device.
VIEWS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::transpose",
    "aten::t", "aten::permute", "aten::select", "aten::slice", "aten::expand", "aten::unsqueeze",
    "aten::squeeze", "aten::split", "aten::split_with_sizes", "aten::narrow", "aten::alias",
    "aten::detach", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::unbind",
    "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::result_type",
    "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::contiguous",
    "aten::view_as", "aten::chunk", "aten::to", "aten::_to_copy", "aten::lift",
}  # fmt: skip
MICRO = ModelArgs(vocab_size=512, n_positions=1024, n_embd=64, n_layer=8, n_head=4)
CONFIGS = {"tiny": lambda: ModelArgs.preset("tiny"), "micro (host-bound)": lambda: MICRO}
METHODS = ("no adapters", "flora r1", "lora gather r8")


def _issued(event) -> bool:
    """A non-view aten operator called from Python (no aten operator above it): at least one
    kernel launch, and a trip through the dispatcher, per call."""
    if not event.name.startswith("aten::") or event.name in VIEWS:
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return False
        parent = parent.cpu_parent
    return True


def issued_ops(events) -> int:
    return sum(_issued(e) for e in events)


def _profiled(engine) -> tuple[int, int]:
    """Operators issued and attention calls made by one engine step."""
    with torch.inference_mode(), profile() as prof:
        engine.step()
    events = prof.events()
    sdpa = sum(e.name == "aten::scaled_dot_product_attention" for e in events)
    return issued_ops(events), sdpa


def measure(config: str, method: str, decode_steps: int, device: str) -> dict:
    args = CONFIGS[config]()
    chosen = [m for m in methods([1, 8], baselines=False) if m.name == method]
    work = Workload(output_tokens=decode_steps + 4)
    bench = Bench(
        args, work, device=device, dtype="fp32", method_list=chosen, progress=lambda _: None
    )
    engine = bench.engine_for(chosen[0])
    for r in bench._requests(chosen[0], work.output_tokens):
        engine.add_request(r)
    chunks = engine.scheduler.schedule  # the first step's plan, counted before it runs
    first = {}

    def counting_schedule():
        plan = chunks()
        first.setdefault("chunks", len(plan.chunks))
        return plan

    engine.scheduler.schedule = counting_schedule
    prefill_ops, prefill_sdpa = _profiled(engine)  # the first step: prefill chunks only
    engine.scheduler.schedule = chunks
    while any(s.num_computed < len(s.prompt_ids) for s in engine.sequences.values()):
        engine.step()  # finish prefilling: what follows are pure decode steps
    engine.step()
    decode_ops, decode_sdpa = _profiled(engine)
    walls = []
    for _ in range(decode_steps):
        start = time.perf_counter()
        engine.step()  # ends on the device→host copy of the sampled tokens: a full step
        walls.append(time.perf_counter() - start)
    engine.close()
    return {
        "config": config,
        "method": method,
        "layers": args.n_layer,
        "prefill_step_chunks": first["chunks"],
        "prefill_step_ops": prefill_ops,
        "prefill_step_sdpa": prefill_sdpa,
        "decode_step_ops": decode_ops,
        "decode_step_sdpa": decode_sdpa,
        "decode_step_ms_median": round(1e3 * statistics.median(walls), 2),
        "decode_step_ms_min": round(1e3 * min(walls), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--label", default="", help="tag every row (e.g. the git revision)")
    parser.add_argument("--decode-steps", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    opts = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for config in CONFIGS:
        for method in METHODS:
            measured = measure(config, method, opts.decode_steps, opts.device)
            row = {"label": opts.label, "device": opts.device, **measured}
            print(" | ".join(str(v) for v in row.values()), flush=True)
            rows.append(row)
    opts.out.mkdir(parents=True, exist_ok=True)
    with open(opts.out / "step-ops.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if f.tell() == 0:
            writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in r.values()) + " |" for r in rows]
    (opts.out / f"step-ops{'-' + opts.label if opts.label else ''}.md").write_text(
        "\n".join(lines) + "\n"
    )
    print(f"wrote {opts.out}/step-ops.csv")


if __name__ == "__main__":
    main()
