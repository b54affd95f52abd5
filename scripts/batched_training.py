"""Per-language adapters trained in one batched run vs one run per language: same adapters, timed.

Trains ``n`` rank-1 adapters (one per language) for the same steps both ways on the same base,
checks that every adapter's weights agree, and times both, for large steps and for small ones
(where per-step costs dominate). Writes
``docs/results/batched-training.md``.

    python scripts/batched_training.py --model ~/.cache/flora/models/table1-base  # ~10 min
"""

from __future__ import annotations

import argparse
import itertools
import platform as host
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from flora.model.adapter_files import load_adapter_dir
from flora.model.checkpoint import load_model
from flora.model.tokenizer import Tokenizer
from flora.train.adapter_training import TrainConfig
from flora.train.datasets import load_language_data
from flora.train.training_run import train_adapters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--languages", nargs="+", default=["perl", "tcl", "javascript", "shell"])
    p.add_argument("--kinds", nargs="+", default=["flora", "lora", "ia3"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["4x128", "1x32"],
        help="windows per language and step × tokens per window, one table row each",
    )
    p.add_argument("--out", default="docs/results/batched-training.md")
    args = p.parse_args()
    torch.manual_seed(0)
    data = load_language_data(Tokenizer.from_dir(args.model), None, args.languages, seed=0)
    rows = []

    def batched(config: TrainConfig, tmp: str, tag: str) -> tuple[float, dict]:
        start = time.perf_counter()
        run = train_adapters(load_model(args.model), config, data, Path(tmp, tag), progress=False)
        return time.perf_counter() - start, {lang: run.adapters[lang] for lang in data}

    def one_by_one(config: TrainConfig, tmp: str, tag: str) -> tuple[float, dict]:
        start, dirs = time.perf_counter(), {}
        for lang, d in data.items():
            run = train_adapters(
                load_model(args.model), config, {lang: d}, Path(tmp, tag, lang), progress=False
            )
            dirs[lang] = run.adapters[lang]
        return time.perf_counter() - start, dirs

    with tempfile.TemporaryDirectory() as tmp:  # warm-up: thread pools, allocator, first calls
        batched(TrainConfig(kind="flora", steps=2, batch_size=1, seq_len=16), tmp, "warm-up")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    for (batch_size, seq_len), kind in itertools.product(shapes, args.kinds):
        config = TrainConfig(kind=kind, steps=args.steps, batch_size=batch_size, seq_len=seq_len)
        with tempfile.TemporaryDirectory() as tmp:
            # A B B A: drift on a shared machine cancels out of the means
            t1, together = batched(config, tmp, "b1")
            t2, alone = one_by_one(config, tmp, "s1")
            t3, _ = one_by_one(config, tmp, "s2")
            t4, _ = batched(config, tmp, "b2")
            shape = load_model(args.model).args
            diff = 0.0
            for lang in data:
                a = load_adapter_dir(together[lang], shape).layers
                b = load_adapter_dir(alone[lang], shape).layers
                for path, wa in a.items():
                    for field in ("A", "B", "scale"):
                        ta, tb = getattr(wa, field, None), getattr(b[path], field, None)
                        if isinstance(ta, torch.Tensor):
                            diff = max(diff, float((ta - tb).abs().max()))
        together_s, alone_s = (t1 + t4) / 2, (t2 + t3) / 2
        rows.append((kind, f"{batch_size} × {seq_len}", together_s, alone_s, diff))
        print(
            f"{kind} {batch_size}x{seq_len}: batched {together_s:.1f} s, one by one {alone_s:.1f} s"
        )
    lines = [
        "# Batched multi-adapter training",
        "",
        "```",
        "python " + shlex.join(sys.argv),
        "```",
        "",
        f"{len(data)} languages ({', '.join(data)}), one rank-1 adapter each on `c_attn` of "
        f"`{args.model}`; {args.steps} steps of (windows × tokens) per language, as each row "
        f"says. Machine: {host.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Both ways in one "
        "process after a warm-up, in the order batched, one by one, one by one, batched; times "
        "are the mean of the two runs of each way.",
        "",
        "| kind | step (windows × tokens per language) | one batched run (s) "
        "| one run per language (s) | speed-up | max |Δw| |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for kind, shape, together_s, alone_s, diff in rows:
        lines.append(
            f"| {kind} | {shape} | {together_s:.1f} | {alone_s:.1f} | {alone_s / together_s:.2f}× "
            f"| {diff:.1e} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
