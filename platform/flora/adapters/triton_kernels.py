"""FLoRA and LoRA (BGMV) as fused Triton kernels around the base GEMM, inference only.

- :func:`flora_triton`: one prologue kernel gathers each token's ``A`` rows and scales ``x`` by
  them (no ``[T, r, in]`` copy of ``A``), the base GEMM runs over ``T·r`` rows (cuBLAS), and
  one epilogue kernel sums ``Bt ∘ p`` over rank in fp32 and adds the bias. At rank 1 that is
  the base GEMM plus two light element-wise passes, the epilogue written in place.
- :func:`lora_bgmv_triton` (Punica-style BGMV): a shrink kernel ``h = A[s] x`` and an expand
  kernel adding ``h Bt[s]`` into the base GEMM's output in place; no-adapter tokens skip both.

Triton is imported only when first asked for, so the package imports without it. On CPU the
kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before triton is first
imported): slow, but it is how the tests check them against the float64 reference without a GPU.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from flora.adapters.flora import _needs_grad, flora_vectorised
from flora.adapters.lora import lora_gather
from flora.rounding import ceil_pow2

# Largest element-wise block: fewer, fatter programs (also what keeps the interpreter quick).
MAX_BLOCK = 1024
# Largest [rank, block] tile the BGMV kernels hold at once.
MAX_TILE = 4096


@functools.cache
def _library_interpreted() -> bool | None:
    """How triton's own helpers were built at its import (interpreted or compiled); ``None``
    when the kernels' module (so Triton, a dev/GPU-image dependency) does not import."""
    try:
        from flora.adapters._triton_jit import library_interpreted
    except (ImportError, OSError, RuntimeError):
        return None
    return library_interpreted()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device | str) -> bool:
    """Whether the Triton paths can run on ``device``: CUDA with Triton installed, or CPU
    under the interpreter (``TRITON_INTERPRET=1``, the tests).

    The mode must also be the one triton was imported in: its own helpers are fixed then.
    """
    kind = torch.device(device).type
    if kind not in ("cuda", "cpu") or (kind == "cpu" and not _interpret()):
        return False
    return _library_interpreted() == _interpret()


def _kernels():
    from flora.adapters._triton_jit import compiled

    return compiled(_interpret())


def _block(n: int, cap: int = MAX_BLOCK) -> int:
    return min(ceil_pow2(n), cap)


def _cdiv(n: int, block: int) -> int:
    return -(-n // block)


def _lead(*tensors: torch.Tensor) -> tuple[int, ...]:
    """Every stride but the last (unit) one of each tensor, in the kernels' argument order."""
    return tuple(stride for t in tensors for stride in t.stride()[:-1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a contiguous last dimension (the kernels index it with unit stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def flora_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bt: torch.Tensor,
    entries: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """:func:`~flora.adapters.flora.flora_vectorised`'s function with the gathers, scalings and
    rank sum fused into two kernels around the ``T·r``-row base GEMM.

    The kernels have no backward, so with autograd on this defers to ``flora_vectorised``.
    """
    tokens, n_in = x.shape
    if tokens == 0 or _needs_grad(x, weight, bias, A, Bt):
        return flora_vectorised(x, weight, bias, A, Bt, entries, rank)
    x, A, Bt = _rows(x), _rows(A), _rows(Bt)
    n_out, k = weight.shape[0], _kernels()
    z = x.new_empty(tokens, rank, n_in)
    block_k = _block(n_in)
    grid = (tokens, _cdiv(n_in, block_k))
    k.flora_prologue[grid](x, A, entries, z, rank, n_in, *_lead(x, A, z), BLOCK_K=block_k)
    p = F.linear(z.view(tokens * rank, n_in), weight).view(tokens, rank, n_out)
    y = p.view(tokens, n_out) if rank == 1 else x.new_empty(tokens, n_out)  # in place at rank 1
    block_n = _block(n_out)
    grid, args = (tokens, _cdiv(n_out, block_n)), (rank, n_out, *_lead(p, Bt, y))
    beta = y if bias is None else bias  # never read without a bias
    k.flora_epilogue[grid](
        p, Bt, entries, beta, y, *args, HAS_BIAS=bias is not None, BLOCK_N=block_n
    )
    return y


def lora_bgmv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    Bt: torch.Tensor,
    entries: torch.Tensor,
    rank: int,
) -> torch.Tensor:
    """:func:`~flora.adapters.lora.lora_gather`'s function as BGMV shrink + expand kernels, the
    delta summed in fp32 and added into the base GEMM's output (one rounding).

    The kernels have no backward, so with autograd on this defers to ``lora_gather``.
    """
    tokens, n_in = x.shape
    if tokens == 0 or _needs_grad(x, weight, bias, A, Bt):
        return lora_gather(x, weight, bias, A, Bt, entries, rank)
    x, A, Bt = _rows(x), _rows(A), _rows(Bt)
    k = _kernels()
    y = F.linear(x, weight, bias)
    n_out = y.shape[1]
    h = torch.empty(tokens, rank, device=x.device, dtype=torch.float32)
    block_r = max(_block(rank, cap=1 << 30), 2)  # a [1, N] tile buys nothing; masked
    block_k = _block(n_in, max(MAX_TILE // block_r, 16))
    args = (rank, n_in, *_lead(x, A, h))
    k.bgmv_shrink[(tokens,)](x, A, entries, h, *args, BLOCK_R=block_r, BLOCK_K=block_k)
    block_n = _block(n_out, max(MAX_TILE // block_r, 16))
    grid, args = (tokens, _cdiv(n_out, block_n)), (rank, n_out, *_lead(h, Bt, y))
    k.bgmv_expand[grid](h, Bt, entries, y, *args, BLOCK_R=block_r, BLOCK_N=block_n)
    return y
