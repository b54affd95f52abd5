"""``make_tiny_model``: a checkpoint our loader and transformers read alike, cached by options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPTBigCodeForCausalLM

from flora.cli import main
from flora.model.checkpoint import load_model
from flora.model.tiny.build import RECORD
from flora.model.tokenizer import Tokenizer
from flora.train import ensure_tiny_model, make_tiny_model

# Two languages keep an untrained micro build near a second on a 2-core CPU.
FAST = {"preset": "micro", "languages": ["python", "c"], "progress": False}
CODE = "def greet(name):\n    print(f'héllo {name} 🚀')\n\nint main() { return 0; }\n"


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("micro") / "model", **FAST)


def test_flora_and_transformers_load_the_same_model(micro_dir: Path) -> None:
    ours, tokenizer = load_model(micro_dir), Tokenizer.from_dir(micro_dir)
    theirs = GPTBigCodeForCausalLM.from_pretrained(micro_dir, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(micro_dir)

    ids = tokenizer.encode(CODE)
    assert hf_tokenizer.encode(CODE) == ids
    assert tokenizer.decode(ids) == CODE
    assert ours.args.vocab_size == tokenizer.vocab_size == theirs.config.vocab_size
    assert ours.args.eos_token_id == tokenizer.eos_token_id == hf_tokenizer.eos_token_id == 0

    input_ids = torch.tensor([ids])
    with torch.no_grad():
        expected = theirs(input_ids).logits
        got = ours(input_ids)
    assert (got - expected).abs().max().item() <= 1e-4


def test_untrained_build_is_deterministic(micro_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", **FAST)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (micro_dir / name).read_bytes(), name
    record = json.loads((again / RECORD).read_text())
    assert record["options"]["preset"] == "micro" and record["languages"] == ["python", "c"]
    assert set(record["corpus"]) == {"python", "c"}


def test_ensure_reuses_a_matching_dir_and_rebuilds_when_options_differ(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    ensure_tiny_model(out, **FAST)
    weights = out / "model.safetensors"
    built = weights.stat().st_mtime_ns
    assert ensure_tiny_model(out, **FAST) == out
    assert weights.stat().st_mtime_ns == built  # reused, not rebuilt

    ensure_tiny_model(out, **{**FAST, "seed": 1})
    assert weights.stat().st_mtime_ns != built
    assert json.loads((out / RECORD).read_text())["options"]["seed"] == 1


def test_a_foreign_directory_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not built by make-tiny-model"):
        ensure_tiny_model(tmp_path, **FAST)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_short_training_run_lowers_the_loss(tmp_path: Path) -> None:
    out = make_tiny_model(tmp_path / "trained", train_seconds=3.0, seq_len=64, lr=3e-3, **FAST)
    record = json.loads((out / RECORD).read_text())
    assert record["training"]["steps"] > 5
    assert record["final_loss"] < record["initial_loss"] - 0.3


def test_cli_builds_then_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["make-tiny-model", str(tmp_path / "m"), "--preset", "micro", "--languages", "python"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert "building micro" in first and "params, vocab" in first
    assert main(argv) == 0
    assert "already holds" in capsys.readouterr().out
    assert main([*argv[:4], "--languages", "cobol"]) == 2
    assert "unknown language 'cobol'" in capsys.readouterr().err
