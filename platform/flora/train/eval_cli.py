"""``flora eval loss`` (held-out loss, many adapters per pass) and ``flora eval passk``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flora.train import passk_cli
from flora.train.train_cli import add_data_arguments


def add_parser(commands: argparse._SubParsersAction) -> None:
    e = commands.add_parser("eval", help="held-out loss / perplexity and pass@k of adapters")
    sub = e.add_subparsers(dest="eval", required=True)
    p = sub.add_parser(
        "loss",
        help="held-out loss and perplexity per language, base and adapters in shared batches",
        description="Score the base model and every --adapter on each language's held-out "
        "windows. All adapters sit in one bank and every batch mixes them, so one pass scores "
        "them all. Use the same data arguments as `flora train` to get the same split.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="an adapter directory to score (repeatable)",
    )
    p.add_argument("--language", dest="languages", nargs="+", required=True)
    p.add_argument("--eval-windows", type=int, default=64, help="windows per language")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the table to this markdown file")
    add_data_arguments(p)
    p.set_defaults(handler=run_loss)
    passk_cli.add_parser(sub)


def _parse_adapters(specs: list[str]) -> dict[str, Path]:
    adapters = {}
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
        if name in adapters or name == "base":
            raise ValueError(f"adapter name {name!r} is reserved or given twice")
        adapters[name] = Path(directory)
    return adapters


def run_loss(args: argparse.Namespace) -> int:
    from flora.adapters import BankConfig
    from flora.model.adapter_files import load_adapter_dir
    from flora.model.checkpoint import load_model
    from flora.model.errors import AdapterFileError, CheckpointError
    from flora.model.tokenizer import Tokenizer
    from flora.train.datasets import heldout_windows, load_language_data
    from flora.train.evaluation import score_adapters, scores_table

    try:
        adapters = _parse_adapters(args.adapter)
        model = load_model(args.model, device=args.device)
        files = {name: load_adapter_dir(d, model.args) for name, d in adapters.items()}
        if files:
            targets = sorted({t for f in files.values() for t in f.targets})
            model.enable_adapters(
                targets,
                BankConfig(
                    max_slots=len(files),
                    max_rank=max(f.rank for f in files.values()),
                    kinds=frozenset(f.kind for f in files.values()),
                ),
            )
            for slot, f in enumerate(files.values()):
                model.load_adapter(slot, f.layers)
        data = load_language_data(
            Tokenizer.from_dir(args.model),
            args.data,
            list(dict.fromkeys(args.languages)),
            held_out_fraction=args.held_out,
            max_bytes_per_language=args.max_bytes,
            seed=args.data_seed,
        )
    except (ValueError, AdapterFileError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    held = {
        lang: heldout_windows(d.held_out, args.seq_len, args.eval_windows)
        for lang, d in data.items()
    }
    scores = score_adapters(model, held, {name: slot for slot, name in enumerate(files)})
    lines = ["held-out loss (perplexity)", "", *scores_table(scores)]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"```\n{args.command_line}\n```\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {out}")
    return 0
