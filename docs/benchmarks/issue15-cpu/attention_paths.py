"""Prefill and decode attention, three implementations side by side in one process.

    git show 7eb890d:platform/flora/model/attention.py > per_chunk.py   # a call per chunk
    git show c55b8da:platform/flora/model/attention.py > one_padded.py  # one padded call
    cp platform/flora/model/attention.py grouped.py                     # one call per class
    python attention_paths.py per_chunk.py one_padded.py grouped.py

Tiny-config attention (8 query heads, one key head, head dim 64, blocks of 16): a decode step of
64 sequences with 40–380 cached tokens, and a prefill step of ~2,048 tokens in chunks of
log-uniform 32–256 tokens (the engine benchmark's prompts). The implementations take turns;
each cell is the best mean of 5 calls over 15 rounds, in ms.
"""

import importlib.util
import math
import random
import sys
import time

import torch

H, HD, BS = 8, 64, 16


def load(path):
    name = f"attention_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def step(kind, rng):
    chunks, start, block = [], 0, 0
    while True:
        if kind == "decode":
            if len(chunks) == 64:
                break
            total = rng.randint(40, 380)
            length, context = 1, total - 1
        else:
            length = min(int(math.exp(rng.uniform(math.log(32), math.log(256)))), 2048 - start)
            if length < 2:
                break
            context, total = 0, length
        n = -(-total // BS)
        chunks.append((start, length, context, tuple(range(block, block + n))))
        block, start = block + n, start + length
    return chunks, block, start


def interleaved_best(calls, n=5, rounds=15):
    """Each call's best mean over ``n`` runs, the calls taking turns round after round, so a
    busy moment of the machine hits them alike."""
    best = [float("inf")] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            begin = time.perf_counter()
            for _ in range(n):
                call()
            best[i] = min(best[i], (time.perf_counter() - begin) / n)
    return [1e3 * b for b in best]


def main():
    modules = {path: load(path) for path in sys.argv[1:]}
    print("dtype,step,chunks,tokens," + ",".join(sys.argv[1:]))
    for dtype in (torch.float32, torch.bfloat16):
        for kind in ("decode", "prefill"):
            raw, blocks, tokens = step(kind, random.Random(0))
            gen = torch.Generator().manual_seed(0)
            pools = tuple(
                torch.randn((blocks + 1) * BS, 1, HD, generator=gen).to(dtype) for _ in range(2)
            )
            q = torch.randn(tokens, H, HD, generator=gen).to(dtype)
            k, v = (torch.randn(tokens, 1, HD, generator=gen).to(dtype) for _ in range(2))
            calls = []
            for module in modules.values():
                chunks = [module.Chunk(*c) for c in raw]
                meta = module.AttentionMetadata.build(chunks, BS, H, "cpu", null_block=blocks)
                attend = module.paged_attention
                calls.append(
                    lambda f=attend, m=meta, p=pools, q=q, k=k, v=v: f(q, k, v, p, m, 0.125)
                )
            with torch.inference_mode():
                cells = interleaved_best(calls)
            name = str(dtype).removeprefix("torch.")
            print(f"{name},{kind},{len(raw)},{tokens}," + ",".join(f"{c:.2f}" for c in cells))


if __name__ == "__main__":
    main()
