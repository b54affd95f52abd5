"""Per-adapter weights for one linear layer, validated before they touch a bank.

Orientation follows nn.Linear and PEFT: ``A`` is the input side ``[r, in]`` and ``B`` the
output side ``[out, r]``. FLoRA's adapted weight is ``W ∘ (B A / r)``; LoRA adds
``scale · B A`` to ``W``; IA3 scales the layer's input or output element-wise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from adapter_format import AdapterKind
from flora.adapters.errors import InvalidAdapterError


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_floating_point():
        raise InvalidAdapterError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidAdapterError(f"{name} contains NaN or Inf values")


def _check_low_rank(
    name: str, A: torch.Tensor, B: torch.Tensor, in_features: int, out_features: int
) -> int:
    if A.dim() != 2 or B.dim() != 2:
        raise InvalidAdapterError(
            f"{name}: A and B must be 2-D, got A{tuple(A.shape)} and B{tuple(B.shape)}"
        )
    rank = A.shape[0]
    if rank < 1:
        raise InvalidAdapterError(f"{name}: rank must be at least 1, got {rank}")
    if A.shape[1] != in_features:
        raise InvalidAdapterError(
            f"{name}: A must be [r, in] = [{rank}, {in_features}], got {list(A.shape)}"
        )
    if tuple(B.shape) != (out_features, rank):
        raise InvalidAdapterError(
            f"{name}: B must be [out, r] = [{out_features}, {rank}], got {list(B.shape)}"
        )
    _check_finite(f"{name}.A", A)
    _check_finite(f"{name}.B", B)
    return rank


@dataclass(frozen=True)
class FloraWeights:
    """FLoRA factors: ``W_i = W ∘ (B A / r)``, with ``A [r, in]`` and ``B [out, r]``."""

    A: torch.Tensor
    B: torch.Tensor
    kind: AdapterKind = AdapterKind.FLORA

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def validate(self, in_features: int, out_features: int) -> None:
        _check_low_rank("flora", self.A, self.B, in_features, out_features)

    def multiplier(self) -> torch.Tensor:
        """The element-wise mask ``M = B A / r`` (``[out, in]``): for references and caches."""
        return (self.B @ self.A) / self.rank

    @classmethod
    def identity(
        cls,
        rank: int,
        in_features: int,
        out_features: int,
        *,
        noise: float = 0.01,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> FloraWeights:
        """The paper's init: an exact identity (``B A / r = 1``) that still breaks symmetry.

        Rank 1 is all ones. For rank > 1, ``A = 1`` and ``B_j = 1 + ε_j − mean(ε)``: the mean of the
        rank columns of ``B`` stays exactly one, so ``B A / r = 1`` while the columns differ.
        """
        if rank < 1:
            raise InvalidAdapterError(f"flora: rank must be at least 1, got {rank}")
        A = torch.ones(rank, in_features, dtype=torch.float64)
        B = torch.ones(out_features, rank, dtype=torch.float64)
        if rank > 1:
            eps = noise * torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
            B = B + eps - eps.mean(dim=1, keepdim=True)
        return cls(A=A.to(dtype), B=B.to(dtype))


@dataclass(frozen=True)
class LoraWeights:
    """LoRA with PEFT's semantics: ``y = x Wᵀ + β + scale · (x Aᵀ) Bᵀ``."""

    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    use_rslora: bool = False
    kind: AdapterKind = AdapterKind.LORA

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        """PEFT's scaling: ``alpha / r``, or ``alpha / √r`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def validate(self, in_features: int, out_features: int) -> None:
        _check_low_rank("lora", self.A, self.B, in_features, out_features)
        if not math.isfinite(self.alpha):
            raise InvalidAdapterError(f"lora: alpha must be finite, got {self.alpha}")


@dataclass(frozen=True)
class IA3Weights:
    """IA3 with PEFT's semantics: a learned vector ``l`` that rescales activations.

    On feed-forward modules it scales the input, ``y = (x ∘ l) Wᵀ + β`` (``l`` is ``[in]``);
    elsewhere it scales the output, bias included, ``y = (x Wᵀ + β) ∘ l`` (``l`` is ``[out]``).
    """

    scale: torch.Tensor
    feedforward: bool = False
    kind: AdapterKind = AdapterKind.IA3

    @property
    def rank(self) -> int:
        return 1

    def validate(self, in_features: int, out_features: int) -> None:
        expected = in_features if self.feedforward else out_features
        side = "in (feed-forward)" if self.feedforward else "out"
        if self.scale.dim() != 1 or self.scale.shape[0] != expected:
            raise InvalidAdapterError(
                f"ia3: scale must be [{side}] = [{expected}], got {list(self.scale.shape)}"
            )
        _check_finite("ia3.scale", self.scale)


AdapterWeights = FloraWeights | LoraWeights | IA3Weights
