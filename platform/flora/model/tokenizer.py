"""The checkpoint's ``tokenizer.json`` (HF fast tokenizer format) and streaming detokenisation."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from flora.model.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


class Tokenizer:
    """Encode and decode text with a byte-level BPE ``tokenizer.json`` (StarCoder's kind)."""

    def __init__(self, inner: _HFTokenizer, eos_token_id: int | None = None) -> None:
        self.inner = inner
        self.eos_token_id = eos_token_id

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        directory = Path(directory)
        file = directory / TOKENIZER_FILE
        if not file.is_file():
            raise CheckpointError(f"{file} not found: the checkpoint needs a fast tokenizer file")
        eos = None
        config = directory / "tokenizer_config.json"
        inner = _HFTokenizer.from_file(str(file))
        if config.is_file():
            token = json.loads(config.read_text()).get("eos_token")
            token = token.get("content") if isinstance(token, dict) else token
            eos = inner.token_to_id(token) if token else None
        return cls(inner, eos)

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=True)


class IncrementalDecoder:
    """Text deltas for a growing token list, never splitting a multi-byte character.

    Byte-level BPE tokens may end inside a UTF-8 character; such a tail decodes to U+FFFD and
    is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = list(prompt_ids[-4:])  # context so leading spaces decode as they would
        self._prefix_text = tokenizer.decode(self._prefix)

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(token_ids)
        text = self.tokenizer.decode(self._prefix + self.ids)[len(self._prefix_text) :]
        if text.endswith("\ufffd"):
            return ""
        delta, self.emitted = text[len(self.emitted) :], text
        return delta

    @property
    def text(self) -> str:
        return self.emitted
