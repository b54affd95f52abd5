"""Fine-tune many adapters at once through the serving path's adapter math.

FLoRA's point applies to training too: every example in a minibatch may carry its own adapter at
the cost of one base GEMM per rank. :class:`AdapterTrainer` holds ``n`` adapters of one kind in
the model's :class:`~flora.adapters.AdapterBank` slots and makes those tables trainable; each step
takes a batch of windows per adapter, runs one forward with a per-token slot index, and minimises

    L = Σ_i mean_{tokens t of adapter i} CE(logits[t], x[t+1])

Adapters share no parameter and the base is frozen, so ∂L/∂θ_i is exactly adapter ``i``'s own
mean-loss gradient; with Adam (per element) and per-adapter gradient clipping, training ``n``
adapters together equals training each alone on the same windows, up to float rounding.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flora.adapters import AdapterBatch, BankConfig
from flora.adapters.bank import TABLES, AdapterBank
from flora.adapters.weights import (
    AdapterKind,
    AdapterWeights,
    FloraWeights,
    IA3Weights,
    LoraWeights,
)
from flora.model.model import GPTBigCode

# The paper's appendix learning rates (StarCoder-15B, rank 1).
PAPER_LR = {AdapterKind.FLORA: 8e-3, AdapterKind.IA3: 5e-3, AdapterKind.LORA: 1e-4}


class TrainConfig(BaseModel):
    """What to train and how; recorded next to every adapter it writes."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: AdapterKind = Field(AdapterKind.FLORA, description="flora, lora or ia3.")
    rank: int = Field(1, ge=1, le=256, description="FLoRA/LoRA rank (IA3 has none).")
    lora_alpha: float = Field(8.0, gt=0, description="LoRA scale numerator (PEFT's default 8).")
    targets: tuple[str, ...] = Field(("c_attn",), min_length=1, description="Adapted modules.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate; None = the paper's.")
    steps: int = Field(200, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Windows per adapter per step.")
    seq_len: int = Field(128, ge=8, description="Tokens per window.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up, then cosine to 10%.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Per-adapter clipping; None: off.")
    seed: int = Field(0, description="Seeds initialisation and window sampling (per adapter).")

    @model_validator(mode="after")
    def _ia3_rank(self) -> TrainConfig:
        if self.kind is AdapterKind.IA3 and self.rank != 1:
            raise ValueError("IA3 adapters have no rank: leave rank at 1")
        return self

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else PAPER_LR[self.kind]

    def lr_at(self, step: int) -> float:
        """Warm-up then cosine decay to 10% of the peak, by step (0-based)."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def adapter_seed(seed: int, name: str) -> int:
    """A stable per-adapter seed, so an adapter's init and data do not depend on its company."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def is_feedforward(target: str) -> bool:
    """IA3 scales the input of feed-forward layers (PEFT's ``feedforward_modules``)."""
    return target.startswith("mlp.")


def initial_weights(model: GPTBigCode, config: TrainConfig, name: str) -> dict[str, AdapterWeights]:
    """A fresh adapter per adapted layer: FLoRA's identity, PEFT's LoRA init (B = 0), IA3 ones."""
    gen = torch.Generator().manual_seed(adapter_seed(config.seed, name))
    layers: dict[str, AdapterWeights] = {}
    for path, layer in model.adapted_layers():
        target = path.split(".", 3)[3]
        n_in, n_out = layer.in_features, layer.out_features
        if config.kind is AdapterKind.FLORA:
            layers[path] = FloraWeights.identity(config.rank, n_in, n_out, generator=gen)
        elif config.kind is AdapterKind.LORA:
            bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform(a=√5), as PEFT initialises lora_A
            A = (torch.rand(config.rank, n_in, generator=gen) * 2 - 1) * bound
            layers[path] = LoraWeights(A, torch.zeros(n_out, config.rank), config.lora_alpha)
        else:
            ff = is_feedforward(target)
            layers[path] = IA3Weights(torch.ones(n_in if ff else n_out), feedforward=ff)
    return layers


class AdapterTrainer:
    """``n`` adapters of one kind, trained together on a frozen base (one slot each)."""

    def __init__(self, model: GPTBigCode, config: TrainConfig, names: Sequence[str]) -> None:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"adapter names must be distinct and at least one, got {names}")
        self.model, self.config, self.names = model, config, tuple(names)
        model.requires_grad_(False)
        bank_config = BankConfig(
            max_slots=len(names), max_rank=config.rank, kinds=frozenset({config.kind})
        )
        model.enable_adapters(config.targets, bank_config)
        for slot, name in enumerate(self.names):
            model.load_adapter(slot, initial_weights(model, config, name))
        self.tables = self._trainable_tables()
        self.optimizer = torch.optim.Adam(
            [{"params": [t], "lr": 0.0, "lr_scale": scale} for _, t, scale in self.tables],
            betas=(0.9, 0.999),
            eps=1e-8,
        )
        self.step_count = 0
        self.model.train()

    def _trainable_tables(self) -> list[tuple[str, torch.Tensor, float]]:
        """``(name, table, lr_scale)`` for every table this kind reads, now requiring grad."""
        tables = []
        for path, layer in self.model.adapted_layers():
            bank: AdapterBank = layer.bank
            scales = bank.lr_scales(0)
            for table_name in TABLES[self.config.kind]:
                if self.config.kind is AdapterKind.IA3:  # only one side is ever read
                    used = "ia3_in" if bank.feedforward[0] else "ia3_out"
                    if table_name != used:
                        continue
                table = getattr(bank, table_name)
                table.requires_grad_(True)
                tables.append((f"{path}.{table_name}", table, scales[table_name]))
        return tables

    def loss_per_adapter(self, windows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean next-token loss of each adapter on its own windows ``[b_i, S + 1]`` → ``[n]``."""
        if len(windows) != len(self.names):
            raise ValueError(f"{len(self.names)} adapters but {len(windows)} window batches")
        ids = torch.cat(windows).to(self.model.device)
        rows = torch.tensor([w.shape[0] for w in windows])
        seq = ids.shape[1] - 1
        row_slot = torch.repeat_interleave(torch.arange(len(windows)), rows)
        batch = AdapterBatch.from_slots(row_slot.repeat_interleave(seq), device=ids.device)
        logits = self.model(ids[:, :-1], batch)  # [B, S, V]
        ce = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        per_row = ce.view(-1, seq).mean(dim=1)  # [B]
        sums = torch.zeros(len(windows), device=ids.device).index_add(
            0, row_slot.to(ids.device), per_row
        )
        return sums / rows.to(ids.device)

    def step(self, windows: Sequence[torch.Tensor]) -> torch.Tensor:
        """One optimiser step on every adapter; returns each adapter's loss ``[n]``."""
        lr = self.config.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        losses = self.loss_per_adapter(windows)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        if self.config.max_grad_norm is not None:
            self._clip_per_adapter(self.config.max_grad_norm)
        self.optimizer.step()
        self.step_count += 1
        return losses.detach().cpu()

    @torch.no_grad()
    def _clip_per_adapter(self, max_norm: float) -> None:
        """Clip each adapter's gradient norm on its own (a global norm would couple them)."""
        grads = [t.grad for _, t, _ in self.tables if t.grad is not None]
        squares = sum(g.pow(2).flatten(1).sum(dim=1) for g in grads)  # [S+1] per table entry
        factor = (max_norm / (squares.sqrt() + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(factor.view(-1, *([1] * (g.dim() - 1))))

    def export(self) -> dict[str, dict[str, AdapterWeights]]:
        """Every adapter's current weights per HF module path, by adapter name."""
        return {name: self.model.export_adapter(slot) for slot, name in enumerate(self.names)}

    # --- checkpoints ---------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """Tables and Adam moments as named tensors (saved with safetensors, never pickled)."""
        out: dict[str, torch.Tensor] = {}
        for name, table, _ in self.tables:
            out[f"table/{name}"] = table.detach()
            moments = self.optimizer.state.get(table, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in moments:
                    out[f"adam/{key}/{name}"] = moments[key]
        return out

    @torch.no_grad()
    def load_state(self, tensors: Mapping[str, torch.Tensor], step: int) -> None:
        """Restore what :meth:`state` saved at optimiser step ``step``."""
        for name, table, _ in self.tables:
            key = f"table/{name}"
            if key not in tensors or tensors[key].shape != table.shape:
                raise ValueError(f"checkpoint does not match this run: {key} missing or resized")
            table.copy_(tensors[key])
            if step:
                self.optimizer.state[table] = {
                    "step": torch.tensor(float(step)),
                    "exp_avg": tensors[f"adam/exp_avg/{name}"].clone(),
                    "exp_avg_sq": tensors[f"adam/exp_avg_sq/{name}"].clone(),
                }
        self.step_count = step
