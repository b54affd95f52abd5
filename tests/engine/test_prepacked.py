"""bf16 on CPU runs its linears on oneDNN-prepacked weights: the same tokens, packed or not."""

from __future__ import annotations

import copy

import pytest
import torch

from flora.engine import (
    EngineConfig,
    LLMEngine,
    LocalAdapterSource,
    Request,
    SamplingParams,
    run_to_completion,
)
from flora.model.prepacked import prepacking_supported
from tests.engine.conftest import ADAPTERS, DEVICE, random_prompts, tokens_of

pytestmark = pytest.mark.skipif(
    not prepacking_supported(torch.device(DEVICE), torch.bfloat16),
    reason="prepacked weights are a CPU (oneDNN) feature",
)


def test_packed_and_plain_bf16_engines_decode_alike(base_model, adapter_root, tmp_path, seed):
    names = [*list(ADAPTERS)[:5], None, None]
    prompts = random_prompts(seed, [2, 7, 13, 21, 4, 30, 9])
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    results, engines = {}, {}
    for packed in (True, False):
        model = copy.deepcopy(base_model).to(torch.bfloat16)
        config = EngineConfig(
            device=DEVICE,
            block_size=4,
            prepack_weights=packed,
            adapter_cache_dir=tmp_path / f"cache-{packed}",
        )
        engine = engines[packed] = LLMEngine(
            model, None, config, LocalAdapterSource(root=adapter_root)
        )
        requests = [
            Request(prompt_ids=p, params=params, adapter=n)
            for p, n in zip(prompts, names, strict=True)
        ]
        outs = run_to_completion(engine, requests)
        results[packed] = [tokens_of(outs[r.request_id]) for r in requests]
        engine.close()
    # every plain linear (MLP, attention output) and each adapted layer's base
    assert engines[True].prepacked_linears == 4 * base_model.args.n_layer
    assert engines[False].prepacked_linears == 0
    assert results[True] == results[False]


def test_fp32_is_left_alone(make_engine):
    assert make_engine().prepacked_linears == 0
