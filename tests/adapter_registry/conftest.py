"""Registry fixtures: every test runs on both backends — embedded (SQLite + a local directory)
and production (a real redis-server + moto's S3 server, subprocesses on free ports)."""

from __future__ import annotations

import json
import os
import struct
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapter_registry import BaseModelCatalog, BaseModelSpec, Registry
from adapter_registry.app import create_app
from adapter_registry.blobs import LocalBlobStore, S3BlobStore
from adapter_registry.client import RegistryClient
from adapter_registry.index.redis import RedisIndex
from adapter_registry.index.sqlite import SqliteIndex
from tests.servers import RedisServer, S3Server, http_server

ADMIN_KEY = "flr_admin_test-key"
MAX_BYTES = 1 << 20
# the shape of tests/model's "mqa" config: PEFT adapters saved there register here
SPEC = BaseModelSpec(name="test/mqa", n_layer=2, n_embd=64, n_head=4, n_inner=128)
PREFIX = "base_model.model.transformer.h"


# --- servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto")).start()
    saved = {k: os.environ.get(k) for k in _AWS}
    os.environ.update(_AWS | {"AWS_ENDPOINT_URL": server.url})
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


_AWS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_ENDPOINT_URL": "",
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def s3_store(attempts: int = 3) -> S3BlobStore:
    return S3BlobStore(f"s3://{unique('bucket')}/adapters", create_bucket=True, attempts=attempts)


# --- the registry on each backend ---------------------------------------------------------------
@pytest.fixture(params=["embedded", "redis+s3"])
def backend_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def registry(backend_name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Registry:
    if backend_name == "embedded":
        index, blobs = SqliteIndex(tmp_path / "index.sqlite3"), LocalBlobStore(tmp_path / "blobs")
    else:
        redis_server = request.getfixturevalue("redis_server")
        request.getfixturevalue("s3_server")
        index = RedisIndex(redis_server.url, namespace=unique("test") + ":")
        blobs = s3_store()
    catalog = BaseModelCatalog([SPEC])
    return Registry(index, blobs, catalog, admin_key=ADMIN_KEY, max_adapter_bytes=MAX_BYTES)


def serving(registry: Registry) -> AbstractContextManager[str]:
    """The registry API on a real uvicorn server in a thread; yields its base URL."""
    return http_server(create_app(registry))


@pytest.fixture
def server(registry: Registry) -> Iterator[str]:
    with serving(registry) as url:
        yield url


@pytest.fixture
def admin(server: str) -> Iterator[RegistryClient]:
    with RegistryClient(server, ADMIN_KEY) as client:
        yield client


@pytest.fixture
def acme(admin: RegistryClient, server: str) -> Iterator[RegistryClient]:
    _, key = admin.create_tenant("acme")
    with RegistryClient(server, key) as client:
        yield client


@pytest.fixture
def globex(admin: RegistryClient, server: str) -> Iterator[RegistryClient]:
    _, key = admin.create_tenant("globex")
    with RegistryClient(server, key) as client:
        yield client


# --- adapter files, torch-free --------------------------------------------------------------------
def module_shape(module: str) -> tuple[int, int]:
    return SPEC.module_shape(module)


def adapter_tensors(
    kind: str, rank: int, modules=("attn.c_attn",), seed: int = 0, dtype=np.float32
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(SPEC.n_layer):
        for module in modules:
            n_in, n_out = module_shape(module)
            key = f"{PREFIX}.{layer}.{module}"
            if kind == "ia3":
                tensors[f"{key}.ia3_l"] = (1 + 0.1 * rng.standard_normal((n_out, 1))).astype(dtype)
            else:
                tensors[f"{key}.{kind}_A.weight"] = rng.standard_normal((rank, n_in)).astype(dtype)
                tensors[f"{key}.{kind}_B.weight"] = rng.standard_normal((n_out, rank)).astype(dtype)
    return tensors


def adapter_config(kind: str, rank: int, **extra) -> dict:
    config = {
        "peft_type": kind.upper(),
        "base_model_name_or_path": SPEC.name,
        "target_modules": ["c_attn"],
        "task_type": "CAUSAL_LM",
    }
    if kind != "ia3":
        config["r"] = rank
    if kind == "lora":
        config |= {"lora_alpha": 2 * rank, "bias": "none"}
    return config | extra


def write_adapter(
    directory: Path,
    kind: str = "flora",
    rank: int = 2,
    *,
    tensors: dict[str, np.ndarray] | None = None,
    seed: int = 0,
    **config_extra,
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors if tensors is not None else adapter_tensors(kind, rank, seed=seed),
        str(directory / "adapter_model.safetensors"),
    )
    config = adapter_config(kind, rank, **config_extra)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def adapter_bytes(kind: str = "flora", rank: int = 2, seed: int = 0) -> tuple[bytes, bytes]:
    """``(config, weights)`` bytes of a valid adapter."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        d = write_adapter(Path(tmp), kind, rank, seed=seed)
        return (d / "adapter_config.json").read_bytes(), (
            d / "adapter_model.safetensors"
        ).read_bytes()


def raw_safetensors(header: dict, data: bytes) -> bytes:
    """Hand-made safetensors bytes, for headers the library would never write."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data
