"""``flora generate``: complete a prompt with the base model or any adapter, from the shell."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(commands: argparse._SubParsersAction) -> None:
    g = commands.add_parser(
        "generate",
        help="complete a prompt with a checkpoint, optionally through an adapter",
        description="Load a GPTBigCode checkpoint directory (config.json, safetensors, "
        "tokenizer.json) and complete one or more prompts.",
    )
    g.add_argument("--model", required=True, help="checkpoint directory (or cached HF model id)")
    g.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="make an adapter directory available under NAME (repeatable)",
    )
    g.add_argument(
        "--use",
        help="adapter NAME to run the prompts through (default: the only "
        "--adapter given, else the base model)",
    )
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--json", action="store_true", help="one JSON object per prompt: text, ids")
    g.set_defaults(handler=run)


def _adapters(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter takes NAME=DIR, got {spec!r}")
        out[name] = path
    return out


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from flora.engine import LLM, EngineConfig, SamplingParams
    from flora.model import CheckpointError

    try:
        adapters = _adapters(args.adapter)
        use = args.use or (next(iter(adapters)) if len(adapters) == 1 else None)
        if use is not None and use not in adapters:
            raise ValueError(f"--use {use!r} is not one of the --adapter names {sorted(adapters)}")
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=tuple(args.stop),
        )
        config = EngineConfig(device=args.device, dtype=args.dtype, max_num_seqs=len(args.prompt))
        llm = LLM(args.model, config, adapters=adapters or None)
        results = llm.generate(args.prompt, params, adapter=use)
    except (CheckpointError, ValueError, ValidationError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    for prompt, c in zip(args.prompt, results, strict=True):
        if c.error:
            failed += 1
            print(f"error: {c.error}", file=sys.stderr)
        if args.json:
            record = {
                "prompt": prompt,
                "text": c.text,
                "token_ids": list(c.token_ids),
                "finish_reason": c.finish_reason,
                "adapter": c.adapter,
                "usage": {
                    "prompt_tokens": c.usage.prompt_tokens,
                    "completion_tokens": c.usage.completion_tokens,
                },
            }
            print(json.dumps(record))
        else:
            print(prompt + c.text)
    llm.engine.close()
    return 1 if failed else 0
