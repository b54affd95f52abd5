"""Train a byte-level BPE tokenizer like StarCoder's, saved so transformers loads it offline.

Byte-level BPE never meets an unknown character: every string maps to bytes, so code in any
language and any Unicode text round-trips exactly (``decode(encode(s)) == s``). As in StarCoder,
digits are split one by one and there is no normaliser.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# StarCoder's special tokens we use; <|endoftext|> is id 0 and serves as bos, eos and unk.
SPECIAL_TOKENS = (
    EOS_TOKEN,
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2
) -> Tokenizer:
    """A byte-level BPE of at most ``vocab_size`` tokens (fewer if the texts run out of merges)."""
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size {vocab_size} is below {MIN_VOCAB_SIZE}: 256 bytes + "
            f"{len(SPECIAL_TOKENS)} special tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(
    tokenizer: Tokenizer, directory: str | Path, *, model_max_length: int = 1024
) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

    The config names ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained(directory)``
    needs no Python class of ours, and turns off the space clean-up that would break code.
    """
    if tokenizer.token_to_id(EOS_TOKEN) != 0:
        raise ValueError(f"{EOS_TOKEN} must be token 0 (as in StarCoder)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    specials = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json",
        {**specials, "additional_special_tokens": list(SPECIAL_TOKENS[1:])},
    )
    return out


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
