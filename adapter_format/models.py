"""The StarCoder family's shapes, by Hugging Face id: the registry accepts adapters for them
without a checkpoint, and the engine's random-weight benchmark presets use the same numbers."""

from __future__ import annotations

from adapter_format.layout import ModelShape

STARCODER: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("bigcode/starcoderbase-1b", n_layer=24, n_embd=2048, n_head=16, n_inner=8192),
        ModelShape("bigcode/starcoderbase-3b", n_layer=36, n_embd=2816, n_head=22, n_inner=11264),
        ModelShape("bigcode/starcoderbase-7b", n_layer=42, n_embd=4096, n_head=32, n_inner=16384),
        ModelShape("bigcode/starcoderbase", n_layer=40, n_embd=6144, n_head=48, n_inner=24576),
        ModelShape("bigcode/starcoder", n_layer=40, n_embd=6144, n_head=48, n_inner=24576),
    )
}
