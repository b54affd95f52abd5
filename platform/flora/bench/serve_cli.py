"""``flora bench serve``: arguments and the driver that prints the table and writes docs/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flora.bench.deployment_args import add_deployment_args, connect
from flora.bench.deployment_args import admin_key as deployment_admin_key
from flora.bench.deployment_args import serve_args as deployment_serve_args


def add_parser(commands: argparse._SubParsersAction) -> None:
    s = commands.add_parser(
        "serve",
        help="tokens/s and latency over HTTP against a running deployment vs in-process",
        description="Against a running deployment (e.g. `serve run deployments/starcoder.yaml`): "
        "create tenants with one distinct rank-1 FLoRA adapter each (over REST), stream "
        "concurrent greedy completions through the per-tenant OpenAI API, then run the same "
        "workload through the engine in this process with the config's engine settings. "
        "Writes docs/benchmarks/<name>.{md,csv}.",
    )
    add_deployment_args(s)
    s.add_argument(
        "--config",
        default="deployments/starcoder.yaml",
        help="the deployment's Serve config: model and engine settings for the in-process run",
    )
    s.add_argument(
        "--model-dir",
        help="the served checkpoint (default: the config's model, as a replica finds it)",
    )
    s.add_argument("--tenants", type=int, default=16, help="one adapter each (default 16)")
    s.add_argument("--concurrency", type=int, default=64, help="concurrent streams (default 64)")
    s.add_argument("--requests", type=int, default=256, help="timed requests (default 256)")
    s.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default 64)")
    s.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    s.add_argument("--seed", type=int, default=0, help="prompts and adapter weights (default 0)")
    s.add_argument("--no-direct", action="store_true", help="skip the in-process run")
    s.add_argument("--out", default="docs/benchmarks")
    s.add_argument("--name", default="serve", help="file stem (default: serve)")
    s.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import tempfile

    import torch

    from flora.bench import serve as bench
    from flora.engine import EngineConfig
    from flora.model import ModelArgs
    from flora.serve.model_dir import prepare_model

    admin_key = deployment_admin_key(args)
    if not admin_key:
        return 2
    serve_args = deployment_serve_args(Path(args.config))
    model_dir = Path(args.model_dir) if args.model_dir else prepare_model(serve_args.model)
    model_args = ModelArgs.from_dir(model_dir)
    workload = bench.ServeWorkload(
        tenants=args.tenants,
        concurrency=args.concurrency,
        requests=args.requests,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    if workload.prompt_tokens + workload.max_tokens > model_args.n_positions:
        print(f"error: prompt + max_tokens exceed the context ({model_args.n_positions})")
        return 2
    deployment, error = connect(args.url, admin_key)
    if deployment is None:
        print(f"error: {error}", file=sys.stderr)
        return 2

    tenants = deployment.create_tenants(workload.tenants)
    served = deployment.served_model()
    if served != serve_args.served_name:
        named = serve_args.served_name
        print(f"warning: the deployment serves {served!r} but {args.config} names {named!r}")
    root = Path(tempfile.mkdtemp(prefix="flora-bench-serve-"))
    adapters = bench.write_adapters(root / "adapters", tenants, model_args, served, workload.seed)
    for tenant, directory in adapters.items():
        deployment.register(tenant, directory, served)
    prompts = workload.prompts(model_args.vocab_size)
    print(
        f"{deployment.url}: {served} ({model_dir}); {len(tenants)} tenants × 1 rank-1 FLoRA "
        f"adapter; {workload.requests} requests, {workload.concurrency} concurrent, prompts "
        f"{workload.prompt_tokens} tokens, max_tokens {workload.max_tokens}, greedy"
    )
    http = asyncio.run(deployment.run(tenants, prompts, workload))
    print(f"HTTP: {http.throughput:,.0f} tokens/s ({http.tokens} tokens in {http.seconds:.1f}s)")
    for sample in [s for s in http.samples if s.error][:5]:
        print(f"  error: {sample.error}")
    results, direct = [http], None
    engine_overrides = {"device": serve_args.device, "dtype": serve_args.dtype}
    engine_overrides |= serve_args.engine
    if not args.no_direct:
        if serve_args.torch_threads:
            torch.set_num_threads(serve_args.torch_threads)  # as the replica runs
        engine_config = EngineConfig(**engine_overrides | {"adapter_cache_dir": root / "cache"})
        direct = asyncio.run(
            bench.run_direct(model_dir, engine_config, adapters, tenants, prompts, workload)
        )
        print(f"in-process: {direct.throughput:,.0f} tokens/s ({direct.tokens} tokens)")
        results.append(direct)
    lines = bench.checks(http, direct, workload)
    header = [
        f"Deployment: `serve run {args.config}` at {deployment.url}, model `{served}` "
        f"(`{model_dir}`, {model_args.num_parameters() / 1e6:.0f}M parameters); engine "
        f"settings from the config: `{engine_overrides}`, torch threads "
        f"{serve_args.torch_threads or 'default'}.",
        "",
        f"Workload: {workload.tenants} tenants, each with one distinct rank-1 FLoRA adapter on "
        f"`c_attn` (random weights, registered over REST); {workload.requests} streamed "
        f"completions through `/tenants/{{t}}/v1/completions`, {workload.concurrency} at a time, "
        f"request i from tenant i mod {workload.tenants}; prompts of {workload.prompt_tokens} "
        f"random token ids (seed {workload.seed}), max_tokens {workload.max_tokens}, greedy (the "
        "HTTP API has no ignore_eos: the end-of-text token may end a request early, see the "
        "count below). The in-process row runs the same requests and adapter files through an "
        "`AsyncEngine` (what a replica runs) in the benchmark process, after the HTTP run, while "
        "the deployment idles. Both warm every adapter first (one 2-token request per tenant).",
        "",
        "TTFT: first streamed update − request sent. Per-token latency: gaps between later "
        "updates (one per engine step). Tokens: the responses' `usage`. CPU cores busy: every "
        "process on this machine (the deployment's too, when it runs here) and the benchmark "
        "process alone, averaged over the timed run.",
    ]
    path = bench.write(
        results, lines, Path(args.out), args.name, header=header, command=args.command_line
    )
    print("\n".join(bench.table(results)))
    print("\n".join(["", *lines]))
    print(f"\nwrote {path} (+ .csv)")
    return 1 if http.errors else 0
