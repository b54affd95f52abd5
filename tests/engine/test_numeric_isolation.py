"""Numerical poisoning stays with the sequence that caused it (issue 14).

An adapter with huge finite values overflows its own rows to Inf/NaN. Bystanders batched with
it, and fresh requests that later reuse its KV blocks, must get exactly the tokens they get
alone; the attacker fails with a typed error. Masked attention positions read the all-zero null
block, freed blocks are scrubbed before reuse, and each sequence's rows are checked for overflow.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from flora.adapters import AdapterKind, FloraWeights, LoraWeights
from flora.engine import (
    EngineConfig,
    FinishReason,
    LLMEngine,
    LocalAdapterSource,
    Request,
    SamplingParams,
    run_to_completion,
)
from flora.engine.request import ErrorCode
from flora.engine.sampling import LOGPROB_FLOOR, logprobs_of
from flora.model import save_adapter_dir
from tests.engine.conftest import ARGS, COMPILE, DEVICE, random_prompts, tokens_of

BENIGN = ("lora-r4", "flora-r2", "ia3-a")
HOSTILE = ("hostile-lora-b", "hostile-lora-alpha", "hostile-flora-b")


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def hostile_layers(name: str, gen: torch.Generator) -> dict:
    """Finite factors whose activations overflow: B = 1e30, or a huge B at the largest alpha
    the file format accepts (1e6)."""
    k, d, r = ARGS.n_embd, ARGS.n_embd + 2 * ARGS.head_dim, 2
    layers = {}
    for i in range(ARGS.n_layer):
        a, b = torch.randn(r, k, generator=gen), torch.randn(d, r, generator=gen)
        if name == "hostile-lora-b":
            w = LoraWeights(a * k**-0.5, 1e30 * b, alpha=2.0 * r)
        elif name == "hostile-lora-alpha":
            w = LoraWeights(a * k**-0.5, 1e25 * b, alpha=1e6)
        else:
            w = FloraWeights(1 + 0.8 * a, 1e30 * (1 + 0.8 * b))
        layers[f"transformer.h.{i}.attn.c_attn"] = w
    return layers


@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    gen = torch.Generator().manual_seed(14)
    for name in HOSTILE:
        kind = AdapterKind.FLORA if "flora" in name else AdapterKind.LORA
        save_adapter_dir(root / name, kind, hostile_layers(name, gen))
    return root


@pytest.fixture
def make(base_model, adapter_root, hostile_root, tmp_path):
    """Engines that can load the benign and the hostile adapters (magnitude bound lifted)."""
    engines: list[LLMEngine] = []
    paths = {n: adapter_root / n for n in BENIGN} | {n: hostile_root / n for n in HOSTILE}

    def build(**config) -> LLMEngine:
        config = {
            "adapter_cache_dir": tmp_path / "cache",
            "block_size": 4,
            "device": DEVICE,
            "compile": COMPILE,
            "max_adapter_magnitude": 3e38,
        } | config
        source = LocalAdapterSource(paths)
        engine = LLMEngine(copy.deepcopy(base_model), None, EngineConfig(**config), source)
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()


def step(engine: LLMEngine, results: dict) -> None:
    outs = engine.step()
    for out in outs:
        results[out.request_id].append(out)
    if not outs and engine.adapters is not None and engine.adapters.pending():
        time.sleep(0.001)  # adapters load on threads


def record_blocks(engine: LLMEngine) -> dict[str, set[int]]:
    """Every block each request was given, seen as the scheduler plans each step."""
    seen: dict[str, set[int]] = defaultdict(set)
    schedule = engine.scheduler.schedule

    def spy():
        plan = schedule()
        for c in plan.chunks:
            seen[c.seq.request_id].update(c.seq.blocks)
        return plan

    engine.scheduler.schedule = spy
    return seen


def assert_null_block_zero(engine: LLMEngine) -> None:
    kv = engine.kv
    null = kv.data[:, :, kv.null_block * kv.block_size :]
    assert null.shape[2] == kv.block_size and not null.any()


def bystanders(seed: int, lengths: list[int], tag: str) -> list[Request]:
    names = [None, *BENIGN]
    prompts = random_prompts(seed, lengths)
    return [
        Request(
            prompt_ids=p,
            params=greedy(8, logprobs=2),
            adapter=names[i % len(names)],
            tenant=f"b{i % 2}",
            request_id=f"{tag}{i}",
        )
        for i, p in enumerate(prompts)
    ]


def attackers(seed: int, names: tuple[str, ...], tag: str) -> list[Request]:
    prompts = random_prompts(seed, [5 + 4 * i for i in range(len(names))])
    return [
        Request(prompt_ids=p, params=greedy(8), adapter=n, tenant="evil", request_id=f"{tag}{i}")
        for i, (p, n) in enumerate(zip(prompts, names, strict=True))
    ]


@pytest.mark.parametrize(
    "config",
    [
        {"max_num_batched_tokens": 512},
        {"max_num_batched_tokens": 7},
        {"max_num_batched_tokens": 16, "num_kv_blocks": 16},
    ],
    ids=["decode-batches", "chunked-prefill", "preemption"],
)
def test_hostile_adapter_harms_no_one_else(make, seed, config):
    """Wave 1: an attacker first (it would get block 0) with bystanders on the base model and
    benign adapters; wave 2 joins running decodes; wave 3 arrives once every attacker is gone
    and reuses their blocks. Every bystander equals its solo run; every attacker fails alone."""
    engine = make(**config)
    seen = record_blocks(engine)
    waves = [
        attackers(seed, HOSTILE[:1], "h1-") + bystanders(seed, [3, 9, 14, 6], "w1-"),
        attackers(seed + 1, HOSTILE[1:], "h2-") + bystanders(seed + 1, [11, 2, 7], "w2-"),
        bystanders(seed + 2, [13, 5, 17, 10], "w3-"),
    ]
    results: dict = defaultdict(list)
    seqs = [engine.add_request(r) for r in waves[0]]
    for _ in range(3):
        step(engine, results)
    seqs += [engine.add_request(r) for r in waves[1]]
    hostile_ids = [r.request_id for r in waves[0] + waves[1] if r.tenant == "evil"]
    for _ in range(5000):
        if all(results[i] and results[i][-1].finished for i in hostile_ids):
            break
        step(engine, results)
    seqs += [engine.add_request(r) for r in waves[2]]
    for _ in range(5000):
        if not engine.has_unfinished():
            break
        step(engine, results)
    assert not engine.has_unfinished()

    for r in waves[0] + waves[1] + waves[2]:
        if r.tenant == "evil":
            continue
        alone = run_to_completion(make(**config), [r])[r.request_id]
        got = results[r.request_id]
        assert got[-1].finish_reason is FinishReason.LENGTH, (r.request_id, got[-1].error)
        assert tokens_of(got) == tokens_of(alone), (r.request_id, r.adapter)
        lps = [lp for o in got for lp in o.logprobs]
        assert all(math.isfinite(v) for lp in lps for v in (lp.logprob, *(x for _, x in lp.top)))
        expected = [lp.logprob for o in alone for lp in o.logprobs]
        assert [lp.logprob for lp in lps] == pytest.approx(expected, abs=1e-3)
    for rid in hostile_ids:
        last = results[rid][-1]
        assert last.finish_reason is FinishReason.ERROR, rid
        assert last.error_code is ErrorCode.ADAPTER_NON_FINITE
        assert "non-finite activations" in last.error and "hostile" in last.error
        assert not tokens_of(results[rid])
    hostile_blocks = set().union(*(seen[i] for i in hostile_ids))
    fresh_blocks = set().union(*(seen[r.request_id] for r in waves[2]))
    assert hostile_blocks & fresh_blocks, "wave 3 should reuse the attackers' blocks"
    if "num_kv_blocks" in config:
        assert sum(s.preemptions for s in seqs) > 0, "the pool should force preemptions"
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
    assert engine.stats()["adapter_slots_in_use"] == 0
    assert_null_block_zero(engine)


def test_base_model_overflow_is_a_server_error(base_model):
    model = copy.deepcopy(base_model)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(1e30)
    engine = LLMEngine(model, None, EngineConfig(device=DEVICE, block_size=4, compile=COMPILE))
    out = run_to_completion(engine, [Request(prompt_ids=[5, 6, 7], request_id="x")])["x"]
    assert out[-1].finish_reason is FinishReason.ERROR
    assert out[-1].error_code is ErrorCode.NON_FINITE
    assert "server-side" in out[-1].error
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


def test_adapter_that_overflows_the_bank_is_refused(make, hostile_root, tmp_path, seed):
    """Finite factors and a bounded ΔW, but LoRA's scale folded into B overflows float32:
    refused at load (a failed request), never while installing on the engine thread."""
    gen = torch.Generator().manual_seed(seed)
    k, d = ARGS.n_embd, ARGS.n_embd + 2 * ARGS.head_dim
    layers = {
        f"transformer.h.{i}.attn.c_attn": LoraWeights(
            1e-4 * torch.rand(1, k, generator=gen), 1e35 * torch.ones(d, 1), alpha=1e6
        )
        for i in range(ARGS.n_layer)
    }
    save_adapter_dir(hostile_root / "overflow-bank", AdapterKind.LORA, layers)
    engine = make()
    engine.adapter_source.adapters["overflow-bank"] = hostile_root / "overflow-bank"
    prompt = random_prompts(seed, [6])[0]
    results = run_to_completion(
        engine,
        [
            Request(prompt_ids=prompt, params=greedy(4), adapter="overflow-bank", request_id="x"),
            Request(prompt_ids=prompt, params=greedy(4), request_id="ok"),
        ],
    )
    assert results["x"][-1].finish_reason is FinishReason.ERROR
    assert results["x"][-1].error_code is ErrorCode.ADAPTER_REFUSED
    assert "overflows this engine's float32" in results["x"][-1].error
    assert len(tokens_of(results["ok"])) == 4
    assert engine.stats()["adapter_slots_in_use"] == 0


def written_rows(engine: LLMEngine) -> torch.Tensor:
    """Pool rows holding a live sequence's keys/values, and the null block's rows."""
    kv, bs = engine.kv, engine.kv.block_size
    keep = torch.zeros((kv.num_blocks + 1) * bs, dtype=torch.bool)
    keep[kv.null_block * bs :] = True
    for seq in engine.scheduler.running:
        for p in range(seq.num_computed):
            keep[seq.blocks[p // bs] * bs + p % bs] = True
    return keep


@pytest.mark.parametrize("budget", [512, 7], ids=["whole-prefill", "chunked"])
def test_masked_positions_ignore_whatever_the_pool_holds(make_engine, reference, seed, budget):
    """NaN in every row no live sequence has written (free blocks, the unwritten tails of
    live sequences' last blocks), after every step: the outputs do not change."""
    engine = make_engine(max_num_batched_tokens=budget, num_kv_blocks=40)
    names = [None, "lora-r4", "flora-r2", None, "ia3-a", None]
    prompts = random_prompts(seed, [3, 10, 1, 17, 6, 9])
    requests = [
        Request(prompt_ids=p, params=greedy(7), adapter=n, request_id=f"r{i}")
        for i, (p, n) in enumerate(zip(prompts, names, strict=True))
    ]
    results: dict = defaultdict(list)
    for i, r in enumerate(requests):
        engine.add_request(r)
        for _ in range(i % 3):  # arrivals spread over steps: mixed lengths in every decode
            step(engine, results)
            engine.kv.data[:, :, ~written_rows(engine)] = float("nan")
    while engine.has_unfinished():
        step(engine, results)
        engine.kv.data[:, :, ~written_rows(engine)] = float("nan")
    for r, p, n in zip(requests, prompts, names, strict=True):
        assert results[r.request_id][-1].error is None
        assert tokens_of(results[r.request_id]) == reference(p, 7, n), n
    assert_null_block_zero(engine)


def test_freed_blocks_are_zero_before_reuse(make_engine, seed):
    engine = make_engine(adapters=False, num_kv_blocks=20)
    seen = record_blocks(engine)
    a, b = random_prompts(seed, [21, 2])
    run_to_completion(engine, [Request(prompt_ids=a, params=greedy(6), request_id="a")])
    kv, bs = engine.kv, engine.kv.block_size
    per_block = kv.data.view(*kv.data.shape[:2], kv.num_blocks + 1, bs, *kv.data.shape[3:])
    assert per_block[:, :, sorted(seen["a"])].any()  # A's keys and values, not yet scrubbed
    seq = engine.add_request(Request(prompt_ids=b, params=greedy(3), request_id="b"))
    engine.step()  # B's first forward scrubs A's blocks, then writes its own two rows
    assert set(seq.blocks) <= seen["a"]  # B reuses one of A's blocks
    mine = torch.zeros_like(per_block[0, 0, :, :, 0, 0], dtype=torch.bool)  # [blocks + 1, bs]
    for p in range(seq.num_computed):
        mine[seq.blocks[p // bs], p % bs] = True
    assert per_block[:, :, mine].ne(0).any()
    assert not per_block[:, :, ~mine].any()  # everything else, A's old rows included, is zero


def test_allocator_reports_each_freed_block_once(make_engine):
    engine = make_engine(adapters=False, num_kv_blocks=6)
    alloc = engine.allocator
    blocks = alloc.allocate(3)
    alloc.free(blocks[:2])
    again = alloc.allocate(2)
    alloc.free(again)
    assert alloc.take_freed() == sorted(set(blocks[:2]) | set(again))
    assert alloc.take_freed() == []
    assert engine.kv.null_block == alloc.num_blocks == 6
    assert engine.stats()["kv_blocks_total"] == 6
    with pytest.raises(ValueError, match="null block"):
        engine.kv.scrub([engine.kv.null_block])


def test_vanishing_temperature_is_greedy(make_engine, seed):
    prompt = random_prompts(seed, [8])[0]
    runs = {}
    for t in (0.0, 1e-300, 1e-6):
        params = SamplingParams(max_tokens=6, temperature=t, seed=seed, ignore_eos=True)
        assert params.greedy
        request = Request(prompt_ids=prompt, params=params, request_id="x")
        runs[t] = tokens_of(run_to_completion(make_engine(adapters=False), [request])["x"])
    assert len(runs[0.0]) == 6
    assert runs[1e-300] == runs[1e-6] == runs[0.0]
    assert not SamplingParams(temperature=1e-4).greedy


def test_logprob_of_an_impossible_token_is_openais_floor():
    logits = torch.tensor([[2.0, float("-inf"), 0.5, float("-inf")]])
    params = [SamplingParams(temperature=0, logprobs=4)]
    (lp,) = logprobs_of(logits, [1], params)
    assert lp.logprob == LOGPROB_FLOOR == -9999.0
    assert [v for _, v in lp.top][2:] == [-9999.0, -9999.0]
    json.dumps([lp.logprob, lp.top], allow_nan=False)  # JSON has no -Infinity
