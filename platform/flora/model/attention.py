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
from flora.rounding import ceil_pow2


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
class GroupInputs:
    """Chunks attended in one call, queries padded to ``queries`` rows and keys to ``keys``."""

    queries: int  # the longest chunk (1 for decodes)
    keys: int  # the longest context + chunk
    tables: torch.Tensor  # [C, W] block tables, padded with the null block
    totals: torch.Tensor  # [C] context + length
    starts: torch.Tensor  # [C] row of each chunk's first token in the step
    lengths: torch.Tensor  # [C]
    first_row: int | None = None  # decodes: their query rows are first_row … first_row + C - 1

    def tensors(self) -> list[torch.Tensor]:
        return [self.tables, self.totals, self.starts, self.lengths]


@dataclass(frozen=True)
class AttentionInputs:
    """The step's attention as a few integer tensors: built on the host, sent with the step's
    other inputs in one copy (:func:`flora.model.transfer.to_device`), expanded on the device.

    Chunks are grouped so that padding stays cheap: every decode in one group (one query each);
    prefill chunks by the power of two just above their length and their total, so a group's
    padded attention costs at most ~4× its chunks' own, and the number of attention calls per
    layer is bounded by the number of such classes, never by the number of sequences.
    """

    block_size: int
    null_block: int
    groups: tuple[GroupInputs, ...]
    outputs: torch.Tensor  # [T] each token's row among the groups' padded query rows
    new_keys: torch.Tensor  # [T] each token's place among the groups' padded key rows

    @classmethod
    def of(cls, chunks: Sequence[Chunk], block_size: int, null_block: int) -> AttentionInputs:
        """Validate the packing (decodes first, back to back), group and lay out the integers."""
        _check_packing(chunks, block_size)
        classes: dict[tuple[int, int], list[Chunk]] = {}
        for c in chunks:
            key = (0, 0) if c.length == 1 else (ceil_pow2(c.length), ceil_pow2(c.total))
            classes.setdefault(key, []).append(c)
        total = sum(c.length for c in chunks)
        outputs = torch.empty(total, dtype=torch.long)
        new_keys = torch.empty(total, dtype=torch.long)
        groups, query_base, key_base = [], 0, 0
        for members in classes.values():
            g = GroupInputs(
                queries=max(c.length for c in members),
                keys=max(c.total for c in members),
                tables=_padded_tables(members, null_block),
                totals=torch.tensor([c.total for c in members], dtype=torch.long),
                starts=torch.tensor([c.start for c in members], dtype=torch.long),
                lengths=torch.tensor([c.length for c in members], dtype=torch.long),
                first_row=members[0].start if members[0].length == 1 else None,
            )
            chunk = torch.arange(len(members)).repeat_interleave(g.lengths)  # per token
            first = torch.cumsum(g.lengths, 0) - g.lengths
            offset = torch.arange(chunk.shape[0]) - first[chunk]  # token's place in its chunk
            token = g.starts[chunk] + offset
            outputs[token] = query_base + chunk * g.queries + offset
            context = (g.totals - g.lengths)[chunk]
            new_keys[token] = key_base + chunk * g.keys + context + offset
            groups.append(g)
            query_base += len(members) * g.queries
            key_base += len(members) * g.keys
        return cls(block_size, null_block, tuple(groups), outputs, new_keys)

    def tensors(self) -> list[torch.Tensor]:
        return [t for g in self.groups for t in g.tensors()] + [self.outputs, self.new_keys]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> AttentionInputs:
        """The same inputs with its tensors replaced (by their device copies)."""
        per_group = iter(tensors[:-2])
        groups = tuple(
            replace(g, tables=next(per_group), totals=next(per_group), starts=next(per_group),
                    lengths=next(per_group))
            for g in self.groups
        )  # fmt: skip
        return replace(self, groups=groups, outputs=tensors[-2], new_keys=tensors[-1])


def _check_packing(chunks: Sequence[Chunk], block_size: int) -> None:
    start, prefilling = 0, False
    for c in chunks:
        if c.length == 1 and prefilling:
            raise ValueError("decode chunks (length 1) must come before prefill chunks")
        prefilling = prefilling or c.length > 1
        if c.start != start:
            raise ValueError("chunks must be packed back to back in order")
        if len(c.blocks) * block_size < c.total:
            raise ValueError(f"a chunk of {c.total} tokens has only {len(c.blocks)} blocks")
        start += c.length


