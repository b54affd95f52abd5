"""Paged attention against a float64 reference computed chunk by chunk, with the pool poisoned.

One step mixes decodes and prefill chunks of different lengths (so prefill queries are padded);
every block no sequence owns holds NaN, so a padded query or key that read one would show.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from flora.model.attention import AttentionInputs, AttentionMetadata, Chunk, paged_attention

BLOCK = 4


def reference(q, k_all, v_all, context, scale):
    """Causal attention of ``len`` queries at positions ``context..`` over keys ``[0, total)``."""
    n, heads, _ = q.shape
    group = heads // k_all.shape[1]
    k = k_all.repeat_interleave(group, dim=1)  # [total, H, hd]
    v = v_all.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    visible = torch.arange(k.shape[0])[None, :] <= torch.arange(context, context + n)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (4, 4), (6, 2)])
def test_mixed_step_equals_reference(seed, heads, kv_heads):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    hd, scale = 8, 8**-0.5
    # (context, length): decodes first, then prefills of unequal lengths, fresh and continued
    shapes = [(rng.randint(1, 20), 1) for _ in range(3)]
    shapes += [(0, rng.randint(2, 9)), (rng.randint(1, 12), rng.randint(2, 9)), (0, 13)]
    shapes += [(0, rng.randint(2, 4)), (rng.randint(1, 30), 3)]  # more chunks per length class
    tables, next_block = [], 0
    for context, length in shapes:
        n = math.ceil((context + length) / BLOCK)
        tables.append(tuple(range(next_block, next_block + n)))
        next_block += n
    pool_blocks = next_block + 3  # a few blocks nobody owns
    null = pool_blocks
    rows = (pool_blocks + 1) * BLOCK
    k_pool = torch.full((rows, kv_heads, hd), float("nan"), dtype=torch.float64)
    v_pool = k_pool.clone()
    k_pool[null * BLOCK :] = 0  # the null block is zero, as KVCache keeps it
    v_pool[null * BLOCK :] = 0
    history = []  # each sequence's cached keys/values, written into its own blocks
    for (context, _), table in zip(shapes, tables, strict=True):
        k = torch.randn(context, kv_heads, hd, generator=gen, dtype=torch.float64)
        v = torch.randn(context, kv_heads, hd, generator=gen, dtype=torch.float64)
        for p in range(context):
            row = table[p // BLOCK] * BLOCK + p % BLOCK
            k_pool[row], v_pool[row] = k[p], v[p]
        history.append((k, v))
    chunks, start = [], 0
    for (context, length), table in zip(shapes, tables, strict=True):
        chunks.append(Chunk(start, length, context, table))
        start += length
    q = torch.randn(start, heads, hd, generator=gen, dtype=torch.float64)
    k_new = torch.randn(start, kv_heads, hd, generator=gen, dtype=torch.float64)
    v_new = torch.randn(start, kv_heads, hd, generator=gen, dtype=torch.float64)

    meta = AttentionMetadata.build(chunks, BLOCK, heads // kv_heads, "cpu", null_block=null)
    out = paged_attention(q, k_new, v_new, (k_pool, v_pool), meta, scale)

    assert torch.isfinite(out).all()
    for c, (k_old, v_old) in zip(chunks, history, strict=True):
        span = slice(c.start, c.start + c.length)
        want = reference(
            q[span],
            torch.cat([k_old, k_new[span]]),
            torch.cat([v_old, v_new[span]]),
            c.context,
            scale,
        )
        torch.testing.assert_close(out[span], want, rtol=1e-10, atol=1e-10)


def test_inputs_refuse_a_bad_packing():
    with pytest.raises(ValueError, match="before prefill"):
        AttentionInputs.of([Chunk(0, 3, 0, (0,)), Chunk(3, 1, 5, (1, 2))], BLOCK, 9)
    with pytest.raises(ValueError, match="back to back"):
        AttentionInputs.of([Chunk(0, 1, 2, (0,)), Chunk(2, 1, 2, (1,))], BLOCK, 9)
    with pytest.raises(ValueError, match="blocks"):
        AttentionInputs.of([Chunk(0, 1, 7, (0,))], BLOCK, 9)


@pytest.mark.parametrize("prefills", [1, 12])
def test_attention_calls_grow_with_length_classes_not_sequences(prefills):
    """Chunks of one length class (5–8 new tokens, no context) share one attention call; the
    decodes share another, however many sequences there are."""
    chunks, start, table = [], 0, 0
    for length in [1, 1, 1] + [5 + i % 4 for i in range(prefills)]:
        chunks.append(Chunk(start, length, 2 if length == 1 else 0, (table, table + 1, table + 2)))
        start, table = start + length, table + 3
    meta = AttentionMetadata.build(chunks, BLOCK, 2, "cpu", null_block=table)
    pools = (torch.zeros((table + 1) * BLOCK, 1, 8), torch.zeros((table + 1) * BLOCK, 1, 8))
    q, k = torch.randn(start, 2, 8), torch.randn(start, 1, 8)
    with torch.profiler.profile() as prof:
        paged_attention(q, k, k.clone(), pools, meta, 0.3)
    calls = [e for e in prof.events() if e.name == "aten::scaled_dot_product_attention"]
    assert len(calls) == 2
