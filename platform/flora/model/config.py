"""GPTBigCode (StarCoder) model arguments, named presets, and HF ``config.json`` conversion."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapter_format import MODULES, STARCODER, ModelShape
from flora.model.errors import CheckpointError

# Linear layers an adapter may target, by the suffix HF/PEFT use for them.
ADAPTABLE_MODULES = ("c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class ModelArgs(BaseModel):
    """The shape of a GPTBigCode model; field names follow HF's ``GPTBigCodeConfig``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(49152, ge=1)
    n_positions: int = Field(8192, ge=1, description="Context length (learned positions).")
    n_embd: int = Field(2048, ge=1)
    n_layer: int = Field(24, ge=1)
    n_head: int = Field(16, ge=1)
    n_inner: int | None = Field(None, description="MLP width; None means 4 · n_embd.")
    multi_query: bool = Field(True, description="One shared key/value head (StarCoder's MQA).")
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelArgs:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return 1 if self.multi_query else self.n_head

    @property
    def inner(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def shape(self) -> ModelShape:
        """The adapter format's view: each adaptable linear's ``(in, out)``."""
        return ModelShape(
            "this model", self.n_layer, self.n_embd, self.n_head, self.multi_query, self.n_inner
        )

    def num_parameters(self) -> int:
        """Parameters with a tied ``lm_head`` (counted once)."""
        e = self.n_embd
        linears = (self.shape.module_shape(m) for m in MODULES)  # weights and biases
        block = sum(n_in * n_out + n_out for n_in, n_out in linears) + 4 * e  # + 2 layer norms
        return self.vocab_size * e + self.n_positions * e + self.n_layer * block + 2 * e

    @classmethod
    def preset(cls, name: str) -> ModelArgs:
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise KeyError(
                f"unknown model preset {name!r}; choose from {sorted(PRESETS)}"
            ) from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """Read HF's ``config.json`` dict; refuses other architectures and activations."""
        model_type = config.get("model_type")
        if model_type != "gpt_bigcode":
            raise CheckpointError(f"expected model_type 'gpt_bigcode', got {model_type!r}")
        activation = config.get("activation_function", "gelu_pytorch_tanh")
        if activation not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            raise CheckpointError(f"unsupported activation_function {activation!r}")
        fields = {k: config[k] for k in cls.model_fields if k in config}
        return cls(**fields)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelArgs:
        file = Path(path) / "config.json"
        if not file.is_file():
            raise CheckpointError(f"{file} not found: a checkpoint directory needs config.json")
        return cls.from_hf_config(json.loads(file.read_text()))

    def to_hf_config(self) -> dict[str, Any]:
        """A ``config.json`` that transformers' ``GPTBigCodeForCausalLM`` loads as is."""
        return {
            "architectures": ["GPTBigCodeForCausalLM"],
            "model_type": "gpt_bigcode",
            **self.model_dump(),
            "activation_function": "gelu_pytorch_tanh",
            "attention_softmax_in_fp32": True,
            "scale_attention_softmax_in_fp32": True,
            "tie_word_embeddings": True,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }


def _shape_of(shape: ModelShape) -> dict[str, Any]:
    return {"n_embd": shape.n_embd, "n_layer": shape.n_layer, "n_head": shape.n_head,
            "n_inner": shape.n_inner}  # fmt: skip


# Real StarCoder shapes (for random-weight benchmarks) and a tiny one for tests and the demo.
PRESETS: dict[str, dict[str, Any]] = {
    **{
        preset: _shape_of(STARCODER[hf_id])
        for preset, hf_id in (
            ("starcoderbase-1b", "bigcode/starcoderbase-1b"),
            ("starcoderbase-3b", "bigcode/starcoderbase-3b"),
            ("starcoderbase-7b", "bigcode/starcoderbase-7b"),
            ("starcoder-15b", "bigcode/starcoder"),
        )
    },
    "tiny": {
        "vocab_size": 4096,
        "n_positions": 1024,
        "n_embd": 512,
        "n_layer": 8,
        "n_head": 8,
        "n_inner": 2048,
    },
    # Small enough to pre-train on two CPU cores in minutes (the miniature Table 1's base).
    "mini": {
        "vocab_size": 2048,
        "n_positions": 512,
        "n_embd": 256,
        "n_layer": 4,
        "n_head": 4,
        "n_inner": 1024,
    },
    "micro": {
        "vocab_size": 512,
        "n_positions": 256,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_inner": 128,
    },
}
