"""Requests that end early, run out of room, or lose their adapter: nothing leaks or hangs."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from flora.adapters import AdapterKind
from flora.engine import (
    FinishReason,
    Request,
    RequestError,
    SamplingParams,
    UnknownAdapterError,
    run_to_completion,
)
from flora.model import save_adapter_dir
from tests.engine.conftest import ARGS, random_adapter, random_prompts, tokens_of


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def step_until(engine, condition, timeout: float = 30.0) -> None:
    """Step until ``condition()``; adapters load on threads, so idle steps sleep a little."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        if not engine.step():
            time.sleep(0.001)


def assert_idle(engine) -> None:
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["adapter_slots_in_use"] == 0
    assert not engine.sequences


def test_abort_frees_kv_and_slot_at_once(make_engine, seed):
    engine = make_engine()
    prompts = random_prompts(seed, [30, 12])
    engine.add_request(
        Request(prompt_ids=prompts[0], params=greedy(50), adapter="lora-r4", request_id="a")
    )
    engine.add_request(Request(prompt_ids=prompts[1], params=greedy(5), request_id="b"))
    step_until(engine, lambda: engine.sequences["a"].num_computed > 0)  # "a" has KV now
    assert engine.stats()["kv_blocks_free"] < engine.allocator.num_blocks
    out = engine.abort("a")
    assert out is not None and out.finished and out.finish_reason is FinishReason.ABORT
    assert engine.stats()["adapter_slots_in_use"] == 0
    assert engine.abort("a") is None  # already gone
    while engine.has_unfinished():
        engine.step()
    assert_idle(engine)


def test_preemption_by_recompute_gives_the_same_tokens(make_engine, reference, seed):
    # 12 blocks of 4 tokens: not enough for all five sequences to grow at once
    engine = make_engine(adapters=False, num_kv_blocks=12, max_num_batched_tokens=16)
    prompts = random_prompts(seed, [9, 14, 5, 11, 7])
    requests = [
        Request(prompt_ids=p, params=greedy(20), tenant=f"t{i}") for i, p in enumerate(prompts)
    ]
    seqs = []
    results = {r.request_id: [] for r in requests}
    for r in requests:
        seqs.append(engine.add_request(r))
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id].append(out)
    assert sum(s.preemptions for s in seqs) > 0, "the scenario must force a preemption"
    for r, p in zip(requests, prompts, strict=True):
        assert tokens_of(results[r.request_id]) == reference(p, 20)
    assert_idle(engine)


def test_context_limits(make_engine, reference, seed):
    engine = make_engine(adapters=False)
    with pytest.raises(RequestError, match="context is 160 tokens"):
        engine.add_request(Request(prompt_ids=[5] * 160))
    prompt = random_prompts(seed, [150])[0]
    out = run_to_completion(engine, [Request(prompt_ids=prompt, params=greedy(50), request_id="c")])
    assert tokens_of(out["c"]) == reference(prompt, 10)  # stops at the context, not before
    assert out["c"][-1].finish_reason is FinishReason.LENGTH
    assert_idle(engine)


def test_request_larger_than_the_whole_kv_cache_is_refused(make_engine):
    engine = make_engine(adapters=False, num_kv_blocks=4)  # 16 tokens
    with pytest.raises(RequestError, match="Raise kv_cache_bytes"):
        engine.add_request(Request(prompt_ids=[3] * 10, params=greedy(10)))
    assert_idle(engine)


def test_bad_requests_fail_loudly(make_engine):
    engine = make_engine()
    with pytest.raises(UnknownAdapterError, match="no-such"):
        engine.add_request(Request(prompt_ids=[1, 2], adapter="no-such"))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.add_request(Request(prompt_ids=[1, ARGS.vocab_size]))
    with pytest.raises(RequestError, match="no tokenizer"):
        engine.add_request(Request(prompt="def f():"))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="exactly one"):
        Request()
    engine.add_request(Request(prompt_ids=[1], request_id="dup"))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request(Request(prompt_ids=[1], request_id="dup"))


