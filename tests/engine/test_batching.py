"""The engine's paged, chunked, continuously batched path equals plain dense decoding."""

from __future__ import annotations

import random

import pytest
import torch

from flora.engine import FinishReason, Request, SamplingParams, run_to_completion
from tests.engine.conftest import ADAPTERS, DEVICE, random_prompts, tokens_of


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


@pytest.mark.parametrize(
    ("block_size", "budget", "max_seqs"),
    [(4, 512, 64), (4, 7, 64), (16, 32, 3), (1, 13, 5)],
    ids=["whole-prefill", "chunked", "few-seqs", "block-1"],
)
def test_greedy_equals_dense_reference(make_engine, reference, seed, block_size, budget, max_seqs):
    engine = make_engine(
        adapters=False, block_size=block_size, max_num_batched_tokens=budget, max_num_seqs=max_seqs
    )
    prompts = random_prompts(seed, [1, 2, 5, 17, 33, 60, 9, 3])
    requests = [Request(prompt_ids=p, params=greedy(10)) for p in prompts]
    results = run_to_completion(engine, requests)
    for r, p in zip(requests, prompts, strict=True):
        assert tokens_of(results[r.request_id]) == reference(p, 10)
        assert results[r.request_id][-1].finish_reason is FinishReason.LENGTH
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_heterogeneous_adapters_arriving_over_time(make_engine, reference, seed):
    """16+ requests, each on its own adapter (kinds and ranks mixed, some none), joining the
    running batch at different steps, each produce exactly the tokens it produces alone."""
    engine = make_engine(adapter_slots=8, max_num_batched_tokens=24)
    names = [*ADAPTERS, None, None, None]
    rng = random.Random(seed)
    rng.shuffle(names)
    prompts = random_prompts(seed, [rng.randint(1, 40) for _ in names])
    requests = [
        Request(prompt_ids=p, params=greedy(8), adapter=n, tenant=f"t{i % 4}")
        for i, (p, n) in enumerate(zip(prompts, names, strict=True))
    ]
    results = {r.request_id: [] for r in requests}
    pending = list(requests)
    steps = 0
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 3)):  # a few arrivals per step
            if pending:
                engine.add_request(pending.pop(0))
        for out in engine.step():
            results[out.request_id].append(out)
        steps += 1
        assert steps < 5000
    for r, p, n in zip(requests, prompts, names, strict=True):
        assert tokens_of(results[r.request_id]) == reference(p, 8, n), f"adapter {n}"
        label = results[r.request_id][-1].adapter
        assert label is None if n is None else label.startswith(f"{n}@")
    # different adapters really change the output (else the test proves nothing)
    distinct = {tuple(tokens_of(results[r.request_id])) for r in requests}
    assert len(distinct) > len(requests) // 2
    assert engine.stats()["kv_blocks_free"] == engine.allocator.num_blocks
    assert engine.stats()["adapter_slots_in_use"] == 0


def test_request_alone_equals_request_in_a_crowd(make_engine, seed):
    crowd = make_engine(adapter_slots=16)
    names = list(ADAPTERS)
    prompts = random_prompts(seed, [5 + 3 * i for i in range(len(names))])
    requests = [
        Request(prompt_ids=p, params=greedy(6), adapter=n)
        for p, n in zip(prompts, names, strict=True)
    ]
    together = run_to_completion(crowd, requests)
    for r in requests[:4]:
        alone_engine = make_engine(adapter_slots=2)
        alone = run_to_completion(alone_engine, [r.model_copy(update={"request_id": "alone"})])
        assert tokens_of(alone["alone"]) == tokens_of(together[r.request_id])


def test_seeded_sampling_is_independent_of_batch_company(make_engine, seed):
    params = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=seed)
    prompt = random_prompts(seed, [7])[0]
    alone = run_to_completion(
        make_engine(adapters=False), [Request(prompt_ids=prompt, params=params, request_id="x")]
    )
    others = [
        Request(prompt_ids=p, params=SamplingParams(max_tokens=9, temperature=1.0))
        for p in random_prompts(seed + 1, [3, 20, 11, 2])
    ]
    crowd = run_to_completion(
        make_engine(adapters=False, max_num_batched_tokens=9),
        [
            others[0],
            others[1],
            Request(prompt_ids=prompt, params=params, request_id="x"),
            *others[2:],
        ],
    )
    assert tokens_of(alone["x"]) == tokens_of(crowd["x"])
    other_seed = run_to_completion(
        make_engine(adapters=False),
        [Request(prompt_ids=prompt, params=params.model_copy(update={"seed": seed + 1}))],
    )
    # a different seed gives a different stream (12 tokens at T=0.9 colliding is ~impossible)
    assert tokens_of(next(iter(other_seed.values()))) != tokens_of(alone["x"])


def test_logprobs_match_the_model_distribution(make_engine, base_model, seed):
    prompt = random_prompts(seed, [9])[0]
    out = run_to_completion(
        make_engine(adapters=False),
        [Request(prompt_ids=prompt, params=greedy(3, logprobs=3), request_id="lp")],
    )["lp"]
    lps = [lp for o in out for lp in o.logprobs]
    ids = list(prompt)
    for lp in lps:
        logits = base_model(torch.tensor([ids], device=DEVICE))[0, -1].double().log_softmax(-1)
        assert lp.token_id == int(logits.argmax())
        assert lp.logprob == pytest.approx(float(logits[lp.token_id]), abs=1e-4)
        assert [t for t, _ in lp.top] == logits.topk(3).indices.tolist()
        ids.append(lp.token_id)
    assert len(lps) == 3


def test_eos_and_stop_token_ids_finish_with_stop(make_engine, reference, seed):
    prompt = random_prompts(seed, [6])[0]
    expected = reference(prompt, 6)
    engine = make_engine(adapters=False)
    stop_at = expected[3]
    out = run_to_completion(
        engine,
        [Request(prompt_ids=prompt, params=greedy(6, stop_token_ids=(stop_at,)), request_id="s")],
    )["s"]
    cut = expected.index(stop_at) + 1
    assert tokens_of(out) == expected[:cut]
    assert out[-1].finish_reason is FinishReason.STOP
    engine.eos_token_id = expected[1]
    out = run_to_completion(
        engine,
        [Request(prompt_ids=prompt, params=SamplingParams(max_tokens=6, temperature=0))],
    )
    (stream,) = out.values()
    assert tokens_of(stream) == expected[: expected.index(expected[1]) + 1]
    assert stream[-1].finish_reason is FinishReason.STOP
