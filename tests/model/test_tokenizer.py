"""``Tokenizer`` and ``IncrementalDecoder`` on a byte-level BPE trained here, StarCoder's kind.

The vocabulary is small (300) on purpose: most non-ASCII characters ("語", "🚀") stay split
over several byte tokens, which is exactly what streaming detokenisation must get right.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from flora.model import CheckpointError, IncrementalDecoder, Tokenizer

EOS = "<|endoftext|>"
CORPUS = [
    "def café(x):\n    return x + 1  # é\n",
    "names = ['日本', 'España', 'naïve']\nfor n in names:\n    print(n)\n",
    'print("hello 🙂 world")  # emoji 🙂🚀\n',
    "class Foo:\n    def __init__(self):\n        self.value = 0\n",
    "// 日本語のコメント\nint main() { return 0; }\n",
]
# Characters drawn for random texts: ASCII, 2-, 3- and 4-byte UTF-8, with and without merges.
ALPHABET = [*"abc xyz_(){}=+\n\t'\"#", "é", "ï", "ñ", "日", "本", "語", "の", "🙂", "🚀", "𝔘"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    inner.train_from_iterator(CORPUS * 10, trainer)
    directory = tmp_path_factory.mktemp("tokenizer")
    inner.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return directory


@pytest.fixture
def tok(tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


@pytest.fixture
def rng(seed) -> random.Random:
    return random.Random(seed)


def test_reads_vocab_and_eos(tok):
    assert tok.vocab_size == 300
    assert tok.eos_token_id == tok.inner.token_to_id(EOS)
    assert tok.eos_token_id is not None


def test_eos_given_as_added_token_object(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    config = {"eos_token": {"content": EOS, "lstrip": False, "__type": "AddedToken"}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_id == tok.inner.token_to_id(EOS)


def test_without_tokenizer_config_there_is_no_eos(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    assert Tokenizer.from_dir(tmp_path).eos_token_id is None


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer\.json not found"):
        Tokenizer.from_dir(tmp_path)


def test_round_trip(tok, rng):
    texts = [*CORPUS, "x = '日本語 café 🙂🚀'\n", "  leading spaces", ""]
    texts += [random_text(rng, rng.randint(1, 60)) for _ in range(30)]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    # the vocabulary really splits characters, or the streaming tests below prove little
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode("語🚀𝔘"))


def test_eos_is_skipped_when_decoding(tok):
    ids = tok.encode("print(1)")
    assert EOS not in tok.decode([*ids, tok.eos_token_id])
    assert tok.decode([*ids, tok.eos_token_id]) == "print(1)"


def stream(decoder: IncrementalDecoder, ids: list[int], rng: random.Random) -> list[str]:
    """Push ``ids`` in random pieces of 1–3 tokens; the deltas returned."""
    deltas, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        deltas.append(decoder.push(ids[i : i + n]))
        i += n
    return deltas


def test_incremental_one_token_at_a_time(tok, rng):
    texts = ["x = '日本語 café 🙂🚀'\n", "𝔘𝔘𝔘", "é"]
    texts += [random_text(rng, rng.randint(1, 40)) for _ in range(20)]
    for text in texts:
        ids = tok.encode(text)
        decoder = IncrementalDecoder(tok)
        deltas, shown = [], ""
        for token in ids:
            delta = decoder.push([token])
            assert "\ufffd" not in delta, f"{text!r}: U+FFFD emitted mid-character"
            shown += delta
            assert text.startswith(shown)
            deltas.append(delta)
        assert "".join(deltas) == decoder.text == tok.decode(ids) == text
        split = sum(1 for t in ids if "\ufffd" in tok.decode([t]))
        assert deltas.count("") >= (1 if split else 0)


def test_incremental_in_pieces_after_a_prompt(tok, rng):
    for _ in range(20):
        prompt = random_text(rng, rng.randint(1, 30))
        completion = random_text(rng, rng.randint(1, 30))
        prompt_ids = tok.encode(prompt)
        ids = tok.encode(completion)
        decoder = IncrementalDecoder(tok, prompt_ids)
        deltas = stream(decoder, ids, rng)
        assert all("\ufffd" not in d for d in deltas)
        expected = tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)) :]
        assert "".join(deltas) == expected == completion


def test_leading_space_after_prompt_is_kept(tok):
    prompt_ids = tok.encode("def")
    ids = tok.encode(" café")
    decoder = IncrementalDecoder(tok, prompt_ids)
    assert "".join(decoder.push([t]) for t in ids) == " café"
