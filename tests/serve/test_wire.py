"""The ingress ↔ replica wire (flora.serve.wire) over a real engine and registry, in-process:
typed calls and chunks survive Ray's serialisation; the replica serves the record the ingress
resolved without asking the index again, refuses one deleted in between (404, never a 500);
joined (coalesced) streams carry the same text as whole answers, in fewer events; and engine
gauges reach /metrics while a request still runs."""

from __future__ import annotations

import asyncio
import json
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from adapter_registry import AdapterRecord
from adapter_registry.registry import Principal
from flora.adapters import AdapterKind
from flora.engine import SamplingParams
from flora.serve.wire import GenerateCall, StreamChunk, TokenLogprob
from tests.serve.conftest import ADMIN_KEY, Stack, random_adapter_dir


@pytest.fixture(scope="module")
def joined(tmp_path_factory: pytest.TempPathFactory, micro_dir: Path) -> Iterator[dict]:
    """A stack whose replica joins each request's tokens for 200 ms and reports its engine
    counters on every chunk; tenant acme with adapter ``py``."""
    root = tmp_path_factory.mktemp("wire")
    stack = Stack(
        root / "stack", micro_dir, serve={"stream_interval_ms": 200, "stats_interval_s": 0}
    )
    adapter = random_adapter_dir(root / "py", AdapterKind.FLORA, 2, 1, stack.model_args)
    with stack.client(ADMIN_KEY) as admin:
        key = admin.create_tenant("acme")[1]
    with stack.client(key) as acme:
        acme.register(adapter, "py")
    yield {"stack": stack, "key": key, "adapter": adapter}
    stack.close()


def call_for(record: AdapterRecord | None, max_tokens: int = 4, **params) -> GenerateCall:
    return GenerateCall(
        request_id=f"wire-{id(params)}-{max_tokens}",
        tenant="acme",
        prompt="def f(x):",
        params=SamplingParams(max_tokens=max_tokens, temperature=0, **params),
        adapter=record,
    )


def collect(stack: Stack, call: GenerateCall) -> list[StreamChunk]:
    async def run() -> list[StreamChunk]:
        return [chunk async for chunk in stack.core.generate(call)]

    return asyncio.run(run())


def test_calls_and_chunks_survive_serialisation(joined):
    record = joined["stack"].registry.get(Principal("acme"), "py")
    call = call_for(record, logprobs=2)
    assert pickle.loads(pickle.dumps(call)) == call  # what Ray does to an argument
    chunks = collect(joined["stack"], call)
    assert chunks and all(pickle.loads(pickle.dumps(c)) == c for c in chunks)
    last = chunks[-1]
    assert last.finish_reason == "length" and last.completion_tokens == 4
    assert last.adapter == record.id == "acme/py@1" and last.error is None
    assert all(isinstance(lp, TokenLogprob) for c in chunks for lp in c.logprobs)
    assert sum(len(c.token_ids) for c in chunks) == 4


class CountingIndex:
    """The registry's real index, counting the lookups made through it."""

    def __init__(self, index):
        self.index, self.lookups = index, 0

    def __getattr__(self, name: str):
        attr = getattr(self.index, name)
        if name in ("get", "list"):

            def counted(*args, **kwargs):
                self.lookups += 1
                return attr(*args, **kwargs)

            return counted
        return attr


def test_the_replica_serves_the_resolved_record_without_asking_the_index(joined):
    stack = joined["stack"]
    record = stack.registry.get(Principal("acme"), "py")
    real, counting = stack.registry.index, CountingIndex(stack.registry.index)
    stack.registry.index = counting
    try:
        chunks = collect(stack, call_for(record, max_tokens=3))
    finally:
        stack.registry.index = real
    assert chunks[-1].finish_reason == "length" and counting.lookups == 0


def test_a_version_deleted_between_ingress_and_replica_is_a_404(joined, tmp_path):
    stack, key = joined["stack"], joined["key"]
    adapter = random_adapter_dir(tmp_path / "gone", AdapterKind.LORA, 2, 5, stack.model_args)
    with stack.client(key) as acme:
        acme.register(adapter, "gone")
        stale = stack.registry.get(Principal("acme"), "gone")  # what the ingress resolved
        acme.delete("gone@1")
    first = None
    for _ in range(50):  # the deletion event reaches the replica's subscription
        first = collect(stack, call_for(stale))[0]
        if first.error is not None:
            break
        asyncio.run(asyncio.sleep(0.1))
    assert first is not None and first.error is not None, "a deleted version was served"
    assert first.error.status == 404 and first.error.code == "model_not_found"


def test_a_replaced_version_serves_the_new_one(joined, tmp_path):
    stack, key = joined["stack"], joined["key"]
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "py", "prompt": "def f(x):", "max_tokens": 3, "temperature": 0}
    v2 = random_adapter_dir(tmp_path / "py2", AdapterKind.FLORA, 1, 9, stack.model_args)
    with stack.client(key) as acme:
        acme.register(v2, "py")
    answer = httpx.post(stack.url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200 and answer.headers["x-flora-adapter"] == "py@2"


def test_joined_streams_equal_whole_answers_in_fewer_events(joined):
    stack, key = joined["stack"], joined["key"]
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "base", "prompt": "def f(x):", "max_tokens": 40, "temperature": 0}
    whole = httpx.post(stack.url + "/v1/completions", json=body, headers=headers, timeout=60)
    streamed = httpx.post(
        stack.url + "/v1/completions", json=body | {"stream": True}, headers=headers, timeout=60
    )
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {")]  # fmt: skip
    text = "".join(e["choices"][0]["text"] for e in events)
    assert text == whole.json()["choices"][0]["text"]
    assert events[-1]["usage"]["completion_tokens"] == 40
    assert len(events) < 40  # tokens joined within the 200 ms interval


def test_engine_gauges_reach_metrics_while_a_request_runs(tmp_path, micro_dir):
    """Counters ride on chunks while the request runs (``stats_interval_s`` 0: on every one);
    the engine is held between two steps so the request is still running when we look."""
    stack = Stack(tmp_path / "live", micro_dir, serve={"stats_interval_s": 0})
    key = stack.registry.create_tenant("acme")[1]
    headers = {"Authorization": f"Bearer {key}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"model": "base", "prompt": "def f(x):", "max_tokens": 200, "stream": True}
    release = threading.Event()
    try:
        with (
            httpx.Client(base_url=stack.url, timeout=60) as client,
            client.stream("POST", "/v1/completions", json=body, headers=headers) as response,
        ):
            lines = response.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: {"))[6:])
            assert first["choices"][0]["finish_reason"] is None
            stack.core.engine.call(release.wait)  # the loop stops between two steps
            metrics = client.get("/metrics", headers=admin).text
            running = [m for m in metrics.splitlines() if 'what="running"' in m]
            release.set()
            assert running and float(running[0].split()[-1]) == 1, running
            assert sum(1 for _ in lines) > 0  # and it finishes
    finally:
        release.set()
        stack.close()
