"""``flora bench load``: arguments and the driver that prints the table and writes docs/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flora.bench.deployment_args import add_deployment_args
from flora.bench.deployment_args import admin_key as deployment_admin_key


def add_parser(commands: argparse._SubParsersAction) -> None:
    s = commands.add_parser(
        "load",
        help="many concurrent clients against a running deployment; every outcome classified",
        description="Against a running deployment (e.g. `serve run deployments/starcoder.yaml`): "
        "create tenants with 1-2 adapters each (FLoRA rank 1/4, LoRA rank 8, IA3; over REST), "
        "then run concurrent clients for a fixed time (mixed streamed/whole, mixed adapters, a "
        "client timeout each), classify every outcome, and check that the replicas return to "
        "idle afterwards. Writes docs/benchmarks/<name>.{md,csv}.",
    )
    add_deployment_args(s)
    s.add_argument(
        "--model-dir",
        help="the served checkpoint, for adapter shapes (default: the config's model)",
    )
    s.add_argument("--config", default="deployments/starcoder.yaml", help="the Serve config")
    s.add_argument("--tenants", type=int, default=16, help="default 16")
    s.add_argument(
        "--concurrency", type=int, nargs="+", default=[64], help="clients; one run each (64)"
    )
    s.add_argument("--seconds", type=float, default=60.0, help="per run (default 60)")
    s.add_argument("--request-timeout", type=float, default=120.0, help="client timeout (120)")
    s.add_argument("--max-tokens", type=int, default=64, help="drawn from 8..this (default 64)")
    s.add_argument("--idle-timeout", type=float, default=60.0, help="wait for idle (default 60)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="docs/benchmarks")
    s.add_argument("--name", default="load", help="file stem (default: load)")
    s.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import re

    from flora.bench import load_report
    from flora.bench.deployment_args import connect
    from flora.bench.load_setup import prepare, run_level

    admin_key = deployment_admin_key(args)
    if not admin_key:
        return 2
    deployment, error = connect(args.url, admin_key)
    if deployment is None:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model_dir = Path(args.model_dir) if args.model_dir else None
    setup = prepare(deployment, args.tenants, model_dir, Path(args.config), args.seed)
    print(setup.summary)
    results = []
    for concurrency in args.concurrency:
        workload = setup.workload(
            concurrency=concurrency,
            seconds=args.seconds,
            request_timeout=args.request_timeout,
            max_tokens=(8, args.max_tokens),
            seed=args.seed,
        )
        result = asyncio.run(run_level(setup, workload, args.idle_timeout))
        print("\n".join(load_report.table([result])[2:]))
        results.append(result)
    header = [setup.summary, "", *setup.method]
    command = re.sub(r"(--admin-key[ =])\S+", r"\1***", args.command_line)  # never a key in docs
    path = load_report.write(results, Path(args.out), args.name, header=header, command=command)
    print("\n".join(load_report.table(results)))
    print("\n".join(["", *load_report.checks(results)]))
    print(f"\nwrote {path} (+ .csv)")
    return 0 if all(r.idle.idle for r in results) else 1
