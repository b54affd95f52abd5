"""The compiled engine (``compile: default``) decodes exactly what the dense reference does."""

from __future__ import annotations

import pytest

from flora.engine import Request, SamplingParams, run_to_completion
from tests.engine.conftest import ADAPTERS, random_prompts, tokens_of


def test_compiled_engine_equals_dense_reference(make_engine, reference, seed):
    engine = make_engine(compile="default", adapter_slots=8, max_num_batched_tokens=24)
    assert engine.compile_seconds > 0
    assert all(b.compiled_feed_forward is not None for b in engine.model.transformer.h)
    names = [*list(ADAPTERS)[:6], None, None]
    prompts = random_prompts(seed, [1, 4, 9, 17, 30, 3, 12, 25])  # varying token counts
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    requests = [
        Request(prompt_ids=p, params=params, adapter=n) for p, n in zip(prompts, names, strict=True)
    ]
    results = run_to_completion(engine, requests)
    for r, p, n in zip(requests, prompts, names, strict=True):
        assert tokens_of(results[r.request_id]) == reference(p, 6, n), f"adapter {n}"


def test_adapters_on_the_mlp_keep_it_eager(make_engine):
    engine = make_engine(compile="default", adapter_targets=("c_attn", "mlp.c_fc"))
    assert engine.compile_seconds == 0
    assert all(b.compiled_feed_forward is None for b in engine.model.transformer.h)


def test_unknown_compile_mode_is_refused(make_engine):
    with pytest.raises(ValueError, match="compile"):
        make_engine(compile="fast")
