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
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from flora.model.transfer import to_device


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

    def scrub(self, blocks: Sequence[int], index: torch.Tensor | None = None) -> None:
        """Zero these blocks in every layer, keys and values (one indexed fill).

        Freed blocks are scrubbed before reuse, so nothing a sequence wrote outlives it.
        ``index`` is ``blocks`` already on the device, when it travelled with other inputs.
        """
        if not blocks:
            return
        if self.null_block in blocks:
            raise ValueError("the null block is never allocated, so never freed")
        if index is None:
            index = torch.tensor(list(blocks), dtype=torch.long, device=self.data.device)
        n_layer, _, _, kv_heads, head_dim = self.data.shape
        per_block = (n_layer, 2, self.num_blocks + 1, self.block_size, kv_heads, head_dim)
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


@dataclass(frozen=True)
class AttentionInputs:
    """The step's attention as a few integer tensors: built on the host, sent with the step's
    other inputs in one copy (:func:`flora.model.transfer.to_device`), expanded on the device.

    Tables are padded with the null block. Decodes (length 1) come first, then prefill chunks.
    """

    block_size: int
    null_block: int
    max_decode_keys: int  # longest decode context (keys), 0 without decodes
    max_prefill_queries: int  # longest prefill chunk, 0 without prefills
    max_prefill_keys: int
    decode_tables: torch.Tensor  # [D, Wd]
    decode_totals: torch.Tensor  # [D]
    prefill_tables: torch.Tensor  # [P, Wp]
    prefill_starts: torch.Tensor  # [P] first token of each chunk among the prefill tokens
    prefill_contexts: torch.Tensor  # [P]
    prefill_lengths: torch.Tensor  # [P]
    prefill_outputs: torch.Tensor  # [T - D] each prefill token's row in the padded output
    prefill_new_keys: torch.Tensor  # [T - D] each prefill token's place in the padded keys

    TENSORS = (
        "decode_tables",
        "decode_totals",
        "prefill_tables",
        "prefill_starts",
        "prefill_contexts",
        "prefill_lengths",
        "prefill_outputs",
        "prefill_new_keys",
    )

    @classmethod
    def of(cls, chunks: Sequence[Chunk], block_size: int, null_block: int) -> AttentionInputs:
        """Validate the packing (decodes first, back to back) and lay out the integers."""
        num_decode = 0
        while num_decode < len(chunks) and chunks[num_decode].length == 1:
            num_decode += 1
        if any(c.length == 1 for c in chunks[num_decode:]):
            raise ValueError("decode chunks (length 1) must come before prefill chunks")
        start = 0
        for c in chunks:
            if c.start != start:
                raise ValueError("chunks must be packed back to back in order")
            if len(c.blocks) * block_size < c.total:
                raise ValueError(f"a chunk of {c.total} tokens has only {len(c.blocks)} blocks")
            start += c.length
        decodes, prefills = chunks[:num_decode], chunks[num_decode:]
        lengths = torch.tensor([c.length for c in prefills], dtype=torch.long)
        contexts = torch.tensor([c.context for c in prefills], dtype=torch.long)
        longest = max((c.length for c in prefills), default=0)
        keys = max((c.total for c in prefills), default=0)
        starts = torch.tensor([c.start - num_decode for c in prefills], dtype=torch.long)
        chunk = torch.arange(len(prefills)).repeat_interleave(lengths)  # per prefill token
        offsets = torch.arange(int(lengths.sum())) - starts[chunk]
        return cls(
            block_size=block_size,
            null_block=null_block,
            max_decode_keys=max((c.total for c in decodes), default=0),
            max_prefill_queries=longest,
            max_prefill_keys=keys,
            decode_tables=_padded_tables(decodes, null_block),
            decode_totals=torch.tensor([c.total for c in decodes], dtype=torch.long),
            prefill_tables=_padded_tables(prefills, null_block),
            prefill_starts=starts,
            prefill_contexts=contexts,
            prefill_lengths=lengths,
            prefill_outputs=chunk * longest + offsets,
            prefill_new_keys=chunk * keys + contexts[chunk] + offsets,
        )

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.TENSORS]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> AttentionInputs:
        """The same inputs with its tensors replaced (by their device copies)."""
        return replace(self, **dict(zip(self.TENSORS, tensors, strict=True)))


def _padded_tables(chunks: Sequence[Chunk], null_block: int) -> torch.Tensor:
    width = max((len(c.blocks) for c in chunks), default=0)
    rows = [c.blocks + (null_block,) * (width - len(c.blocks)) for c in chunks]
    return torch.tensor(rows, dtype=torch.long).view(len(chunks), width)


