"""Attention over a paged key/value pool, for a step that mixes decodes and prefill chunks.

The pool holds, per layer, ``[(num_blocks + 1) · block_size, kv_heads, head_dim]`` keys and
values, allocated once. A sequence owns a list of blocks (its block table); token ``p`` of it
lives at flat row ``table[p // block_size] · block_size + p % block_size``. Multi-query heads are
folded into the query axis (``q [Hkv, G · len, hd]`` against ``k [Hkv, L, hd]``), so one key head
is read once for all its query heads, never copied per head.

The extra block at the end (the null block) is never allocated nor written, so it stays zero.
Every masked key position reads it: a masked score gets weight 0, but ``0 × NaN`` is NaN, so a
masked row must hold finite values whatever another sequence left in the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class KVCache:
    """Preallocated key/value pool for every layer, plus the all-zero null block at the end."""

    def __init__(
        self,
        n_layer: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (n_layer, 2, (num_blocks + 1) * block_size, kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)  # [L, k|v, rows, Hkv, hd]

    @property
    def null_block(self) -> int:
        """The reserved block masked positions read: never allocated, never written, zero."""
        return self.num_blocks

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def bytes_per_block(
        n_layer: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """Bytes of one allocatable block; the pool holds ``num_blocks + 1`` of them."""
        return n_layer * 2 * block_size * kv_heads * head_dim * dtype.itemsize

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[index, 0], self.data[index, 1]

    def scrub(self, blocks: Sequence[int]) -> None:
        """Zero these blocks in every layer, keys and values (one indexed fill).

        Freed blocks are scrubbed before reuse, so nothing a sequence wrote outlives it.
        """
        if not blocks:
            return
        if self.null_block in blocks:
            raise ValueError("the null block is never allocated, so never freed")
        n_layer, _, _, kv_heads, head_dim = self.data.shape
        per_block = (n_layer, 2, self.num_blocks + 1, self.block_size, kv_heads, head_dim)
        index = torch.tensor(list(blocks), dtype=torch.long, device=self.data.device)
        self.data.view(per_block).index_fill_(2, index, 0)


@dataclass(frozen=True)
class Chunk:
    """One sequence's share of a step: ``length`` new tokens after ``context`` cached ones."""

    start: int  # offset of its first token in the packed step
    length: int
    context: int
    blocks: tuple[int, ...]  # its block table, covering context + length tokens

    @property
    def total(self) -> int:
        return self.context + self.length


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once and shared by all layers.

    Chunks of length 1 (decodes) come first and are attended in one batched call; each longer
    chunk (a prefill, possibly after an earlier chunk of the same prompt) is attended alone.
    """

    chunks: tuple[Chunk, ...]
    block_size: int
    slot_mapping: torch.Tensor  # [T] flat pool row of each new token
    num_decode: int
    decode_rows: torch.Tensor | None  # [D, Lmax] pool rows of every decode's keys (null if masked)
    decode_mask: torch.Tensor | None  # [D, 1, 1, Lmax] True where a key is visible
    prefill_rows: tuple[torch.Tensor | None, ...]  # per prefill chunk; None: keys are all new
    prefill_masks: tuple[torch.Tensor, ...]  # per prefill chunk, [G · len, total]

    @classmethod
    def build(
        cls,
        chunks: Sequence[Chunk],
        block_size: int,
        group: int,
        device: torch.device | str,
        *,
        null_block: int | None = None,
    ) -> AttentionMetadata:
        """``group`` is query heads per key head (n_head for multi-query, 1 for multi-head).

        ``null_block`` (:attr:`KVCache.null_block`) is what every masked decode position reads;
        without one (tests of the plain maths) they read block 0.
        """
        chunks = tuple(chunks)
        num_decode = 0
        while num_decode < len(chunks) and chunks[num_decode].length == 1:
            num_decode += 1
        if any(c.length == 1 for c in chunks[num_decode:]):
            raise ValueError("decode chunks (length 1) must come before prefill chunks")
        if any(c.start != sum(p.length for p in chunks[:i]) for i, c in enumerate(chunks)):
            raise ValueError("chunks must be packed back to back in order")
        decode_rows = decode_mask = None
        mappings = []
        if num_decode:  # one padded block table for all decodes: a few tensor ops, no loop
            decodes = chunks[:num_decode]
            pad = 0 if null_block is None else null_block
            width = max(len(c.blocks) for c in decodes)
            table = torch.tensor([c.blocks + (pad,) * (width - len(c.blocks)) for c in decodes])
            totals = torch.tensor([c.total for c in decodes])
            pos = torch.arange(int(totals.max()))
            visible = pos[None, :] < totals[:, None]  # [D, Lmax]
            rows = table[:, pos // block_size] * block_size + pos % block_size  # [D, Lmax]
            if null_block is not None:  # masked keys and values read zeros, never stale rows
                rows = torch.where(visible, rows, null_block * block_size + pos % block_size)
            mappings.append(rows[torch.arange(num_decode), totals - 1])
            decode_rows = rows.to(device)
            decode_mask = visible[:, None, None, :].to(device)
        mappings += [_rows(c.blocks, block_size, c.context, c.total) for c in chunks[num_decode:]]
        slot_mapping = torch.cat(mappings).to(device)
        prefill_rows, prefill_masks = [], []
        # A prefill reads positions [0, total) only, all its own and written by now: the keys
        # beyond a query's causal frontier are the chunk's own new ones, never another's.
        for c in chunks[num_decode:]:
            rows = _rows(c.blocks, block_size, 0, c.total).to(device) if c.context else None
            prefill_rows.append(rows)
            query_pos = torch.arange(c.context, c.total).repeat_interleave(group)
            mask = torch.arange(c.total)[None, :] <= query_pos[:, None]  # [G · len, total]
            prefill_masks.append(mask.to(device))
        return cls(
            chunks=chunks,
            block_size=block_size,
            slot_mapping=slot_mapping,
            num_decode=num_decode,
            decode_rows=decode_rows,
            decode_mask=decode_mask,
            prefill_rows=tuple(prefill_rows),
            prefill_masks=tuple(prefill_masks),
        )


def _rows(blocks: Sequence[int], block_size: int, begin: int, end: int) -> torch.Tensor:
    """Flat pool rows of token positions ``[begin, end)`` of a sequence with these blocks."""
    pos = torch.arange(begin, end)
    table = torch.as_tensor(blocks, dtype=torch.long)
    return table[pos // block_size] * block_size + pos % block_size


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[n, H, hd]`` → ``[Hkv, n · G, hd]``: a key head's G query heads become query rows."""
    n, heads, hd = q.shape
    group = heads // kv_heads
    return q.view(n, kv_heads, group, hd).permute(1, 0, 2, 3).reshape(kv_heads, n * group, hd)


