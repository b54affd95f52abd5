"""Engine settings: one typed place for every knob and its default."""

from __future__ import annotations

import pathlib
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from flora.adapters import AdapterKind, KernelPath
from flora.adapters.dispatch import check_path
from flora.cache import cache_root
from flora.model.config import ADAPTABLE_MODULES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_cache_dir() -> pathlib.Path:
    return cache_root() / "adapters"


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    device: str = Field("cpu", description="cpu, cuda or cuda:N.")
    dtype: str = Field("auto", description="fp32, bf16, fp16, or auto (bf16 on CUDA, fp32 on CPU).")
    max_num_seqs: int = Field(64, ge=1, description="Sequences running at once.")
    max_num_batched_tokens: int = Field(
        512, ge=1, description="Token budget per step; long prompts are prefilled in chunks."
    )
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    kv_cache_bytes: int = Field(256 << 20, ge=1, description="Memory for the KV pool.")
    num_kv_blocks: int | None = Field(None, ge=1, description="Overrides kv_cache_bytes if set.")
    max_model_len: int | None = Field(None, ge=2, description="Context limit; default: model's.")
    adapter_slots: int = Field(32, ge=1, description="Adapters resident on the device at once.")
    max_rank: int = Field(16, ge=1, description="Largest FLoRA/LoRA rank a slot holds.")
    adapter_targets: tuple[str, ...] = Field(
        ("c_attn",), description=f"Adapted linears, any of {ADAPTABLE_MODULES}."
    )
    adapter_kinds: frozenset[AdapterKind] = Field(frozenset(AdapterKind))
    adapter_paths: dict[AdapterKind, KernelPath] = Field(
        default_factory=dict, description="Force a path per kind (benchmarks); default: dispatcher."
    )
    max_adapter_magnitude: float = Field(
        1000.0,
        gt=0.0,
        le=3.0e38,
        description="Largest |value| an adapter may hold or apply per weight (every stored factor, "
        "LoRA's |ΔW|, FLoRA's |W_i / W0|, IA3's |l|); larger ones are refused before loading. "
        "Trained adapters sit far below (LoRA ~0.05, FLoRA and IA3 ~1).",
    )
    compile: Literal["off", "default", "max"] = Field(
        "off",
        description="torch.compile each block's feed-forward half at start-up (default: "
        "inductor's defaults; max: max-autotune). Compiled code is cached by inductor across "
        "restarts.",
    )
    prepack_weights: bool = Field(
        True,
        description="bf16/fp16 on CPU: run linear layers on oneDNN-prepacked weights (1.2-2x "
        "faster GEMMs; one more copy of each linear's weight). No effect elsewhere.",
    )
    host_cache_bytes: int = Field(1 << 30, ge=0, description="Parsed adapters kept in memory.")
    adapter_cache_dir: pathlib.Path = Field(default_factory=default_cache_dir)
    load_workers: int = Field(2, ge=1, description="Threads fetching and parsing adapters.")

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {[*DTYPES, 'auto']}")
        return DTYPES[self.dtype]

    @model_validator(mode="after")
    def _forced_paths_run_here(self) -> EngineConfig:
        """A forced path must compute its kind and run on ``device`` (a Triton path needs CUDA,
        or the interpreter on CPU), so a wrong choice fails here rather than on the first batch."""
        for kind, path in self.adapter_paths.items():
            check_path(kind, path, torch.device(self.device))
        return self
