"""Training and held-out token streams per language, from a folder, a JSONL file or this machine.

``flora train`` and ``flora eval`` must see the same split, so both go through
:func:`load_language_data` with the same source, seed and held-out fraction: files are split
whole (no file on both sides), then each side is tokenised into one stream per language.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flora.model.tiny.build import token_stream
from flora.model.tiny.corpus import LANGUAGES, collect, read_source, split_holdout
from flora.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class LanguageData:
    """One language's token streams: ``train`` for sampling windows, ``held_out`` for scoring."""

    language: str
    train: torch.Tensor  # [N] token ids, files separated by <|endoftext|>
    held_out: torch.Tensor  # [M]
    files: tuple[int, int]  # (train files, held-out files)


def load_texts(
    source: str | Path | None,
    languages: Sequence[str],
    *,
    max_bytes_per_language: int = 1_000_000,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Texts per language from ``source``.

    - ``None``: source files found on this machine (:func:`flora.model.tiny.corpus.collect`);
    - a folder: files under it whose names match each language's patterns (``*.pl``, ``*.tcl``…);
    - a ``.jsonl`` file: one ``{"text": ..., "language": ...}`` object per line.
    """
    if not languages:
        raise ValueError("name at least one language")
    if source is None:
        return collect(languages, max_bytes_per_language, seed)
    path = Path(source)
    if path.is_dir():
        texts = {lang: _folder_texts(path, lang, max_bytes_per_language) for lang in languages}
    elif path.is_file():
        texts = _jsonl_texts(path, languages)
    else:
        raise FileNotFoundError(f"training data {path} is neither a folder nor a .jsonl file")
    empty = [lang for lang, found in texts.items() if not found]
    if empty:
        raise ValueError(f"{path} holds no usable text for {empty}")
    return texts


def _folder_texts(root: Path, language: str, budget: int) -> list[str]:
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; choose from {sorted(LANGUAGES)}")
    patterns = LANGUAGES[language].patterns
    texts, size = [], 0
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if size >= budget or not any(fnmatch.fnmatch(name, p) for p in patterns):
                continue
            text = read_source(Path(folder, name))
            if text is not None:
                texts.append(text)
                size += len(text.encode())
    return texts


def _jsonl_texts(path: Path, languages: Sequence[str]) -> dict[str, list[str]]:
    texts: dict[str, list[str]] = {lang: [] for lang in languages}
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON: {e.msg}") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ValueError(f"{path}:{number}: expected an object with a string 'text'")
            language = row.get("language", languages[0] if len(languages) == 1 else None)
            if language is None:
                raise ValueError(f"{path}:{number}: no 'language' field, and several languages")
            if language in texts:
                texts[language].append(row["text"])
    return texts


def load_language_data(
    tokenizer: Tokenizer,
    source: str | Path | None,
    languages: Sequence[str],
    *,
    held_out_fraction: float = 0.1,
    max_bytes_per_language: int = 1_000_000,
    seed: int = 0,
) -> dict[str, LanguageData]:
    """Split each language's texts by file and tokenise both sides (same inputs, same split)."""
    texts = load_texts(source, languages, max_bytes_per_language=max_bytes_per_language, seed=seed)
    train, held = split_holdout(texts, held_out_fraction, seed)
    out = {}
    for lang in languages:
        if not held[lang]:
            raise ValueError(f"{lang}: one file cannot be split into training and held-out text")
        out[lang] = LanguageData(
            language=lang,
            train=token_stream(tokenizer, train[lang]),
            held_out=token_stream(tokenizer, held[lang]),
            files=(len(train[lang]), len(held[lang])),
        )
    return out


def heldout_windows(stream: torch.Tensor, seq_len: int, max_windows: int) -> torch.Tensor:
    """Up to ``max_windows`` non-overlapping ``[n, seq_len + 1]`` windows spread evenly over
    ``stream``.

    Deterministic (no sampling), so every run and every adapter is scored on the same tokens, and
    spread over the whole held-out text rather than its first file. A stream shorter than one
    window gives a single shorter window.
    """
    step = seq_len + 1
    n = min(max_windows, len(stream) // step)
    if n == 0:
        if len(stream) < 2:
            raise ValueError("held-out text is too short to score (under two tokens)")
        return stream[None, :]
    # n ≤ len // step, so starts at least `step` apart never overlap
    starts = torch.linspace(0, len(stream) - step, n).round().long()
    return stream[starts[:, None] + torch.arange(step)]