def _padded_tables(chunks: Sequence[Chunk], null_block: int) -> torch.Tensor:
    width = max((len(c.blocks) for c in chunks), default=0)
    rows = [c.blocks + (null_block,) * (width - len(c.blocks)) for c in chunks]
    return torch.tensor(rows, dtype=torch.long).view(len(chunks), width)


@dataclass
class PaddedGroup:
    """One attention call's chunks on the device: padded query rows, key rows and the mask.

    ``key_rows`` are pool rows (past a chunk's end: the null block's, zeros); ``visible`` says
    which key each query row sees. Padded query rows repeat the chunk's last query, so they see
    real keys and stay finite; their outputs are dropped.
    """

    query_rows: torch.Tensor | slice  # [C, Q] token rows (decodes: a slice of rows, Q = 1)
    key_rows: torch.Tensor  # [C, K]
    visible: torch.Tensor  # [C, 1, Q · G, K] ([C, 1, 1, K] when Q = 1: broadcast over G)
    _bias: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def expand(cls, g: GroupInputs, inputs: AttentionInputs, group: int) -> PaddedGroup:
        keys = _arange(g.keys, g.tables)
        offset = torch.minimum(_arange(g.queries, g.tables), (g.lengths - 1)[:, None])  # [C, Q]
        query_pos = (g.totals - g.lengths)[:, None] + offset
        visible = keys[None, None, :] <= query_pos[:, :, None]  # [C, Q, K]: causal
        rows = _pool_rows(inputs, g.tables, keys, keys[None, :] < g.totals[:, None])
        if g.queries > 1:
            visible = visible.repeat_interleave(group, dim=1)  # a key head's G query rows
        if g.first_row is not None:  # decodes, back to back: their queries are a plain slice
            query_rows: torch.Tensor | slice = slice(g.first_row, g.first_row + len(g.totals))
        else:
            query_rows = g.starts[:, None] + offset
        return cls(query_rows, rows, visible[:, None])

    def bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask (0 or -inf) in the queries' dtype, built once per step."""
        if dtype not in self._bias:
            zero = torch.zeros(self.visible.shape, dtype=dtype, device=self.visible.device)
            self._bias[dtype] = zero.masked_fill_(~self.visible, float("-inf"))
        return self._bias[dtype]


@dataclass
class AttentionMetadata:
    """Everything attention needs for one step, built once and shared by all layers: one
    attention call per group of chunks (:class:`AttentionInputs`), no loop over sequences."""

    slot_mapping: torch.Tensor  # [T] the pool row each new token's key and value go to
    groups: tuple[PaddedGroup, ...]
    outputs: torch.Tensor | None  # [T]; None when the groups' rows are already token order

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
        """Row indices and masks from the (device) inputs: a few tensor ops per group."""
        groups = tuple(PaddedGroup.expand(g, inputs, group) for g in inputs.groups)
        rows = [g.key_rows.view(-1) for g in groups]
        slot_mapping = (torch.cat(rows) if len(rows) > 1 else rows[0])[inputs.new_keys]
        in_order = len(groups) == 1 and isinstance(groups[0].query_rows, slice)  # decodes only
        return cls(slot_mapping, groups, None if in_order else inputs.outputs)


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
    for g in meta.groups:
        if isinstance(g.query_rows, slice):
            chunks, queries, qg = g.key_rows.shape[0], 1, q[g.query_rows]
        else:
            (chunks, queries), qg = g.query_rows.shape, q[g.query_rows.view(-1)]
        keys, values = _gather(k_pool, v_pool, g.key_rows)  # [C, Hkv, K, hd]
        qg = qg.view(chunks, queries, kv_heads, group, -1)
        qg = qg.permute(0, 2, 1, 3, 4).reshape(chunks, kv_heads, queries * group, -1)
        o = F.scaled_dot_product_attention(qg, keys, values, g.bias(q.dtype), scale=scale)
        o = o.view(chunks, kv_heads, queries, group, -1).permute(0, 2, 1, 3, 4)
        parts.append(o.reshape(chunks * queries, *q.shape[1:]))
    out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return out if meta.outputs is None else out.index_select(0, meta.outputs)


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
