"""Our GPTBigCode equals transformers' ``GPTBigCodeForCausalLM`` on the same checkpoint.

Dense forward, the paged serving ``step`` (mixed prefill chunks and decodes over shuffled block
tables) and greedy decoding are all compared with HF's eager implementation as the oracle.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest
import torch

from flora.adapters import AdapterBatch
from flora.model import AttentionMetadata, Chunk, GPTBigCode, KVCache, load_model, save_model
from tests.model.conftest import CONFIGS, FP32_ATOL, hf_model, max_diff, random_ids, random_model

pytestmark = pytest.mark.parametrize("name", sorted(CONFIGS))


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_dense_logits_equal_hf(name, shard_bytes, gen, tmp_path):
    args = CONFIGS[name]
    save_model(random_model(args, gen), tmp_path, shard_bytes=shard_bytes)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if shard_bytes is None:
        assert shards == ["model.safetensors"]
    else:
        assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    ours, hf = load_model(tmp_path), hf_model(tmp_path)
    assert (ours.args.multi_query, hf.config.multi_query) == (name == "mqa",) * 2

    ids = random_ids(gen, args.vocab_size, 3, 37)
    expected = hf(ids).logits
    got = ours(ids)
    assert got.shape == expected.shape == (3, 37, args.vocab_size)
    assert expected.std() > 0.5, "logits too flat for the comparison to mean anything"
    assert max_diff(got, expected) <= FP32_ATOL


@dataclass
class Sequence:
    tokens: list[int]
    prompt_len: int  # prefilled in chunks; the rest is fed one token per step (decodes)
    first_step: int
    blocks: list[int]
    slot: int = -1  # adapter slot of every token of the sequence
    done: int = 0
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # position → [V]


def paged_cache(net: GPTBigCode, num_blocks: int, block_size: int) -> KVCache:
    a = net.args
    return KVCache(
        a.n_layer, num_blocks, block_size, a.kv_heads, a.head_dim, dtype=net.dtype, device="cpu"
    )


def run_schedule(
    net: GPTBigCode, seqs: list[Sequence], block_size: int, rng: random.Random
) -> set[str]:
    """Steps mixing prefill chunks and decodes of staggered sequences, until all are consumed.

    Returns which situations occurred, so the caller can check the schedule covered them.
    """
    seen: set[str] = set()
    num_blocks = max(b for s in seqs for b in s.blocks) + 1
    cache = paged_cache(net, num_blocks, block_size)
    group = net.args.n_head // net.args.kv_heads
    step = 0
    while any(s.done < len(s.tokens) for s in seqs):
        active = [s for s in seqs if s.first_step <= step and s.done < len(s.tokens)]
        step += 1
        if not active:
            continue
        work = []
        for s in active:
            prefilling = s.done < s.prompt_len
            n = min(s.prompt_len - s.done, rng.randint(1, 9)) if prefilling else 1
            work.append((s, n))
        rng.shuffle(work)
        work.sort(key=lambda sn: sn[1] != 1)  # decodes (length 1) first, as build requires
        chunks, ids, positions, slots, start = [], [], [], [], 0
        for s, n in work:
            total = s.done + n
            blocks = tuple(s.blocks[: math.ceil(total / block_size)])
            chunks.append(Chunk(start=start, length=n, context=s.done, blocks=blocks))
            ids += s.tokens[s.done : total]
            positions += range(s.done, total)
            slots += [s.slot] * n
            start += n
        if any(c.length == 1 for c in chunks) and any(c.length > 1 for c in chunks):
            seen.add("decodes with prefill")
        if any(c.length > 1 and c.context for c in chunks):
            seen.add("later prefill chunk")
        if sum(c.length == 1 for c in chunks) > 1:
            seen.add("batched decodes")
        meta = AttentionMetadata.build(chunks, block_size, group, "cpu")
        last_only = step % 2 == 0  # alternate: logits for every row / only each chunk's last
        rows = torch.tensor([c.start + c.length - 1 for c in chunks]) if last_only else None
        adapters = AdapterBatch.from_slots(slots) if any(t != -1 for t in slots) else None
        logits = net.step(torch.tensor(ids), torch.tensor(positions), meta, cache, adapters, rows)
        assert logits.shape == (len(chunks) if last_only else len(ids), net.args.vocab_size)
        i = 0
        for s, n in work:
            for p in range(s.done, s.done + n):
                if not last_only or p == s.done + n - 1:
                    s.logits[p] = logits[i]
                    i += 1
            s.done += n
    return seen


def test_paged_steps_equal_hf(name, gen, seed, tmp_path):
    args = CONFIGS[name]
    save_model(random_model(args, gen), tmp_path)
    ours, hf = load_model(tmp_path), hf_model(tmp_path)
    rng = random.Random(seed)
    block_size = 4
    # (total tokens, prompt, first step): the first three start together, so the schedule
    # surely mixes decodes with prefill chunks and batches decodes; the others start at random.
    lengths = [(6, 1, 0), (9, 3, 0), (31, 30, 0), (23, 17, -1), (15, 12, -1)]
    need = [math.ceil(total / block_size) for total, _, _ in lengths]
    pool = list(range(sum(need) + 5))
    rng.shuffle(pool)  # every table non-contiguous and out of order
    seqs = []
    for (total, prompt, first), n in zip(lengths, need, strict=True):
        blocks, pool = pool[:n], pool[n:]
        tokens = random_ids(gen, args.vocab_size, total).tolist()
        first = first if first >= 0 else rng.randint(0, 4)
        seqs.append(Sequence(tokens, prompt, first_step=first, blocks=blocks))
    assert any(s.blocks != sorted(s.blocks) for s in seqs)

    seen = run_schedule(ours, seqs, block_size, rng)
    assert seen == {"decodes with prefill", "later prefill chunk", "batched decodes"}

    for s in seqs:
        expected = hf(torch.tensor([s.tokens])).logits[0]  # [L, V]
        assert len(s.logits) >= len(s.tokens) - s.prompt_len  # every decode was checked
        for p, row in s.logits.items():
            err = max_diff(row, expected[p])
            assert err <= FP32_ATOL, f"position {p} of a {len(s.tokens)}-token sequence: {err}"


def greedy_paged(net: GPTBigCode, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """All prompts prefilled in one step, then decoded together, one argmax token per step."""
    block_size = 8
    tables, next_block = [], 0
    for p in prompts:
        n = math.ceil((len(p) + new_tokens) / block_size)
        tables.append(tuple(range(next_block + n - 1, next_block - 1, -1)))  # descending
        next_block += n
    cache = paged_cache(net, next_block, block_size)
    group = net.args.n_head // net.args.kv_heads
    outputs: list[list[int]] = [[] for _ in prompts]
    feed = [list(p) for p in prompts]
    context = [0] * len(prompts)
    for _ in range(new_tokens):
        order = sorted(range(len(prompts)), key=lambda i: len(feed[i]) != 1)
        chunks, ids, positions, start = [], [], [], 0
        for i in order:
            n = len(feed[i])
            chunks.append(Chunk(start, n, context[i], tables[i]))
            ids += feed[i]
            positions += range(context[i], context[i] + n)
            start += n
        meta = AttentionMetadata.build(chunks, block_size, group, "cpu")
        last = torch.tensor([c.start + c.length - 1 for c in chunks])
        logits = net.step(torch.tensor(ids), torch.tensor(positions), meta, cache, None, last)
        for i, token in zip(order, logits.argmax(-1).tolist(), strict=True):
            context[i] += len(feed[i])
            outputs[i].append(token)
            feed[i] = [token]
    return outputs


def test_greedy_decoding_equals_hf_generate(name, gen, tmp_path):
    args = CONFIGS[name]
    save_model(random_model(args, gen, noise=0.15), tmp_path)
    ours, hf = load_model(tmp_path), hf_model(tmp_path)
    # Token 0 is eos in the config: keep it out of prompts; HF stops after generating it.
    prompts = [(1 + random_ids(gen, args.vocab_size - 1, n)).tolist() for n in (1, 5, 12, 27)]
    got = greedy_paged(ours, prompts, new_tokens=16)
    for prompt, tokens in zip(prompts, got, strict=True):
        out = hf.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=16, pad_token_id=0
        )
        expected = out[0, len(prompt) :].tolist()
        if args.eos_token_id in tokens:  # HF stops at eos; compare up to and including it
            tokens = tokens[: tokens.index(args.eos_token_id) + 1]
        assert tokens == expected, f"prompt of {len(prompt)} tokens"
    assert len({tuple(t) for t in got}) > 1, "every prompt decoded the same: a weak check"


# bf16: both implementations round every matmul to bf16 (HF's softmax runs in fp32, ours in
# SDPA's own precision), so they differ from each other by about as much as each differs from
# fp32. Tolerance: max |ours − hf| ≤ 4 % of the logits' range, and our own error against the fp32
# oracle no worse than 2 × HF's (plus 1e-2 for the case where HF's happens to be tiny).
BF16_REL = 4e-2


def test_bf16_logits_close_to_hf(name, gen, tmp_path):
    args = CONFIGS[name]
    save_model(random_model(args, gen), tmp_path)
    ours = load_model(tmp_path, dtype=torch.bfloat16)
    hf16, hf32 = hf_model(tmp_path, torch.bfloat16), hf_model(tmp_path)
    assert ours.dtype == hf16.dtype == torch.bfloat16
    ids = random_ids(gen, args.vocab_size, 2, 33)
    exact = hf32(ids).logits
    got, expected = ours(ids), hf16(ids).logits
    assert got.dtype == torch.bfloat16
    scale = float(exact.abs().max())
    assert max_diff(got, expected) <= BF16_REL * scale
    assert max_diff(got, exact) <= 2 * max_diff(expected, exact) + 1e-2
