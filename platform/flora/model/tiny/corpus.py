"""Source code found on this machine, by language: a training corpus without a network.

Each language has a few conventional install locations (the running Python's stdlib, C headers,
Perl/Tcl/Node modules…) and file patterns. :func:`collect` reads a seeded random sample of those
files up to a byte budget per language. Files are kept only if they are small (≤ 200 KB), valid
UTF-8, not binary, and not minified (no line over 1,000 characters, StarCoder's filter), so the
same seed gives the same texts on the same machine.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import math
import os
import random
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MAX_FILE_BYTES = 200_000
MAX_LINE_CHARS = 1_000
# Folders never searched: installed third-party packages and build caches.
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git"})


@dataclass(frozen=True)
class Language:
    """Where a language's source lives on a Linux machine, and what its files are called."""

    name: str
    roots: tuple[str, ...]  # folders, shell globs allowed (``/usr/lib/tcl*``)
    patterns: tuple[str, ...]  # file name globs (``*.py``)
    skip_dirs: frozenset[str] = frozenset()  # extra folder names not searched

    def search_paths(self) -> list[Path]:
        """The existing folders named by :attr:`roots`, sorted, without duplicates."""
        roots = (os.path.expanduser(r) for r in self.roots)
        found = {Path(p) for root in roots for p in glob.glob(root) if Path(p).is_dir()}
        return sorted(found)


def _stdlib() -> str:
    return sysconfig.get_paths()["stdlib"]


LANGUAGES: dict[str, Language] = {
    lang.name: lang
    for lang in (
        Language("python", (_stdlib(),), ("*.py",)),
        Language("c", ("/usr/include",), ("*.h",), frozenset({"c++"})),
        Language("cpp", ("/usr/include/c++", "/usr/include/boost"), ("*.hpp", "*.tcc", "*.h")),
        Language(
            "perl",
            (
                "/usr/share/perl*",
                "/usr/lib/x86_64-linux-gnu/perl*",
                "/usr/lib/aarch64-linux-gnu/perl*",
            ),
            ("*.pm", "*.pl"),
        ),
        Language(
            "javascript",
            ("/usr/lib/node_modules", "/usr/share/nodejs", "/usr/share/javascript"),
            ("*.js", "*.mjs", "*.cjs"),
        ),
        Language(
            "php",
            (
                "/usr/share/php",
                "/usr/lib/php",
                "/usr/share/pear",
                "/usr/lib/google-cloud-sdk/platform/google_appengine/php",
            ),
            ("*.php",),
        ),
        Language("tcl", ("/usr/share/tcltk", "/usr/lib/tcl*", "/usr/share/tcl*"), ("*.tcl",)),
        Language("shell", ("/etc", "/usr/share", "/usr/lib", "/usr/libexec"), ("*.sh", "*.bash")),
        Language("sql", ("/usr/share/postgresql*", "/usr/share/mysql*"), ("*.sql",)),
        Language("cmake", ("/usr/share/cmake*", "/usr/lib/cmake"), ("*.cmake", "CMakeLists.txt")),
        Language("ruby", ("/usr/lib/ruby", "/usr/share/ruby*", "/var/lib/gems"), ("*.rb",)),
        Language("go", ("/usr/lib/go*/src", "/usr/share/go*/src", "/usr/local/go/src"), ("*.go",)),
        Language("rust", ("~/.rustup/toolchains/*/lib/rustlib/src",), ("*.rs",)),
    )
}


def source_files(language: str) -> list[Path]:
    """Every file of ``language`` under its search paths, sorted (no size or content checks)."""
    return list(_source_files(_language(language)))


@functools.cache  # one walk per language and process: the folders are system installs
def _source_files(lang: Language) -> tuple[Path, ...]:
    skip = SKIP_DIRS | lang.skip_dirs
    found: set[Path] = set()
    for root in lang.search_paths():
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in skip)
            for name in files:
                if any(fnmatch.fnmatch(name, p) for p in lang.patterns):
                    path = Path(folder, name)
                    if path.is_file() and not path.is_symlink():
                        found.add(path)
    return tuple(sorted(found))


def available_languages() -> list[str]:
    """The languages in :data:`LANGUAGES` with at least one file on this machine."""
    return [name for name in LANGUAGES if source_files(name)]


def read_source(path: Path) -> str | None:
    """The file's text, or None when it is too big, binary, not UTF-8, empty or minified."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if not data.strip() or b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if max(map(len, text.splitlines()), default=0) > MAX_LINE_CHARS:
        return None
    return text


def collect(
    languages: Iterable[str] | None = None,
    max_bytes_per_language: int = 1_000_000,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Texts of source files per language, a seeded sample of about ``max_bytes_per_language``.

    ``languages=None`` takes every available language. Files are shuffled with ``seed`` and
    taken until the budget is reached (the last file may overshoot), so the result is the same
    for the same seed on the same machine. A requested language with no usable file is an error.
    """
    names = available_languages() if languages is None else list(dict.fromkeys(languages))
    if not names:
        raise ValueError("no source code found on this machine for any known language")
    corpus: dict[str, list[str]] = {}
    for name in names:
        lang = _language(name)
        files = source_files(name)
        random.Random(f"{seed}:{name}").shuffle(files)
        texts: list[str] = []
        size = 0
        for path in files:
            if size >= max_bytes_per_language:
                break
            text = read_source(path)
            if text is not None:
                texts.append(text)
                size += len(text.encode())
        if not texts:
            searched = [str(p) for p in lang.search_paths()] or list(lang.roots)
            raise ValueError(
                f"no usable {name} source ({', '.join(lang.patterns)}) found on this machine; "
                f"searched {searched}. Available: {available_languages()}"
            )
        corpus[name] = texts
    return corpus


def split_holdout(
    corpus: Mapping[str, Sequence[str]], fraction: float = 0.1, seed: int = 0
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``(train, held_out)`` per language, split by whole file so no file is in both.

    Each language with two or more files keeps at least one on each side; a single file stays in
    ``train``. The split depends only on ``seed`` and the order of the texts.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    train: dict[str, list[str]] = {}
    held: dict[str, list[str]] = {}
    for name, texts in corpus.items():
        n = len(texts)
        k = min(max(math.ceil(fraction * n), 1 if fraction > 0 else 0), n - 1) if n > 1 else 0
        picked = set(random.Random(f"{seed}:{name}:holdout").sample(range(n), k))
        train[name] = [t for i, t in enumerate(texts) if i not in picked]
        held[name] = [t for i, t in enumerate(texts) if i in picked]
    return train, held


def corpus_stats(corpus: Mapping[str, Sequence[str]]) -> dict[str, dict[str, int]]:
    """Files and UTF-8 bytes per language, for the record of how a model was built."""
    return {
        name: {"files": len(texts), "bytes": sum(len(t.encode()) for t in texts)}
        for name, texts in corpus.items()
    }


def _language(name: str) -> Language:
    try:
        return LANGUAGES[name]
    except KeyError:
        raise ValueError(f"unknown language {name!r}; choose from {sorted(LANGUAGES)}") from None
