"""StarCoder (GPTBigCode) in plain PyTorch: model, checkpoints, tokenizer, adapter files."""

from flora.model.adapter_files import AdapterFile, load_adapter_dir, save_adapter_dir
from flora.model.attention import AttentionInputs, AttentionMetadata, Chunk, KVCache
from flora.model.checkpoint import load_model, resolve_model_dir, save_model
from flora.model.config import ADAPTABLE_MODULES, PRESETS, ModelArgs
from flora.model.errors import AdapterFileError, CheckpointError
from flora.model.model import GPTBigCode
from flora.model.tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "ADAPTABLE_MODULES",
    "PRESETS",
    "AdapterFile",
    "AdapterFileError",
    "AttentionInputs",
    "AttentionMetadata",
    "CheckpointError",
    "Chunk",
    "GPTBigCode",
    "IncrementalDecoder",
    "KVCache",
    "ModelArgs",
    "Tokenizer",
    "load_adapter_dir",
    "load_model",
    "resolve_model_dir",
    "save_adapter_dir",
    "save_model",
]
