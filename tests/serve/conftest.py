"""The serving API over a real engine, a real registry and real HTTP, all in this process.

A micro StarCoder-architecture model (built from this machine's code, untrained) serves; tenants
and adapters are created through the API itself. tests/e2e runs the same API under Ray Serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch

from adapter_registry import BaseModelCatalog, Registry
from adapter_registry.blobs import LocalBlobStore
from adapter_registry.client import RegistryClient
from adapter_registry.index.sqlite import SqliteIndex
from adapter_registry.registry import DEFAULT_MAX_ADAPTER_BYTES
from flora.adapters import AdapterKind, FloraWeights, IA3Weights, LoraWeights
from flora.model import ModelArgs, save_adapter_dir
from flora.serve.backends import LocalBackend
from flora.serve.config import LimitsConfig, ServeArgs
from flora.serve.ingress import build_ingress_app
from flora.serve.replica import ReplicaCore
from flora.train import make_tiny_model
from tests.servers import http_server

ADMIN_KEY = "flr_admin_serve-tests"
MODEL_NAME = "test/micro"


@pytest.fixture(scope="session")
def micro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("micro") / "model"
    return make_tiny_model(out, preset="micro", languages=["python", "c"], progress=False)


def random_adapter_dir(
    out: Path,
    kind: AdapterKind,
    rank: int,
    seed: int,
    args: ModelArgs,
    base_model: str = MODEL_NAME,
) -> Path:
    """Strong random adapters on c_attn, so different adapters pick different greedy tokens."""
    gen = torch.Generator().manual_seed(seed)
    e, qkv = args.n_embd, args.n_embd + 2 * args.head_dim
    layers = {}
    for i in range(args.n_layer):
        module = f"transformer.h.{i}.attn.c_attn"
        if kind is AdapterKind.FLORA:
            a, b = torch.randn(rank, e, generator=gen), torch.randn(qkv, rank, generator=gen)
            layers[module] = FloraWeights(1 + a, 1 + b)
        elif kind is AdapterKind.LORA:
            a, b = torch.randn(rank, e, generator=gen), torch.randn(qkv, rank, generator=gen)
            layers[module] = LoraWeights(a, b, alpha=2.0 * rank)
        else:
            layers[module] = IA3Weights(1 + torch.randn(qkv, generator=gen))
    return save_adapter_dir(out, kind, layers, base_model=base_model)


class Stack:
    """Registry + one replica + the ingress on a real HTTP port."""

    def __init__(
        self,
        root: Path,
        model_dir: Path,
        limits: LimitsConfig | None = None,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        engine: dict | None = None,
        serve: dict | None = None,
    ):
        self.registry = Registry(
            SqliteIndex(root / "index.sqlite3"),
            LocalBlobStore(root / "blobs"),
            BaseModelCatalog(),
            admin_key=ADMIN_KEY,
            max_adapter_bytes=max_adapter_bytes,
        )
        self.args = ServeArgs(
            model=str(model_dir),
            model_name=MODEL_NAME,
            engine={"adapter_cache_dir": str(root / "cache"), "block_size": 8, "max_rank": 8}
            | (engine or {}),
            max_tokens_default=8,
            limits=limits or LimitsConfig(),
            **(serve or {}),
        )
        self.core = ReplicaCore(self.args, self.registry)
        self.app = build_ingress_app(self.registry, LocalBackend(self.core), self.args)
        self._exit = ExitStack()
        self.url = self._exit.enter_context(http_server(self.app))
        self.model_args = ModelArgs.from_dir(model_dir)

    def client(self, key: str) -> RegistryClient:
        return RegistryClient(self.url, key)

    def close(self) -> None:
        self._exit.close()
        self.core.shutdown()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, micro_dir: Path) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("stack"), micro_dir)
    yield s
    s.close()
