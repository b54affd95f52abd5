"""An adapter the bank refuses at install fails its request and gives its slot back: the next
adapter gets the slot, and a retry fails again rather than finding a half-installed slot."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from flora.adapters import AdapterKind, FloraWeights, InvalidAdapterError
from flora.engine import AdapterCache, AdapterLoadError, LocalAdapterSource
from flora.model import ModelArgs, load_adapter_dir, save_adapter_dir

ARGS = ModelArgs.preset("micro")


def adapter(root: Path, name: str, value: float) -> Path:
    qkv = ARGS.n_embd + 2 * ARGS.head_dim
    layers = {
        f"transformer.h.{i}.attn.c_attn": FloraWeights(
            torch.full((1, ARGS.n_embd), value), torch.ones(qkv, 1)
        )
        for i in range(ARGS.n_layer)
    }
    return save_adapter_dir(root / name, AdapterKind.FLORA, layers)


def acquire(cache: AdapterCache, source: LocalAdapterSource, name: str) -> int:
    ref = source.resolve(name, "t")
    deadline = time.monotonic() + 30
    while (slot := cache.acquire(ref)) is None:  # loading on a worker thread
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return slot


def test_a_refused_install_frees_its_slot(tmp_path: Path):
    source = LocalAdapterSource(
        {"bad": adapter(tmp_path, "bad", 2.0), "good": adapter(tmp_path, "good", 1.0)}
    )
    installed: dict[int, str] = {}

    def install(slot: int, file) -> None:  # the engine's bank, refusing one adapter
        if file.sha256 == bad_sha:
            raise InvalidAdapterError("overflows this bank's dtype")
        installed[slot] = file.sha256

    bad_sha = load_adapter_dir(tmp_path / "bad", ARGS).sha256
    cache = AdapterCache(
        source, lambda d: load_adapter_dir(d, ARGS), install, 1, cache_dir=tmp_path / "c"
    )
    try:
        with pytest.raises(AdapterLoadError, match="'bad' cannot be served: overflows"):
            acquire(cache, source, "bad")
        assert cache.in_use() == 0 and not cache.resident()
        with pytest.raises(AdapterLoadError):  # refused again, never a half-installed slot
            acquire(cache, source, "bad")
        slot = acquire(cache, source, "good")  # the only slot was given back
        assert slot == 0 and installed == {0: load_adapter_dir(tmp_path / "good", ARGS).sha256}
    finally:
        cache.close()
