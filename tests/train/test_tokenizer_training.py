"""The byte-level BPE: exact round trips, StarCoder's special tokens, loads in transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoTokenizer

from flora.model.tiny.bpe import SPECIAL_TOKENS, save_tokenizer, train_tokenizer
from flora.model.tiny.corpus import collect
from flora.model.tokenizer import Tokenizer

SAMPLES = [
    "def add(a, b):\n    return a + b  # 12345\n",
    '#include <stdio.h>\r\nint main(void) {\r\n\tprintf("%d\\n", 42);\r\n}\r\n',
    "my $café = 'naïve';  # Perl\n",
    "const s = `日本語 🚀 ${x}`;\n\n\n    \t  trailing  ",
    "  leading spaces and a lone \u00a0nbsp and \u200b zero width",
]


@pytest.fixture(scope="module")
def bpe() -> HFTokenizer:
    texts = [t for ts in collect(["python", "c"], 50_000, seed=0).values() for t in ts]
    return train_tokenizer(texts, vocab_size=600)


def test_special_tokens_come_first_like_starcoder(bpe: HFTokenizer) -> None:
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert bpe.get_vocab_size() == 600
    ids = bpe.encode("<fim_prefix>x<fim_suffix>").ids
    assert ids[0] == bpe.token_to_id("<fim_prefix>")


@pytest.mark.parametrize("text", SAMPLES)
def test_code_round_trips_exactly(bpe: HFTokenizer, text: str) -> None:
    ids = bpe.encode(text, add_special_tokens=False).ids
    assert bpe.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned


def test_saved_files_load_in_flora_and_transformers(bpe: HFTokenizer, tmp_path: Path) -> None:
    save_tokenizer(bpe, tmp_path, model_max_length=256)
    ours = Tokenizer.from_dir(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert ours.eos_token_id == theirs.eos_token_id == theirs.bos_token_id == 0
    assert theirs.model_max_length == 256
    for text in SAMPLES:
        ids = ours.encode(text)
        assert theirs.encode(text) == ids
        assert ours.decode(ids) == theirs.decode(ids) == text


def test_too_small_vocab_is_refused() -> None:
    with pytest.raises(ValueError, match="256 bytes"):
        train_tokenizer(["x"], vocab_size=100)
