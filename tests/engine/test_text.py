"""Text in, text out: tokenisation, streamed text deltas, stop strings, ``LLM`` and the CLI."""

from __future__ import annotations

import copy
import json
import shutil

import pytest

from flora.cli import main
from flora.engine import LLM, EngineConfig, FinishReason, Request, SamplingParams, run_to_completion
from flora.model import Tokenizer, save_model
from tests.engine.conftest import tokens_of

PROMPTS = ["def main():\n    ", "import os\nclass ", "# é 日本\nx = "]


@pytest.fixture
def text_engine(make_engine, tokenizer_dir):
    engine = make_engine()
    engine.tokenizer = Tokenizer.from_dir(tokenizer_dir)
    engine.eos_token_id = None  # random weights: let max_tokens decide
    return engine


def test_text_deltas_concatenate_to_the_decoded_tokens(text_engine):
    requests = [
        Request(prompt=p, params=SamplingParams(max_tokens=24, temperature=0.8, seed=i))
        for i, p in enumerate(PROMPTS)
    ]
    results = run_to_completion(text_engine, requests)
    for r in requests:
        outs = results[r.request_id]
        text = "".join(o.text for o in outs)
        assert text == text_engine.tokenizer.decode(tokens_of(outs))
        assert outs[-1].usage.prompt_tokens == len(text_engine.tokenizer.encode(r.prompt))


def test_stop_strings_cut_the_text_and_are_never_streamed(text_engine):
    prompt = PROMPTS[0]
    params = SamplingParams(max_tokens=40, temperature=0)
    free = run_to_completion(text_engine, [Request(prompt=prompt, params=params, request_id="f")])
    full = "".join(o.text for o in free["f"])
    assert len(full) > 12, "needs some text to cut"
    stop = full[8:11]
    cut = full.index(stop)
    stopped = run_to_completion(
        text_engine,
        [
            Request(
                prompt=prompt, params=params.model_copy(update={"stop": (stop,)}), request_id="s"
            )
        ],
    )["s"]
    assert "".join(o.text for o in stopped) == full[:cut]
    assert stopped[-1].finish_reason is FinishReason.STOP
    assert all(stop not in o.text for o in stopped)
    assert text_engine.stats()["kv_blocks_free"] == text_engine.allocator.num_blocks


@pytest.fixture
def checkpoint(base_model, tokenizer_dir, tmp_path):
    directory = save_model(copy.deepcopy(base_model).cpu(), tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def test_llm_generates_per_prompt_adapters(checkpoint, adapter_root, tmp_path):
    llm = LLM(
        checkpoint,
        EngineConfig(adapter_cache_dir=tmp_path / "c"),
        adapters={"a": adapter_root / "flora-r2", "b": adapter_root / "lora-r4"},
    )
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = llm.generate(PROMPTS, params, adapter=["a", "b", None])
    assert [c.adapter.split("@")[0] if c.adapter else None for c in out] == ["a", "b", None]
    assert all(len(c.token_ids) == 8 and c.finish_reason is FinishReason.LENGTH for c in out)
    again = llm.generate(PROMPTS[:1], params, adapter="a")
    assert again[0].token_ids == out[0].token_ids
    llm.engine.close()


def test_generate_cli_json(checkpoint, adapter_root, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(checkpoint),
            "--adapter",
            f"x={adapter_root / 'ia3-a'}",
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--max-tokens",
            "5",
            "--json",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in records] == PROMPTS[:2]
    assert all(len(r["token_ids"]) <= 5 and r["adapter"].startswith("x@") for r in records)


def test_generate_cli_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "flora make-tiny-model" in err and "huggingface-cli download" in err
    assert main(["generate", "--model", "m", "--adapter", "oops", "--prompt", "x"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err
