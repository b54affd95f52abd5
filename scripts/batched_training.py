"""Per-language adapters trained in one batched run vs one run per language: same result, faster.

Trains ``n`` rank-1 adapters (one per language) for the same steps both ways on the same base,
checks that every adapter's weights agree, and times both. Writes
``docs/results/batched-training.md``.

    python scripts/batched_training.py --model ~/.cache/flora/models/table1-base
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--out", default="docs/results/batched-training.md")
    args = p.parse_args()
    torch.manual_seed(0)
    data = load_language_data(Tokenizer.from_dir(args.model), None, args.languages, seed=0)
    rows = []
    for kind in args.kinds:
        config = TrainConfig(
            kind=kind, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len
        )
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            together = train_adapters(
                load_model(args.model), config, data, Path(tmp, "together"), progress=False
            )
            batched = time.perf_counter() - start
            start = time.perf_counter()
            alone = {
                lang: train_adapters(
                    load_model(args.model), config, {lang: d}, Path(tmp, lang), progress=False
                )
                for lang, d in data.items()
            }
            sequential = time.perf_counter() - start
            shape = load_model(args.model).args
            diff = 0.0
            for lang in data:
                a = load_adapter_dir(together.adapters[lang], shape).layers
                b = load_adapter_dir(alone[lang].adapters[lang], shape).layers
                for path, wa in a.items():
                    for field in ("A", "B", "scale"):
                        ta, tb = getattr(wa, field, None), getattr(b[path], field, None)
                        if isinstance(ta, torch.Tensor):
                            diff = max(diff, float((ta - tb).abs().max()))
        rows.append((kind, batched, sequential, diff))
        print(
            f"{kind}: batched {batched:.1f} s, one by one {sequential:.1f} s, max |Δw| {diff:.1e}"
        )
    tokens = args.steps * args.batch_size * args.seq_len * len(data)
    lines = [
        "# Batched multi-adapter training",
        "",
        "```",
        "python " + shlex.join(sys.argv),
        "```",
        "",
        f"{len(data)} languages ({', '.join(data)}), one rank-1 adapter each on `c_attn` of "
        f"`{args.model}`; {args.steps} steps × {args.batch_size} windows × {args.seq_len} tokens "
        f"per language ({tokens:,} training tokens per run). Machine: {host.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}. Both ways in one "
        "process, one after the other.",
        "",
        "| kind | one batched run (s) | one run per language (s) | speed-up | max |Δw| |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, batched, sequential, diff in rows:
        lines.append(
            f"| {kind} | {batched:.1f} | {sequential:.1f} | {sequential / batched:.2f}× "
            f"| {diff:.1e} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
