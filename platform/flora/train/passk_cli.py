"""``flora eval passk``: pass@k of a checkpoint, or of one adapter on it, on MultiPL-E problems."""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from flora.train.passk import DEFAULT_PROBLEMS

DEFAULT_KS = (1, 5, 10)


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "passk",
        help="pass@k on MultiPL-E-style problems, sampled from the engine, run in a sandbox",
        description="Sample n completions per problem with the engine (base model or one "
        "adapter), cut each at the language's stop tokens, run it with the problem's tests in "
        "a sandbox (no network, resource limits), and print pass@k per language and overall "
        "(the unbiased estimator of Chen et al. 2021).",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--adapter", metavar="NAME=DIR", help="sample through this adapter")
    p.add_argument(
        "--problems", default=str(DEFAULT_PROBLEMS), help="JSONL (default: humaneval-mini)"
    )
    p.add_argument("--languages", nargs="+", help="only these (default: every one installed)")
    p.add_argument("-n", type=int, default=10, help="samples per problem (default 10)")
    p.add_argument("--temperature", type=float, default=0.8, help="default 0.8")
    p.add_argument("-k", nargs="+", type=int, dest="ks", help="default: 1 5 10 (those <= n)")
    p.add_argument("--max-tokens", type=int, default=256, help="per completion (default 256)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program (default 10)")
    p.add_argument("--seed", type=int, default=0, help="sample j uses seed + j (default 0)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--out", help="also write the report (markdown) here")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flora.engine import LLM, EngineConfig
    from flora.model import CheckpointError
    from flora.train.passk import engine_generator, evaluate, load_problems
    from flora.train.sandbox import available_languages

    llm = None
    try:
        problems = load_problems(args.problems)
        installed = set(available_languages())
        wanted = args.languages or sorted({p.language for p in problems} & installed)
        skipped = sorted({p.language for p in problems} - set(wanted))
        unknown = sorted(set(wanted) - {p.language for p in problems})
        if unknown:
            raise ValueError(f"no problems in {args.problems} for {unknown}")
        problems = [p for p in problems if p.language in wanted]
        ks = args.ks or [k for k in DEFAULT_KS if k <= args.n] or [1]
        if args.n < 1 or not all(1 <= k <= args.n for k in ks):
            raise ValueError(f"need n >= 1 and every k in [1, n={args.n}], got -k {ks}")
        name, adapters = _adapter(args.adapter)
        if skipped and not args.languages:
            print(f"skipping {skipped}: no interpreter on this machine", file=sys.stderr)
        config = EngineConfig(
            device=args.device, dtype=args.dtype, max_num_seqs=min(64, len(problems) * args.n)
        )
        llm = LLM(args.model, config, adapters=adapters)
        generate = engine_generator(
            llm,
            name,
            args.max_tokens,
            args.seed,
            stop_for={p.prompt: p.stop_tokens for p in problems},
        )
        report = evaluate(
            problems,
            generate,
            n=args.n,
            temperature=args.temperature,
            ks=ks,
            timeout_s=args.timeout,
        )
    except (OSError, CheckpointError, ValueError, ValidationError, LookupError, RuntimeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if llm is not None:
            llm.engine.close()
    table = report.to_markdown()
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        command = getattr(args, "command_line", None) or "flora eval passk"
        out.write_text(
            f"# pass@k: {args.model}" + (f" + {name}" if name else "") + "\n\n"
            f"Command: `{command}`\n\nMachine: {platform.node()} ({platform.machine()}, "
            f"{platform.system()} {platform.release()}), device {args.device}. Problems: "
            f"{args.problems}; n={args.n}, max_tokens={args.max_tokens}, seed={args.seed}.\n\n"
            f"{table}\n"
        )
        print(f"\nwrote {out}")
    return 0


def _adapter(spec: str | None) -> tuple[str | None, dict[str, str] | None]:
    if spec is None:
        return None, None
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
    if not Path(path).is_dir():
        raise ValueError(f"--adapter {name}: {path} is not a directory")
    return name, {name: path}


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
