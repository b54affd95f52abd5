"""pass@k on MultiPL-E-style problems: sample n completions, run each with its tests, count.

A problem is MultiPL-E's record: a ``prompt`` that ends with the function's signature (and its
docstring as comments), ``tests`` that exit non-zero on a wrong answer, and the language's
``stop_tokens``. Each completion is cut at its first stop token (:func:`truncate`), run as
``prompt + completion + tests`` in the sandbox (:mod:`flora.train.sandbox`), and a problem with c
passing samples out of n scores the unbiased estimator of Chen et al. (2021)

    pass@k = 1 − C(n−c, k) / C(n, k) = 1 − Π_{i=n−c+1..n} (1 − k / i)

averaged over problems, per language and overall. Completions come from an injected
``generate(prompts, n, temperature) -> n texts per prompt``, so the same harness scores the
engine (:func:`engine_generator`), another server, or a fixed list in tests.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm.auto import tqdm

from flora.train.sandbox import (
    TOOLCHAINS,
    SandboxResult,
    available_languages,
    network_isolation,
    run_program,
)

if TYPE_CHECKING:
    from flora.engine.llm import LLM

DEFAULT_PROBLEMS = Path(__file__).parent / "problems" / "humaneval-mini.jsonl"

# MultiPL-E's stop tokens per language (dataset_builder/humaneval_to_*.py); for Python the
# Codex/HumanEval set that also ends at a top-level test or print.
STOP_TOKENS: dict[str, tuple[str, ...]] = {
    "python": ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#"),
    "perl": ("\nsub", "\n#", "\n\n"),
    "tcl": ("\nproc ", "\n#", "\n\n"),
    "javascript": ("\nfunction ", "\n/*", "\n//", "\nconsole.log"),
    "php": ("\nfunction", "\n?>", "\n//", "\n#"),
    "bash": ("\n}",),
}

# MultiPL-E's dataset files name languages by file extension.
LANGUAGE_ALIASES = {"py": "python", "pl": "perl", "js": "javascript", "sh": "bash"}

Generate = Callable[[list[str], int, float], list[list[str]]]


class Problem(BaseModel):
    """One MultiPL-E problem; ``stop_tokens`` default to the language's."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str = Field(min_length=1, description="Unique within its language.")
    language: str = Field(description=f"One of {sorted(TOOLCHAINS)}.")
    prompt: str = Field(min_length=1, description="Code up to and including the signature.")
    tests: str = Field(min_length=1, description="Appended after the completion; exit≠0 = fail.")
    stop_tokens: tuple[str, ...] = Field((), description="Completions end at the first one.")

    @model_validator(mode="before")
    @classmethod
    def _language_defaults(cls, data: object) -> object:
        if not isinstance(data, dict) or not isinstance(data.get("language"), str):
            return data
        language = LANGUAGE_ALIASES.get(data["language"], data["language"])
        stops = data.get("stop_tokens") or STOP_TOKENS.get(language, ())
        return {**data, "language": language, "stop_tokens": stops}

    @model_validator(mode="after")
    def _known_language(self) -> Problem:
        if self.language not in TOOLCHAINS:
            raise ValueError(
                f"unknown language {self.language!r}; choose from {sorted(TOOLCHAINS)}"
            )
        if not self.stop_tokens or any(not s for s in self.stop_tokens):
            raise ValueError("stop_tokens must be non-empty strings")
        return self