@dataclass
class PaddedGroup:
    """Chunks attended in one call: queries padded to ``queries`` rows, keys to ``keys``.

    ``key_rows`` are pool rows (past a chunk's end: the null block's, zeros); ``visible`` says
    which key each query row sees. Padded query rows repeat the chunk's last query, so they see
    real keys and stay finite; their outputs are dropped.
    """

    key_rows: torch.Tensor  # [C, K]
    visible: torch.Tensor  # [C, 1, Q · G, K] (decodes: [C, 1, 1, K], broadcast over G)
    query_rows: torch.Tensor | None  # [C, Q] token rows (None for decodes: row c, Q = 1)
    output_rows: torch.Tensor | None  # [n] row of each real query in the padded [C · Q]
    _bias: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (0 or -inf) in the queries' dtype, built once per step."""
        if dtype not in self._bias:
            zero = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
            self._bias[dtype] = zero.masked_fill_(~self.visible, float("-inf"))
        return self._bias[dtype]


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once and shared by all layers.

    Two attention calls per layer whatever the batch: one for every decode, one for every
    prefill chunk (padded to the longest), no Python loop over sequences.
    """

    slot_mapping: torch.Tensor  # [T]
    num_decode: int
    decode: PaddedGroup | None
    prefill: PaddedGroup | None

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

        ``null_block`` (:attr:`KVCache.null_block`) is what every masked position reads;
        without one (tests of the plain maths) they read block 0.
        """
        inputs = AttentionInputs.of(tuple(chunks), block_size, null_block or 0)
        return cls.expand(inputs.with_tensors(to_device(inputs.tensors(), device)), group)

    @classmethod
    def expand(cls, inputs: AttentionInputs, group: int) -> AttentionMetadata:
        """Row indices and masks from the (device) inputs: a few tensor ops per step."""
        decode = prefill = None
        new_rows = []  # the pool row each new token is written to: where its key is read
        num_decode = inputs.decode_totals.shape[0]
        if num_decode:
            keys = _arange(inputs.max_decode_keys, inputs.decode_tables)
            visible = keys[None, :] < inputs.decode_totals[:, None]  # [D, K]
            rows = _pool_rows(inputs, inputs.decode_tables, keys, visible)
            decode = PaddedGroup(rows, visible[:, None, None, :], None, None)
            last = inputs.decode_totals - 1
            new_rows.append(rows.gather(1, last[:, None]).view(-1))
        if inputs.prefill_lengths.shape[0]:
            tables, lengths = inputs.prefill_tables, inputs.prefill_lengths
            keys = _arange(inputs.max_prefill_keys, tables)
            last = (lengths - 1)[:, None]
            offset = torch.minimum(_arange(inputs.max_prefill_queries, tables), last)
            query_pos = inputs.prefill_contexts[:, None] + offset  # [P, Q]
            visible = keys[None, None, :] <= query_pos[:, :, None]  # [P, Q, K]: causal
            totals = (inputs.prefill_contexts + lengths)[:, None]
            rows = _pool_rows(inputs, tables, keys, keys[None, :] < totals)
            visible = visible.repeat_interleave(group, dim=1)[:, None]  # [P, 1, Q · G, K]
            query_rows = num_decode + inputs.prefill_starts[:, None] + offset
            prefill = PaddedGroup(rows, visible, query_rows, inputs.prefill_outputs)
            new_rows.append(rows.view(-1)[inputs.prefill_new_keys])
        slot_mapping = torch.cat(new_rows) if len(new_rows) > 1 else new_rows[0]
        return cls(slot_mapping, num_decode, decode, prefill)


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    """``0 .. n-1`` on ``like``'s device (key positions, or query offsets in a chunk)."""
    return torch.arange(n, device=like.device)


def _pool_rows(
    inputs: AttentionInputs, tables: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """``[C, K]`` flat pool rows of key positions; positions not ``visible`` read null rows."""
    size = inputs.block_size
    rows = tables[:, keys // size] * size + keys % size
    return torch.where(visible, rows, inputs.null_block * size + keys % size)


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
    group = q.shape[1] // kv_heads
    parts = []
    if meta.decode is not None:
        d = meta.num_decode
        keys, values = _gather(k_pool, v_pool, meta.decode.key_rows)  # [D, Hkv, K, hd]
        qd = q[:d].view(d, kv_heads, group, -1)  # [D, Hkv, G, hd]
        o = F.scaled_dot_product_attention(qd, keys, values, meta.decode.bias(q.dtype), scale=scale)
        parts.append(o.reshape(d, -1, q.shape[-1]))
    if meta.prefill is not None:
        p = meta.prefill
        chunks, queries = p.query_rows.shape
        keys, values = _gather(k_pool, v_pool, p.key_rows)  # [P, Hkv, K, hd]
        qp = q[p.query_rows.view(-1)].view(chunks, queries, kv_heads, group, -1)
        qp = qp.permute(0, 2, 1, 3, 4).reshape(chunks, kv_heads, queries * group, -1)
        o = F.scaled_dot_product_attention(qp, keys, values, p.bias(q.dtype), scale=scale)
        o = o.view(chunks, kv_heads, queries, group, -1).permute(0, 2, 1, 3, 4)
        parts.append(o.reshape(chunks * queries, *q.shape[1:]).index_select(0, p.output_rows))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _gather(
    k_pool: torch.Tensor, v_pool: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values at pool ``rows [C, K]`` → two ``[C, Hkv, K, hd]`` (views, one copy each)."""
    shape = (*rows.shape, *k_pool.shape[1:])  # [C, K, Hkv, hd]
    flat = rows.view(-1)
    keys = k_pool.index_select(0, flat).view(shape).transpose(1, 2)
    return keys, v_pool.index_select(0, flat).view(shape).transpose(1, 2)


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
