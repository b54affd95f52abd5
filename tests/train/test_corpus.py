"""The corpus of code found on this machine: deterministic, filtered, split by whole file."""

from __future__ import annotations

from pathlib import Path

import pytest

from flora.model.tiny.corpus import (
    LANGUAGES,
    MAX_FILE_BYTES,
    available_languages,
    collect,
    read_source,
    source_files,
    split_holdout,
)


def test_collect_is_deterministic_per_seed_and_keyed_by_language() -> None:
    a = collect(["python", "c"], max_bytes_per_language=20_000, seed=1)
    b = collect(["python", "c"], max_bytes_per_language=20_000, seed=1)
    other = collect(["python", "c"], max_bytes_per_language=20_000, seed=2)
    assert list(a) == ["python", "c"]
    assert a == b
    assert a != other
    for texts in a.values():
        assert texts and all(t.strip() for t in texts)
        assert all(len(t.encode()) <= MAX_FILE_BYTES for t in texts)
        # The budget stops the sample; the last file may overshoot by at most one file.
        assert sum(len(t.encode()) for t in texts[:-1]) < 20_000


def test_every_available_language_yields_text() -> None:
    languages = available_languages()
    assert "python" in languages  # the running interpreter's stdlib is always there
    corpus = collect(None, max_bytes_per_language=2_000, seed=0)
    assert list(corpus) == languages


def test_unknown_or_absent_language_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown language 'cobol'"):
        collect(["cobol"])
    absent = [name for name in LANGUAGES if not source_files(name)]
    if not absent:
        pytest.skip("every known language has source files on this machine")
    with pytest.raises(ValueError, match=f"no usable {absent[0]} source.*searched"):
        collect([absent[0]])


def test_read_source_skips_binary_non_utf8_big_and_minified_files(tmp_path: Path) -> None:
    files = {
        "ok.py": "def f():\n    return 'héllo'\n".encode(),
        "binary.h": b"int x;\0\1\2",
        "latin1.pl": "my $s = 'caf\xe9';\n".encode("latin-1"),
        "big.js": b"x = 1;\n" * (MAX_FILE_BYTES // 7 + 1),
        "min.js": b"var a=1;" * 200,
        "empty.sh": b"\n\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    kept = {name for name in files if read_source(tmp_path / name) is not None}
    assert kept == {"ok.py"}


def test_split_holdout_is_by_whole_file_and_deterministic() -> None:
    corpus = {"a": [f"file {i}" for i in range(20)], "b": ["one"], "c": ["x", "y"]}
    train, held = split_holdout(corpus, fraction=0.1, seed=3)
    assert (train, held) == split_holdout(corpus, fraction=0.1, seed=3)
    assert len(held["a"]) == 2 and len(train["a"]) == 18
    assert sorted(train["a"] + held["a"]) == sorted(corpus["a"])
    assert held["b"] == [] and train["b"] == ["one"]  # a lone file stays in train
    assert len(held["c"]) == 1 and len(train["c"]) == 1
    with pytest.raises(ValueError, match="fraction"):
        split_holdout(corpus, fraction=1.0)