class ProblemFileError(ValueError):
    """A problems file that does not parse; the message names the file and line."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c of them
    correct) is correct: ``1 − C(n−c, k)/C(n, k)``, as a product so large n never overflows."""
    for label, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{label} must be an int, got {type(value).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_problems(path: str | Path) -> list[Problem]:
    """Problems from a JSONL file (blank lines skipped); a bad line raises
    :class:`ProblemFileError` naming ``path:line``."""
    path = Path(path)
    problems: list[Problem] = []
    seen: dict[tuple[str, str], int] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            problem = Problem.model_validate(json.loads(line))
        except json.JSONDecodeError as e:
            raise ProblemFileError(f"{path}:{lineno}: not JSON ({e.msg})") from e
        except ValidationError as e:
            raise ProblemFileError(f"{path}:{lineno}: {_first_error(e)}") from e
        key = (problem.language, problem.name)
        if key in seen:
            raise ProblemFileError(
                f"{path}:{lineno}: duplicate {problem.language} problem {problem.name!r} "
                f"(first on line {seen[key]})"
            )
        seen[key] = lineno
        problems.append(problem)
    return problems


def truncate(completion: str, stops: Iterable[str]) -> str:
    """``completion`` up to (not including) the earliest occurrence of any stop sequence."""
    cut = min((i for s in stops if (i := completion.find(s)) >= 0), default=len(completion))
    return completion[:cut]


def check(problem: Problem, completion: str, timeout_s: float = 10.0) -> SandboxResult:
    """Run ``prompt + truncated completion + tests`` in the sandbox."""
    body = truncate(completion, problem.stop_tokens)
    return run_program(
        problem.prompt + body + "\n" + problem.tests, problem.language, timeout_s=timeout_s
    )


@dataclass(frozen=True)
class ProblemResult:
    """n samples of one problem, c of which passed; ``statuses`` counts sandbox outcomes."""

    name: str
    language: str
    n: int
    c: int
    statuses: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class PassAtKReport:
    """Per-problem (n, c) and pass@k averaged over problems, per language and overall."""

    results: tuple[ProblemResult, ...]
    ks: tuple[int, ...]
    temperature: float
    isolation: str

    def pass_at(self, k: int, language: str | None = None) -> float:
        """Mean pass@k over the problems (of ``language`` if given)."""
        chosen = [r for r in self.results if language is None or r.language == language]
        if not chosen:
            raise ValueError(f"no results for language {language!r}")
        return sum(pass_at_k(r.n, r.c, k) for r in chosen) / len(chosen)

    @property
    def languages(self) -> list[str]:
        return sorted({r.language for r in self.results})

    def by_language(self) -> dict[str, dict[int, float]]:
        return {lang: {k: self.pass_at(k, lang) for k in self.ks} for lang in self.languages}

    def overall(self) -> dict[int, float]:
        return {k: self.pass_at(k) for k in self.ks}

    def to_markdown(self) -> str:
        """One row per language and an ``all`` row; pass@k in percent."""
        n = max((r.n for r in self.results), default=0)
        head = ["language", "problems", "n", *(f"pass@{k}" for k in self.ks)]
        rows = [
            "| " + " | ".join(head) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
        ]
        groups = [(lang, lang) for lang in self.languages] + [("**all**", None)]
        for label, lang in groups:
            count = sum(1 for r in self.results if lang is None or r.language == lang)
            cells = [f"{100 * self.pass_at(k, lang):.1f}" for k in self.ks]
            rows.append("| " + " | ".join([label, str(count), str(n), *cells]) + " |")
        rows.append("")
        rows.append(f"Temperature {self.temperature}; sandbox network isolation: {self.isolation}.")
        return "\n".join(rows)


def evaluate(
    problems: Sequence[Problem],
    generate: Generate,
    n: int = 10,
    temperature: float = 0.8,
    ks: Sequence[int] = (1, 5, 10),
    timeout_s: float = 10.0,
    progress: bool = True,
    workers: int | None = None,
) -> PassAtKReport:
    """Sample ``n`` completions per problem with one ``generate`` call, check them on a small
    thread pool (each check is a subprocess, so threads suffice), and score pass@k for ``ks``."""
    if not problems:
        raise ValueError("no problems to evaluate")
    ks = tuple(sorted(set(ks)))
    if n < 1 or not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"need n >= 1 and every k in [1, n={n}], got ks={list(ks)}")
    missing = sorted({p.language for p in problems} - set(available_languages()))
    if missing:
        raise ValueError(f"no interpreter on this machine for {missing}")
    samples = generate([p.prompt for p in problems], n, temperature)
    if len(samples) != len(problems) or any(len(s) != n for s in samples):
        shape = [len(s) for s in samples]
        raise ValueError(
            f"generate returned {shape} completions; wanted {n} for each of {len(problems)} prompts"
        )
    statuses = [Counter[str]() for _ in problems]
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    with (
        ThreadPoolExecutor(workers, thread_name_prefix="passk") as pool,
        tqdm(total=len(problems) * n, disable=not progress, desc="pass@k", unit="run") as bar,
    ):
        futures = {
            pool.submit(check, p, text, timeout_s): i
            for i, (p, texts) in enumerate(zip(problems, samples, strict=True))
            for text in texts
        }
        for future in as_completed(futures):
            statuses[futures[future]][future.result().status] += 1
            bar.update()
    results = tuple(
        ProblemResult(p.name, p.language, n, s["ok"], dict(s))
        for p, s in zip(problems, statuses, strict=True)
    )
    return PassAtKReport(results, ks, temperature, network_isolation())


def engine_generator(
    llm: LLM,
    adapter: str | None = None,
    max_tokens: int = 256,
    seed: int = 0,
    *,
    stop_for: Mapping[str, Sequence[str]] | None = None,
) -> Generate:
    """A ``generate`` over :meth:`flora.engine.llm.LLM.generate`: n requests per prompt, sample j
    seeded ``seed + j`` (reproducible runs), all prompts in one continuously batched call.

    ``stop_for`` maps a prompt to its stop tokens so the engine stops early (the checks truncate
    anyway); e.g. ``{p.prompt: p.stop_tokens for p in problems}``.
    """
    from flora.engine.request import Request, SamplingParams

    stops = dict(stop_for or {})

    def generate(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        requests = [
            Request(
                prompt=prompt,
                adapter=adapter,
                params=SamplingParams(
                    max_tokens=max_tokens,
                    temperature=temperature,
                    seed=seed + j,
                    stop=tuple(stops.get(prompt, ())),
                ),
            )
            for prompt in prompts
            for j in range(n)
        ]
        completions = llm.generate(requests)
        failed = [c.error for c in completions if c.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(completions)} requests failed: {failed[0]}")
        texts = [c.text for c in completions]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    return generate


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"])
    return f"{where}: {err['msg']}" if where else err["msg"]