def test_a_broken_adapter_fails_its_requests_only(make_engine, adapter_root, tmp_path, seed):
    bad = tmp_path / "bad"
    shutil.copytree(adapter_root / "flora-r16", bad)
    engine = make_engine(max_rank=8)  # rank 16 does not fit this engine's bank
    engine.adapter_source.adapters["too-big"] = bad
    prompts = random_prompts(seed, [5, 6])
    out = run_to_completion(
        engine,
        [
            Request(prompt_ids=prompts[0], params=greedy(4), adapter="too-big", request_id="x"),
            Request(prompt_ids=prompts[1], params=greedy(4), adapter="lora-r1", request_id="y"),
        ],
    )
    assert out["x"][-1].finish_reason is FinishReason.ERROR
    assert "rank 16 exceeds" in out["x"][-1].error
    assert out["y"][-1].finish_reason is FinishReason.LENGTH and len(tokens_of(out["y"])) == 4
    assert_idle(engine)


def test_more_adapters_than_slots_queue_and_all_finish(make_engine, reference, seed):
    engine = make_engine(adapter_slots=2)
    names = ["flora-r1-a", "lora-r8-a", "ia3-a", "flora-r4", "lora-r2", "flora-r1-b"]
    prompts = random_prompts(seed, [4 + i for i in range(len(names))])
    requests = [
        Request(prompt_ids=p, params=greedy(5), adapter=n)
        for p, n in zip(prompts, names, strict=True)
    ]
    results = run_to_completion(engine, requests)
    for r, p, n in zip(requests, prompts, names, strict=True):
        assert tokens_of(results[r.request_id]) == reference(p, 5, n)
    assert engine.adapters.stats.evictions >= len(names) - 2
    assert_idle(engine)


def test_updated_adapter_is_never_served_stale(make_engine, adapter_root, tmp_path, seed):
    path = tmp_path / "mine"
    shutil.copytree(adapter_root / "lora-r4", path)
    engine = make_engine()
    engine.adapter_source.adapters["mine"] = path
    prompt = random_prompts(seed, [8])[0]
    first = run_to_completion(
        engine, [Request(prompt_ids=prompt, params=greedy(6), adapter="mine", request_id="1")]
    )["1"]
    # queue a request on the old version, then replace the files and invalidate
    engine.add_request(Request(prompt_ids=prompt, params=greedy(6), adapter="mine", request_id="2"))
    time.sleep(0.01)  # a new mtime for the new files
    gen = torch.Generator().manual_seed(seed)
    save_adapter_dir(path, AdapterKind.LORA, random_adapter(AdapterKind.LORA, 4, gen))
    engine.invalidate_adapter("mine")
    engine.add_request(Request(prompt_ids=prompt, params=greedy(6), adapter="mine", request_id="3"))
    results = {"2": [], "3": []}
    while engine.has_unfinished():
        for out in engine.step():
            results[out.request_id].append(out)
    assert first[-1].adapter == results["2"][-1].adapter  # queued before: started on the old one
    assert results["3"][-1].adapter != first[-1].adapter
    assert tokens_of(results["3"]) != tokens_of(first)
    assert_idle(engine)


def test_deleted_adapter_fails_queued_requests_clearly(make_engine, adapter_root, tmp_path):
    path = tmp_path / "gone"
    shutil.copytree(adapter_root / "flora-r2", path)
    engine = make_engine()
    engine.adapter_source.adapters["gone"] = path
    engine.add_request(Request(prompt_ids=[4, 5], params=greedy(3), adapter="gone", request_id="q"))
    shutil.rmtree(path)
    engine.invalidate_adapter("gone")
    out = run_to_completion(engine, [])
    assert out["q"][-1].finish_reason is FinishReason.ERROR
    assert "could not be loaded" in out["q"][-1].error
    assert_idle(engine)


def test_one_tenant_cannot_starve_another(make_engine):
    engine = make_engine(adapters=False, max_num_seqs=2)
    for i in range(30):
        engine.add_request(
            Request(prompt_ids=[1, 2, 3], params=greedy(3), tenant="big", request_id=f"big-{i}")
        )
    engine.step()
    engine.add_request(
        Request(prompt_ids=[1, 2, 3], params=greedy(3), tenant="small", request_id="small")
    )
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished.index("small") <= 3, finished[:6]


def test_priority_runs_first(make_engine):
    engine = make_engine(adapters=False, max_num_seqs=1)
    for i in range(4):
        engine.add_request(Request(prompt_ids=[1, 2], params=greedy(2), request_id=f"low-{i}"))
    engine.add_request(Request(prompt_ids=[1, 2], params=greedy(2), priority=5, request_id="high"))
    finished = []
    while engine.has_unfinished():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished[0] == "high"