def _ungrouped(o: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_grouped`: ``[Hkv, n · G, hd]`` → ``[n, H, hd]``."""
    kv_heads, _, hd = o.shape
    return o.view(kv_heads, n, -1, hd).permute(1, 0, 2, 3).reshape(n, -1, hd)


def paged_attention(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, Hkv, hd]
    v: torch.Tensor,  # [T, Hkv, hd]
    cache: tuple[torch.Tensor, torch.Tensor],  # this layer's pools [rows, Hkv, hd]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each chunk's queries over its cached and new keys → ``[T, H, hd]``."""
    k_pool, v_pool = cache
    k_pool.index_copy_(0, meta.slot_mapping, k)
    v_pool.index_copy_(0, meta.slot_mapping, v)
    kv_heads = k.shape[1]
    out = torch.empty_like(q)
    d = meta.num_decode
    if d:
        rows = meta.decode_rows
        shape = (*rows.shape, *k_pool.shape[1:])  # [D, Lmax, Hkv, hd]
        keys = k_pool.index_select(0, rows.view(-1)).view(shape).transpose(1, 2)
        values = v_pool.index_select(0, rows.view(-1)).view(shape).transpose(1, 2)
        group = q.shape[1] // kv_heads
        qd = q[:d].view(d, kv_heads, group, -1)  # [D, Hkv, G, hd]
        o = F.scaled_dot_product_attention(qd, keys, values, meta.decode_mask, scale=scale)
        out[:d] = o.reshape(d, -1, q.shape[-1])
    for c, rows, mask in zip(meta.chunks[d:], meta.prefill_rows, meta.prefill_masks, strict=True):
        span = slice(c.start, c.start + c.length)
        if rows is None:
            keys, values = k[span], v[span]  # [len, Hkv, hd]: nothing cached before
        else:
            keys, values = k_pool[rows], v_pool[rows]  # [total, Hkv, hd]
        o = F.scaled_dot_product_attention(
            _grouped(q[span], kv_heads),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            mask,
            scale=scale,
        )
        out[span] = _ungrouped(o, c.length)
    return out


def dense_attention(
    q: torch.Tensor,  # [B, S, H, hd]
    k: torch.Tensor,  # [B, S, Hkv, hd]
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain causal attention over equal-length sequences, no cache (training, scoring)."""
    b, s, heads, hd = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    qg = (
        q.view(b, s, kv_heads, group, hd).permute(0, 2, 1, 3, 4).reshape(b, kv_heads, s * group, hd)
    )
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    mask = causal.repeat_interleave(group, dim=0)  # [S · G, S]
    o = F.scaled_dot_product_attention(
        qg, k.transpose(1, 2), v.transpose(1, 2), mask, scale=scale
    )  # [B, Hkv, S · G, hd]
    return o.view(b, kv_heads, s, group, hd).permute(0, 2, 1, 3, 4).reshape(b, s, heads, hd)
