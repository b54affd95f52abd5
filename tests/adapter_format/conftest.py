"""Adapter files written to a directory for the engine's loader, beside the registry's
torch-free fixtures (tests/adapter_registry/conftest.py) that give the same files as bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from adapter_format import CONFIG_FILE, WEIGHTS_FILE
from flora.model import ModelArgs
from tests.adapter_registry.conftest import SPEC

# the engine's view of the registry's test model (tests/adapter_registry SPEC)
ARGS = ModelArgs(
    n_layer=SPEC.n_layer,
    n_embd=SPEC.n_embd,
    n_head=SPEC.n_head,
    n_inner=SPEC.n_inner,
    vocab_size=64,
    n_positions=64,
)


def adapter_dir(
    root: Path, config: dict | bytes, weights: dict[str, np.ndarray] | bytes, name: str = "a"
) -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    config_bytes = config if isinstance(config, bytes) else json.dumps(config).encode()
    (directory / CONFIG_FILE).write_bytes(config_bytes)
    if isinstance(weights, bytes):
        (directory / WEIGHTS_FILE).write_bytes(weights)
    else:
        save_file(weights, str(directory / WEIGHTS_FILE))
    return directory
