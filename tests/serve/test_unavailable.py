"""503s carry Retry-After (found by the fault runs, tests/reliability): a replica whose engine
has stopped answers 503 with ``Retry-After``, so a client knows to back off and retry — as the
registry's 503s (an index or store outage) do; a replica killed under a request ends it with a
503 error chunk instead of an unhandled error (a 500)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from ray.exceptions import ActorDiedError

from adapter_registry import BaseModelCatalog, Registry
from adapter_registry.blobs import LocalBlobStore, S3BlobStore
from adapter_registry.client import RegistryClient
from adapter_registry.index.sqlite import SqliteIndex
from flora.adapters import AdapterKind
from flora.model import ModelArgs
from flora.serve.backends import LocalBackend, RayBackend
from flora.serve.config import ServeArgs
from flora.serve.ingress import build_ingress_app
from flora.serve.replica import ReplicaCore
from flora.serve.wire import StreamChunk
from tests.serve.conftest import ADMIN_KEY, MODEL_NAME, Stack, random_adapter_dir
from tests.servers import S3Server, http_server


def test_a_replica_that_stopped_answers_503_with_retry_after(micro_dir: Path, tmp_path: Path):
    stack = Stack(tmp_path, micro_dir)
    try:
        with stack.client(ADMIN_KEY) as admin:
            _, key = admin.create_tenant("acme")
        body = {"model": "base", "prompt": "def f(x):", "max_tokens": 2}
        headers = {"Authorization": f"Bearer {key}"}
        ok = httpx.post(stack.url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert ok.status_code == 200, ok.text
        stack.core.engine.shutdown()
        refused = httpx.post(stack.url + "/v1/completions", json=body, headers=headers, timeout=60)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["type"] == "server_error"
    finally:
        stack.close()


DYING_REPLICA = "node-1:4242"


class _DyingResponse:
    """What a Ray streaming response does when its replica is killed after ``chunks`` chunks."""

    def __init__(self, chunks: int):
        self.chunks, self.cancelled = chunks, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> StreamChunk:
        if self.chunks == 0:
            raise ActorDiedError()
        self.chunks -= 1
        return StreamChunk(
            replica=DYING_REPLICA, token_ids=(7,), text="x", prompt_tokens=3, completion_tokens=1
        )

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """The slice of a DeploymentHandle that RayBackend uses."""

    def __init__(self, response: _DyingResponse, info: dict | None = None):
        self.response, self.info = response, info
        self.generate = self
        self.model_info = _Remote(info)

    def options(self, **_: object) -> _Handle:
        return self

    def remote(self, _: object) -> _DyingResponse:
        return self.response


class _Remote:
    def __init__(self, value: object):
        self.value = value

    async def _value(self) -> object:
        return self.value

    def remote(self) -> object:
        return self._value()


@pytest.mark.parametrize("chunks", [0, 2])
def test_a_replica_that_dies_mid_request_ends_the_stream_with_a_503_chunk(chunks: int):
    backend = RayBackend(_Handle(_DyingResponse(chunks)))

    async def drain() -> list[StreamChunk]:
        return [c async for c in backend.stream(None)]

    got = asyncio.run(drain())
    assert len(got) == chunks + 1
    assert got[-1].error.status == 503 and "retry" in got[-1].error.message
    # the replica is named once a chunk from it arrived (the ingress then drops its gauges)
    assert got[-1].lost_replica == (DYING_REPLICA if chunks else None)


def test_an_adapter_never_fetched_while_the_store_is_down_answers_503_with_retry_after(
    micro_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = S3Server(tmp_path / "moto").start()
    registry = Registry(
        SqliteIndex(tmp_path / "index.sqlite3"),
        S3BlobStore("s3://store/adapters", endpoint_url=s3.url, create_bucket=True, attempts=1),
        BaseModelCatalog(),
        admin_key=ADMIN_KEY,
    )
    args = ServeArgs(
        model=str(micro_dir),
        model_name=MODEL_NAME,
        engine={"adapter_cache_dir": str(tmp_path / "cache"), "block_size": 8, "max_rank": 8},
    )
    core = ReplicaCore(args, registry)
    app = build_ingress_app(registry, LocalBackend(core), args)
    try:
        with http_server(app) as url, httpx.Client(base_url=url, timeout=60) as http:
            with RegistryClient(url, ADMIN_KEY) as admin:
                _, key = admin.create_tenant("acme")
            model_args = ModelArgs.from_dir(micro_dir)
            adapter = random_adapter_dir(tmp_path / "py", AdapterKind.FLORA, 1, 0, model_args)
            with RegistryClient(url, key) as client:
                client.register(adapter, "py")
            s3.stop()  # registered, never fetched: the replica must fetch it now
            body = {"model": "py", "prompt": "def f(x):", "max_tokens": 2}
            for stream in (False, True):
                refused = http.post(
                    "/v1/completions",
                    json=body | {"stream": stream},
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"] == "2"
                assert "unreachable" in refused.json()["error"]["message"]
    finally:
        core.shutdown()
        s3.stop()


@pytest.mark.parametrize("chunks", [0, 2])
def test_the_ingress_answers_a_replica_that_died_with_503_and_retry_after(
    micro_dir: Path, tmp_path: Path, chunks: int
):
    """Whole answers: 503 + Retry-After (before or after tokens); streams: an error event."""
    registry = Registry(
        SqliteIndex(tmp_path / "index.sqlite3"),
        LocalBlobStore(tmp_path / "blobs"),
        BaseModelCatalog(),
        admin_key=ADMIN_KEY,
    )
    info = {
        "name": MODEL_NAME,
        "config": ModelArgs.from_dir(micro_dir).to_hf_config(),
        "max_model_len": 128,
    }
    args = ServeArgs(model=str(micro_dir), model_name=MODEL_NAME)
    key = registry.create_tenant("acme")[1]
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "base", "prompt": "def f(x):", "max_tokens": 4}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for stream in (False, True):
        backend = RayBackend(_Handle(_DyingResponse(chunks), info))
        app = build_ingress_app(registry, backend, args)
        metrics = app.state.ingress.metrics
        metrics.replica_stats(DYING_REPLICA, {"running": 5, "steps": 40})  # reported before
        metrics.replica_stats("node-2:7", {"running": 1, "steps": 9})
        with http_server(app) as url:
            answer = httpx.post(
                url + "/v1/completions", json=body | {"stream": stream}, headers=headers
            )
            scraped = httpx.get(url + "/metrics", headers=admin).text
        # a replica seen to die no longer shows its last (busy) gauges; the others stay
        assert ('replica="node-1:4242"' in scraped) == (chunks == 0), scraped
        assert 'flora_engine_state{replica="node-2:7",what="running"} 1.0' in scraped
        assert f"flora_replicas_lost_total {1.0 if chunks else 0.0}" in scraped
        metrics.replica_stats(DYING_REPLICA, {"running": 5})  # a late report: not brought back
        assert (DYING_REPLICA in metrics.replicas.latest) == (chunks == 0)
        if not stream or chunks == 0:  # nothing sent yet: the status can still say it
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "2"
            assert answer.json()["error"]["code"] == "unavailable"
        else:
            assert answer.status_code == 200
            events = [line for line in answer.text.splitlines() if line.startswith("data: ")]
            assert '"code": "unavailable"' in events[-2] or '"code":"unavailable"' in events[-2]
            assert events[-1] == "data: [DONE]"
