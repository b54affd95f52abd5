"""The ``flora`` command line."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from adapter_registry import cli as registry_cli
from flora import __version__, generate_cli
from flora.bench import engine_cli as bench_engine_cli
from flora.bench import load_cli as bench_load_cli
from flora.bench import serve_cli as bench_serve_cli
from flora.k8s import cli as k8s_cli
from flora.train import convert_cli, eval_cli, train_cli

QUICK = {"shapes": ["1b"], "tokens": [64, 512], "adapters": ["32"], "ranks": [1, 4, 16]}
FULL = {
    "shapes": ["1b"],
    "tokens": [64, 512],
    "adapters": ["1", "8", "32", "T"],
    "ranks": [1, 2, 4, 8, 16, 32, 64],
}


def _bench_kernels(args: argparse.Namespace) -> int:
    import torch

    from flora.bench import kernels, report

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    preset = QUICK if args.quick else FULL
    pick = {key: getattr(args, key) or value for key, value in preset.items()}
    dtypes = args.dtypes or (["bf16", "fp16"] if device.type == "cuda" else ["bf16", "fp32"])
    unknown = [s for s in pick["shapes"] if s not in kernels.SHAPES]
    if unknown:
        print(
            f"error: unknown shape(s) {unknown}; choose from {list(kernels.SHAPES)}",
            file=sys.stderr,
        )
        return 2
    cells = list(
        kernels.grid(pick["shapes"], dtypes, pick["tokens"], pick["adapters"], pick["ranks"])
    )
    results = kernels.run(
        cells,
        device,
        cache_bytes=args.cache_mib << 20,
        max_call_seconds=args.max_call_seconds,
        rounds=args.rounds or (5 if args.quick else 7),
    )
    name = args.name or ("kernels" if device.type == "cpu" else f"kernels-{device.type}")
    path = report.write(results, Path(args.out), device, name, args.command_line)
    print("\n".join(report.table(results)))
    print("\n".join(["", *report.checks(results), *report.crossover(results)]))
    print(f"\nwrote {path} (+ .csv, .png)")
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from flora.model.config import ModelArgs
    from flora.model.tiny import build as tiny_model

    options = {
        "preset": args.preset,
        "vocab_size": args.vocab_size,
        "train_seconds": args.train_minutes * 60,
        "languages": args.languages,
        "seed": args.seed,
    }
    out = Path(args.out_dir)
    try:
        wanted = tiny_model.TinyModelOptions(**options).resolved()
        if not args.force and tiny_model.read_record(out, wanted) is not None:
            print(f"{out} already holds a model built with these options (--force rebuilds it)")
        else:
            shape = ModelArgs.preset(args.preset)
            print(
                f"building {args.preset} ({shape.n_layer} layers × {shape.n_embd}, "
                f"vocab ≤ {wanted.vocab_size}) on {', '.join(args.languages or ['all languages'])} "
                f"found here, {args.train_minutes:g} min of pre-training, seed {args.seed} → {out}"
            )
            tiny_model.make_tiny_model(out, **options)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    record = tiny_model.read_record(out)
    assert record is not None, f"{out} was just built or checked"
    sample = record["sample"]
    print(f"greedy sample: {sample['prompt'] + sample['completion']!r}")
    print(
        f"{out}: {record['parameters'] / 1e6:.2f}M params, vocab {record['vocab_size']}, "
        f"held-out loss {record['final_loss']:.3f} (untrained {record['initial_loss']:.3f}), "
        f"{len(record['languages'])} languages"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flora", description=__doc__)
    parser.add_argument("--version", action="version", version=f"flora {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="benchmarks that print a table and write docs/")
    bench_commands = bench.add_subparsers(dest="bench", required=True)
    k = bench_commands.add_parser(
        "kernels",
        help="adapter paths vs the base linear on StarCoder c_attn shapes (paper Fig. 2, left)",
        description="Time every adapter path against the base linear and write "
        "docs/benchmarks/kernels.{md,csv,png}.",
    )
    k.add_argument("--quick", action="store_true", help="small grid, under 2 minutes on a CPU")
    k.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    k.add_argument(
        "--dtypes",
        nargs="+",
        choices=["fp32", "bf16", "fp16"],
        help="default: bf16 fp32 on CPU, bf16 fp16 on CUDA",
    )
    k.add_argument("--shapes", nargs="+", help="c_attn shapes: 1b 3b 15b (default: 1b)")
    k.add_argument("--tokens", nargs="+", type=int, help="tokens per batch (default: 64 512)")
    k.add_argument(
        "--adapters",
        nargs="+",
        help="distinct adapters per batch; T means one per token (default: 1 8 32 T)",
    )
    k.add_argument("--ranks", nargs="+", type=int, help="default: 1 2 4 8 16 32 64")
    k.add_argument("--rounds", type=int, help="interleaved timing rounds (default 7; quick 5)")
    k.add_argument(
        "--max-call-seconds",
        type=float,
        default=1.0,
        help="skip a method whose predicted call time exceeds this (default 1.0)",
    )
    k.add_argument(
        "--cache-mib",
        type=int,
        default=2048,
        help="materialised-weight cache for segmented FLoRA (default 2048 MiB)",
    )
    k.add_argument("--out", default="docs/benchmarks", help="output folder")
    k.add_argument("--name", help="file stem (default: kernels, or kernels-cuda)")
    k.set_defaults(handler=_bench_kernels)
    bench_engine_cli.add_parser(bench_commands)
    bench_serve_cli.add_parser(bench_commands)
    bench_load_cli.add_parser(bench_commands)
    generate_cli.add_parser(commands)
    t = commands.add_parser(
        "make-tiny-model",
        help="build a small StarCoder-shaped checkpoint + tokenizer from code on this machine",
        description="Collect source code found on this machine, train a byte-level BPE, "
        "initialise (and optionally pre-train) a GPTBigCode model, and save both in HF format "
        "for `flora` and transformers. Reuses OUT_DIR if it was built with the same options.",
    )
    t.add_argument("out_dir", metavar="OUT_DIR", help="where to write the model")
    t.add_argument(
        "--preset", choices=["tiny", "mini", "micro"], default="tiny", help="default: tiny"
    )
    t.add_argument("--vocab-size", type=int, help="BPE vocabulary (default: the preset's)")
    t.add_argument(
        "--train-minutes", type=float, default=0.0, help="pre-training budget (default 0)"
    )
    t.add_argument("--languages", nargs="+", help="corpus languages (default: all found here)")
    t.add_argument("--seed", type=int, default=0, help="default 0")
    t.add_argument("--force", action="store_true", help="rebuild even if OUT_DIR matches")
    t.set_defaults(handler=_make_tiny_model)
    train_cli.add_parser(commands)
    eval_cli.add_parser(commands)
    convert_cli.add_parser(commands)
    registry_cli.add_parsers(commands)
    k8s_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = "flora " + shlex.join(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
