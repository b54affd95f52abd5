"""An engine forced onto the Triton paths decodes the same greedy tokens as the default paths.

On CPU the kernels run under Triton's interpreter (``tests/adapters/triton_interpreter.py``;
in a full run the module reruns in a fresh interpreter), so the batch is kept small: a few mixed
FLoRA/LoRA/base requests, a few tokens each.
"""

from __future__ import annotations

from collections import Counter

import pytest

from flora.adapters import AdapterKind, KernelPath
from flora.adapters import layer as layer_module
from flora.engine import Request, SamplingParams, run_to_completion
from tests.adapters.triton_interpreter import prepare, rerun_fresh, skip_unless
from tests.engine.conftest import DEVICE, random_prompts, tokens_of

READY = prepare(DEVICE)  # before anything else imports triton
pytest.importorskip("triton")

TRITON = {AdapterKind.FLORA: KernelPath.FLORA_TRITON, AdapterKind.LORA: KernelPath.LORA_BGMV_TRITON}
NAMES = ["flora-r1-a", "flora-r4", "lora-r4", "lora-r1", None]


def greedy_tokens(engine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    requests = [
        Request(prompt_ids=p, params=params, adapter=n) for p, n in zip(prompts, NAMES, strict=True)
    ]
    results = run_to_completion(engine, requests)
    return [tokens_of(results[r.request_id]) for r in requests]


def count_calls(monkeypatch, calls: Counter) -> None:
    """Count the layer's calls into each Triton path (the kernels still run)."""
    for name in ("flora_triton", "lora_bgmv_triton"):
        real = getattr(layer_module, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(layer_module, name, counted)


@skip_unless(READY)
def test_forced_triton_paths_decode_the_default_paths_tokens(make_engine, seed, monkeypatch):
    prompts = random_prompts(seed, [3, 9, 5, 12, 4])
    expected = greedy_tokens(make_engine(adapter_slots=8), prompts)
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls: Counter = Counter()
    count_calls(monkeypatch, calls)
    engine = make_engine(adapter_slots=8, adapter_paths=TRITON)
    assert greedy_tokens(engine, prompts) == expected
    assert calls["flora_triton"] > 0 and calls["lora_bgmv_triton"] > 0


@pytest.mark.skipif(READY, reason="the engine test ran in this process")
def test_in_a_fresh_interpreter():
    rerun_fresh(__file__)
