"""The Triton kernels behind :mod:`flora.adapters.triton_kernels` (imported only with Triton).

Kept as plain functions and jitted on first use (:func:`compiled`): ``triton.jit`` decides at
decoration time whether a kernel is compiled or interpreted (``TRITON_INTERPRET``). Triton's own
jit helpers the kernels call (``tl.sum``, ``tl.zeros``) were decided when triton was first
imported, so a kernel runs only in that same mode (:func:`library_interpreted`).

Every kernel takes one token per program along axis 0 and loads its table entry once; the last
dimension of every tensor is contiguous, the other strides are passed in. Offsets are int64, so
``T·r·in`` beyond 2³¹ elements does not wrap.
"""

import functools
from types import SimpleNamespace

import triton
import triton.language as tl


def flora_prologue(
    x_ptr,
    a_ptr,
    entries_ptr,
    z_ptr,
    rank,
    n_in,
    stride_xt,
    stride_ae,
    stride_ar,
    stride_zt,
    stride_zr,
    BLOCK_K: tl.constexpr,
):
    """``z[t, j, :] = A[e_t, j, :] ∘ x[t, :]``: the gather fused into the scaling, x read once."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < n_in
    entry = tl.load(entries_ptr + t)
    x = tl.load(x_ptr + t * stride_xt + offs, mask=mask).to(tl.float32)
    a_row = a_ptr + entry * stride_ae + offs
    z_row = z_ptr + t * stride_zt + offs
    for j in range(rank):
        a = tl.load(a_row + j * stride_ar, mask=mask).to(tl.float32)
        tl.store(z_row + j * stride_zr, (a * x).to(z_ptr.dtype.element_ty), mask=mask)


def flora_epilogue(
    p_ptr,
    bt_ptr,
    entries_ptr,
    bias_ptr,
    y_ptr,
    rank,
    n_out,
    stride_pt,
    stride_pr,
    stride_be,
    stride_br,
    stride_yt,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``y[t, :] = Σ_j Bt[e_t, j, :] ∘ p[t, j, :] (+ β)``, accumulated in fp32, rounded once.

    Each program reads all of its ``p`` before writing, so ``y`` may alias ``p[:, 0]``.
    """
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < n_out
    entry = tl.load(entries_ptr + t)
    p_row = p_ptr + t * stride_pt + offs
    b_row = bt_ptr + entry * stride_be + offs
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(rank):
        p = tl.load(p_row + j * stride_pr, mask=mask).to(tl.float32)
        b = tl.load(b_row + j * stride_br, mask=mask).to(tl.float32)
        acc += p * b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + t * stride_yt + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def bgmv_shrink(
    x_ptr,
    a_ptr,
    entries_ptr,
    h_ptr,
    rank,
    n_in,
    stride_xt,
    stride_ae,
    stride_ar,
    stride_ht,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``h[t, j] = Σ_i A[e_t, j, i] x[t, i]`` in fp32; tokens on entry 0 (no adapter) skip."""
    t = tl.program_id(0).to(tl.int64)
    entry = tl.load(entries_ptr + t)
    if entry != 0:
        rows = tl.arange(0, BLOCK_R)
        row_mask = rows < rank
        a_rows = a_ptr + entry * stride_ae + rows[:, None] * stride_ar
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < n_in
            x = tl.load(x_ptr + t * stride_xt + offs, mask=mask, other=0.0).to(tl.float32)
            tile_mask = row_mask[:, None] & mask[None, :]
            a = tl.load(a_rows + offs[None, :], mask=tile_mask, other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(h_ptr + t * stride_ht + rows, acc, mask=row_mask)


def bgmv_expand(
    h_ptr,
    bt_ptr,
    entries_ptr,
    y_ptr,
    rank,
    n_out,
    stride_ht,
    stride_be,
    stride_br,
    stride_yt,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """``y[t, :] += Σ_j h[t, j] Bt[e_t, j, :]`` in place, fp32 sum, one rounding; skips entry 0."""
    t = tl.program_id(0).to(tl.int64)
    entry = tl.load(entries_ptr + t)
    if entry != 0:
        offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = offs < n_out
        rows = tl.arange(0, BLOCK_R)
        row_mask = rows < rank
        h = tl.load(h_ptr + t * stride_ht + rows, mask=row_mask, other=0.0)
        b_tile = bt_ptr + entry * stride_be + rows[:, None] * stride_br + offs[None, :]
        b = tl.load(b_tile, mask=row_mask[:, None] & mask[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(h[:, None] * b, axis=0)
        y_row = y_ptr + t * stride_yt + offs
        y = tl.load(y_row, mask=mask).to(tl.float32)
        tl.store(y_row, (y + delta).to(y_ptr.dtype.element_ty), mask=mask)


@functools.cache
def library_interpreted() -> bool:
    """Whether triton was imported under ``TRITON_INTERPRET=1`` (its helpers interpreted)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


_KERNELS = (flora_prologue, flora_epilogue, bgmv_shrink, bgmv_expand)


@functools.cache
def compiled(interpret: bool) -> SimpleNamespace:
    """The kernels jitted for one mode; ``interpret`` must match ``TRITON_INTERPRET`` now."""
    del interpret  # the cache key: triton.jit reads the mode from the environment
    return SimpleNamespace(**{fn.__name__: triton.jit(fn) for fn in _KERNELS})
