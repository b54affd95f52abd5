"""``flora train``: fine-tune FLoRA, LoRA or IA3 adapters, one per language in a single run."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flora.train.adapter_training import PAPER_LR


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Where text comes from and how it is split: ``flora train`` and ``flora eval`` agree."""
    p.add_argument(
        "--data",
        help="a folder of source files (picked per language by file pattern) or a JSONL of "
        '{"text", "language"} objects (default: source files found on this machine)',
    )
    p.add_argument("--held-out", type=float, default=0.1, help="held-out fraction (default 0.1)")
    p.add_argument(
        "--max-bytes", type=int, default=1_000_000, help="text per language (default 1 MB)"
    )
    p.add_argument("--data-seed", type=int, default=0, help="sample and split seed (default 0)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")


def add_parser(commands: argparse._SubParsersAction) -> None:
    lrs = ", ".join(f"{k} {v:g}" for k, v in PAPER_LR.items())
    p = commands.add_parser(
        "train",
        help="fine-tune FLoRA / LoRA / IA3 adapters (one per language, batched in one run)",
        description="Train adapters on a frozen checkpoint. With several --language values each "
        "language gets its own adapter, and every minibatch mixes them (FLoRA's batching): the "
        "result equals training them one by one. Writes OUT_DIR/<language>/ as PEFT-style "
        "adapter directories; rerunning the same command resumes from OUT_DIR's checkpoint.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (HF layout)")
    p.add_argument("--out", required=True, help="run directory (adapters, log, checkpoint)")
    p.add_argument(
        "--language",
        "--per-language",
        dest="languages",
        nargs="+",
        required=True,
        help="language(s) to train; one adapter each",
    )
    p.add_argument("--kind", choices=["flora", "lora", "ia3"], default="flora")
    p.add_argument("--rank", type=int, default=1, help="FLoRA/LoRA rank (default 1)")
    p.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (default 8)")
    p.add_argument("--targets", nargs="+", default=["c_attn"], help="default: c_attn")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: the paper's — {lrs})")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per language and step")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (default 10)")
    p.add_argument("--seed", type=int, default=0, help="init and window sampling (default 0)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out scoring interval")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per language")
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 autocast on cuda)")
    add_data_arguments(p)
    push = p.add_argument_group("registering the result (--push)")
    push.add_argument("--push", action="store_true", help="register every adapter when done")
    push.add_argument("--registry-url", help="default: $FLORA_REGISTRY_URL or 127.0.0.1:8000")
    push.add_argument("--name-prefix", default="", help="registered name = prefix + language")
    push.add_argument("--user", help="register as this user's adapters")
    push.add_argument("--base-model", help="the registry's name for the base model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from pydantic import ValidationError

    from flora.model.checkpoint import load_model
    from flora.model.errors import CheckpointError
    from flora.model.tokenizer import Tokenizer
    from flora.train.adapter_training import TrainConfig
    from flora.train.datasets import load_language_data
    from flora.train.training_run import CheckpointMismatch, train_adapters

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    if args.push and not os.environ.get("FLORA_API_KEY"):  # fail before training, not after
        print("error: --push needs the tenant's key in FLORA_API_KEY", file=sys.stderr)
        return 2
    try:
        config = TrainConfig(
            kind=args.kind,
            rank=args.rank,
            lora_alpha=args.lora_alpha,
            targets=tuple(args.targets),
            lr=args.lr,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            warmup_steps=args.warmup,
            seed=args.seed,
        )
        model = load_model(args.model, device=args.device)
        tokenizer = Tokenizer.from_dir(args.model)
        data = load_language_data(
            tokenizer,
            args.data,
            list(dict.fromkeys(args.languages)),
            held_out_fraction=args.held_out,
            max_bytes_per_language=args.max_bytes,
            seed=args.data_seed,
        )
        for lang, d in data.items():
            print(
                f"{lang}: {d.files[0]} training files ({len(d.train):,} tokens), "
                f"{d.files[1]} held out ({len(d.held_out):,} tokens)"
            )
        print(
            f"training {len(data)} {config.kind} adapter(s), rank {config.rank}, "
            f"lr {config.learning_rate:g}, {config.steps} steps × {config.batch_size} windows "
            f"× {config.seq_len} tokens → {args.out}"
        )
        result = train_adapters(
            model,
            config,
            data,
            args.out,
            base_model=str(args.model),
            eval_every=args.eval_every,
            eval_windows=args.eval_windows,
            progress=not args.quiet,
        )
    except (ValidationError, ValueError, CheckpointError, CheckpointMismatch, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.resumed_from:
        print(f"resumed from step {result.resumed_from}")
    print(f"{result.tokens_per_second:,.0f} training tokens/s")
    for name, directory in result.adapters.items():
        base, loss = result.base_held_out[name], result.held_out[name]
        print(
            f"{name}: held-out loss {loss:.4f} (base {base:.4f}, "
            f"{100 * (base - loss) / base:+.1f}%) → {directory}"
        )
    return _push(args, result.adapters) if args.push else 0


def _push(args: argparse.Namespace, adapters: dict[str, Path]) -> int:
    from adapter_registry.client import RegistryClient
    from adapter_registry.errors import RegistryError

    url = args.registry_url or os.environ.get("FLORA_REGISTRY_URL") or "http://127.0.0.1:8000"
    with RegistryClient(url, os.environ["FLORA_API_KEY"]) as client:
        for language, directory in adapters.items():
            try:
                record = client.register(
                    directory,
                    args.name_prefix + language,
                    language=language,
                    user=args.user,
                    base_model=args.base_model,
                    description=f"flora train --kind {args.kind} --rank {args.rank}",
                )
            except RegistryError as e:
                print(f"error: registering {language}: {e.message}", file=sys.stderr)
                return 1
            print(f"registered {record.id} ({record.kind}, rank {record.rank}, {language})")
    return 0
