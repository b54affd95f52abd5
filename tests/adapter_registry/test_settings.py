"""Configuration by environment, and `flora registry serve` as users start it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adapter_registry import RegistrySettings
from adapter_registry.blobs import LocalBlobStore, S3BlobStore
from adapter_registry.index.redis import RedisIndex
from adapter_registry.index.sqlite import SqliteIndex
from tests.adapter_registry.conftest import unique, write_adapter
from tests.servers import free_port


def test_nothing_set_means_local_files_and_a_generated_admin_key(tmp_path: Path):
    settings = RegistrySettings.from_env({"FLORA_DATA_DIR": str(tmp_path)})
    registry = settings.build()
    assert isinstance(registry.index, SqliteIndex) and isinstance(registry.blobs, LocalBlobStore)
    key_file = tmp_path / "registry" / "admin.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert registry.authenticate(key).is_admin
    assert settings.build().authenticate(key).is_admin  # the same key on the next start
    assert key not in settings.describe()


def test_redis_and_s3_from_the_environment(tmp_path: Path, redis_server, s3_server):
    bucket = unique("bucket")
    import boto3

    boto3.client("s3").create_bucket(Bucket=bucket)
    env = {
        "FLORA_DATA_DIR": str(tmp_path),
        "FLORA_ADMIN_KEY": "k" * 20,
        "FLORA_REDIS_URL": redis_server.url,
        "FLORA_STORE_URL": f"s3://{bucket}/adapters",
        "FLORA_MAX_ADAPTER_BYTES": "12345",
        "FLORA_IMPORT_PREFIXES": "s3://team-a/, s3://team-b/x",
        "FLORA_BASE_MODELS": f"mine={tmp_path}",
    }
    (tmp_path / "config.json").write_text(
        '{"model_type": "gpt_bigcode", "n_layer": 3, "n_embd": 32, "n_head": 2}'
    )
    settings = RegistrySettings.from_env(env)
    registry = settings.build()
    assert isinstance(registry.index, RedisIndex) and isinstance(registry.blobs, S3BlobStore)
    assert registry.max_adapter_bytes == 12345
    assert registry.import_prefixes == ["s3://team-a/", "s3://team-b/x"]
    assert registry.catalog.get("mine").n_layer == 3
    assert registry.health() == {"index": "ok", "store": "ok"}
    assert not (tmp_path / "registry" / "admin.key").exists()


def test_bad_base_models_variable_is_refused():
    with pytest.raises(ValueError, match="FLORA_BASE_MODELS"):
        RegistrySettings.from_env({"FLORA_BASE_MODELS": "no-equals-sign"})


def test_flora_registry_serve_runs_standalone(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLORA_")}
    env |= {"FLORA_DATA_DIR": str(tmp_path / "data"), "FLORA_BASE_MODELS": ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "flora.cli", "registry", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "registry did not become ready"
            time.sleep(0.2)
        key = (tmp_path / "data" / "registry" / "admin.key").read_text().strip()
        created = httpx.post(
            f"{url}/v1/tenants", json={"name": "acme"}, headers={"Authorization": f"Bearer {key}"}
        )
        assert created.status_code == 201, created.text
        tenant_key = created.json()["api_key"]
        adapter = write_adapter(tmp_path / "adapter", "flora", 2)
        command = [sys.executable, "-m", "flora.cli", "adapters", "register", str(adapter)]
        command += ["--name", "py", "--base-model", "bigcode/starcoderbase-1b"]
        command += ["--url", url, "--key", tenant_key]
        register = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=env,
        )
        # the test adapter has the shapes of a tiny model: a clear 422-style error, exit 1
        assert register.returncode == 1 and register.stderr.startswith("error: 422"), register
        assert "Traceback" not in register.stderr
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert "adapter registry on" in output and "admin.key" in output
    assert key not in output and tenant_key not in output  # keys never reach the logs
