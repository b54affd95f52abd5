"""pass@k: the estimator against enumeration, the shipped problems against known-good and
known-bad completions in every installed language, evaluate() with fixed completions, the CLI,
and one run through the real engine on the untrained micro model."""

from __future__ import annotations

import argparse
import itertools
import json
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

from flora.train.passk import (
    DEFAULT_PROBLEMS,
    STOP_TOKENS,
    Problem,
    ProblemFileError,
    check,
    engine_generator,
    evaluate,
    load_problems,
    pass_at_k,
    truncate,
)
from flora.train.passk_cli import add_parser
from flora.train.sandbox import available_languages

PROBLEMS = load_problems(DEFAULT_PROBLEMS)
INSTALLED = set(available_languages())

# A correct body per (language, problem); the prompt ends at the signature, so bodies in
# brace languages close the function. Each is followed by text past a stop token that would
# not run, so a pass also shows the completion was truncated.
GOOD = {
    ("python", "mini_0_add"): "    return x + y\n",
    ("python", "mini_1_reverse_string"): "    return s[::-1]\n",
    ("python", "mini_2_is_palindrome"): "    return text == text[::-1]\n",
    ("python", "mini_3_count_vowels"): "    return sum(ch in 'aeiou' for ch in s.lower())\n",
    ("python", "mini_4_fizzbuzz"): (
        "    if n % 15 == 0:\n        return 'FizzBuzz'\n"
        "    if n % 3 == 0:\n        return 'Fizz'\n"
        "    if n % 5 == 0:\n        return 'Buzz'\n"
        "    return str(n)\n"
    ),
    ("perl", "mini_0_add"): "    return $x + $y;\n}\n",
    ("perl", "mini_1_reverse_string"): "    return scalar reverse($s);\n}\n",
    ("perl", "mini_2_is_palindrome"): "    return $text eq scalar reverse($text);\n}\n",
    (
        "perl",
        "mini_3_count_vowels",
    ): "    my $count = () = $s =~ /[aeiou]/gi;\n    return $count;\n}\n",
    ("perl", "mini_4_fizzbuzz"): (
        "    return 'FizzBuzz' if $n % 15 == 0;\n    return 'Fizz' if $n % 3 == 0;\n"
        "    return 'Buzz' if $n % 5 == 0;\n    return \"$n\";\n}\n"
    ),
    ("tcl", "mini_0_add"): "    return [expr {$x + $y}]\n}\n",
    ("tcl", "mini_1_reverse_string"): "    return [string reverse $s]\n}\n",
    ("tcl", "mini_2_is_palindrome"): "    return [expr {$text eq [string reverse $text]}]\n}\n",
    ("tcl", "mini_3_count_vowels"): "    return [regexp -all -nocase {[aeiou]} $s]\n}\n",
    ("tcl", "mini_4_fizzbuzz"): (
        "    if {$n % 15 == 0} {\n        return FizzBuzz\n    } elseif {$n % 3 == 0} {\n"
        "        return Fizz\n    } elseif {$n % 5 == 0} {\n        return Buzz\n    }\n"
        "    return $n\n}\n"
    ),
    ("javascript", "mini_0_add"): "  return x + y;\n}\n",
    ("javascript", "mini_1_reverse_string"): "  return s.split('').reverse().join('');\n}\n",
    ("javascript", "mini_2_is_palindrome"): (
        "  return text === text.split('').reverse().join('');\n}\n"
    ),
    ("javascript", "mini_3_count_vowels"): "  return (s.match(/[aeiou]/gi) || []).length;\n}\n",
    ("javascript", "mini_4_fizzbuzz"): (
        "  if (n % 15 === 0) return 'FizzBuzz';\n  if (n % 3 === 0) return 'Fizz';\n"
        "  if (n % 5 === 0) return 'Buzz';\n  return String(n);\n}\n"
    ),
}
# Runs, but answers wrong on at least one test of every problem.
BAD = {
    "python": "    return None\n",
    "perl": "    return;\n}\n",
    "tcl": "    return 0\n}\n",
    "javascript": "  return undefined;\n}\n",
}
JUNK = {
    "python": "\ndef junk(:\n",
    "perl": "\nsub junk {{{\n",
    "tcl": "\nproc junk {\n",
    "javascript": "\nconsole.log(junk((;\n",
}


def _problem(language: str, name: str) -> Problem:
    return next(p for p in PROBLEMS if p.language == language and p.name == name)


# --- the estimator -------------------------------------------------------------------------


def _enumerated(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration_over_all_small_cases() -> None:
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_enumerated(n, c, k)), abs=1e-12)


@pytest.mark.parametrize(("n", "c"), [(1, 0), (1, 1), (10, 3), (200, 37)])
def test_pass_at_1_is_the_fraction_correct(n: int, c: int) -> None:
    assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)


def test_pass_at_k_is_stable_for_large_n() -> None:
    exact = 1 - Fraction(comb(1000 - 10, 100), comb(1000, 100))
    assert pass_at_k(1000, 10, 100) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(10, 1, 5) == pytest.approx(0.5)
    assert pass_at_k(10, 6, 5) == 1.0  # fewer than k wrong samples: a correct one is certain


@pytest.mark.parametrize(
    ("n", "c", "k", "error"),
    [
        (0, 0, 1, ValueError),
        (5, 6, 1, ValueError),
        (5, -1, 1, ValueError),
        (5, 2, 0, ValueError),
        (5, 2, 6, ValueError),
        (5.0, 2, 1, TypeError),
        (5, True, 1, TypeError),
    ],
)
def test_pass_at_k_rejects_bad_arguments(n: object, c: object, k: object, error: type) -> None:
    with pytest.raises(error):
        pass_at_k(n, c, k)  # type: ignore[arg-type]


# --- truncation and problem files ---------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "stops", "expected"),
    [
        ("    return 1\n\ndef g():\n", STOP_TOKENS["python"], "    return 1\n"),
        ("    return 1\n# note\nprint(2)", STOP_TOKENS["python"], "    return 1"),
        ("    return 1\n", STOP_TOKENS["python"], "    return 1\n"),
        ("", STOP_TOKENS["python"], ""),
        ("\ndef f(): pass", STOP_TOKENS["python"], ""),
        ("    if x:\n        return 1\n", STOP_TOKENS["python"], "    if x:\n        return 1\n"),
        ("  return 1;\n}\n\nfunction g() {}", STOP_TOKENS["javascript"], "  return 1;\n}\n"),
        ("    return 1;\n}\n\nsub g {}", STOP_TOKENS["perl"], "    return 1;\n}"),
        ("a STOP b stop", ("stop", "STOP"), "a "),
    ],
)
def test_truncate_cuts_at_the_earliest_stop(completion: str, stops: tuple, expected: str) -> None:
    assert truncate(completion, stops) == expected


def test_the_shipped_problem_set() -> None:
    by_language: dict[str, list[str]] = {}
    for p in PROBLEMS:
        by_language.setdefault(p.language, []).append(p.name)
        assert p.stop_tokens == STOP_TOKENS[p.language]
    assert sorted(by_language) == ["javascript", "perl", "python", "tcl"]
    assert all(len(names) >= 4 for names in by_language.values())
    assert set(GOOD) == {(p.language, p.name) for p in PROBLEMS}


def _write(tmp_path: Path, *lines: object) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


OK = {"name": "a", "language": "python", "prompt": "def a():\n", "tests": "a()\n"}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", r":3: not JSON"),
        ({**OK, "name": "b", "language": "cobol"}, r":3: .*unknown language 'cobol'"),
        ({"name": "b", "language": "python", "prompt": "x"}, r":3: tests: Field required"),
        ({**OK, "name": "b", "stop_tokens": ["\n", ""]}, r":3: .*stop_tokens"),
        (OK, r":3: duplicate python problem 'a' \(first on line 1\)"),
    ],
)
def test_load_problems_names_the_bad_line(tmp_path: Path, bad: object, message: str) -> None:
    path = _write(tmp_path, OK, "", bad)
    with pytest.raises(ProblemFileError, match=message):
        load_problems(path)


def test_load_problems_fills_defaults_and_reads_multipl_e_records(tmp_path: Path) -> None:
    custom = {**OK, "name": "b", "language": "tcl", "stop_tokens": ["\nEND"]}
    multipl_e = {**OK, "name": "c", "language": "js", "doctests": "keep", "original": "x.py"}
    problems = load_problems(_write(tmp_path, "", OK, "   ", custom, multipl_e))
    assert [p.stop_tokens for p in problems] == [
        STOP_TOKENS["python"],
        ("\nEND",),
        STOP_TOKENS["javascript"],
    ]
    assert problems[2].language == "javascript"  # MultiPL-E's "js", extra fields ignored


# --- the shipped problems run ---------------------------------------------------------------


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p.language}-{p.name}")
def test_good_completions_pass_and_bad_ones_fail(problem: Problem) -> None:
    if problem.language not in INSTALLED:
        pytest.skip(f"{problem.language}: interpreter not installed on this machine")
    good = check(problem, GOOD[problem.language, problem.name] + JUNK[problem.language])
    assert good.status == "ok", good.stderr
    bad = check(problem, BAD[problem.language])
    assert bad.status == "failed", bad.stdout


# --- evaluate -------------------------------------------------------------------------------


def test_evaluate_with_fixed_completions_scores_exactly() -> None:
    chosen = [_problem("python", "mini_0_add"), _problem("python", "mini_1_reverse_string")]
    if "perl" in INSTALLED:
        chosen.append(_problem("perl", "mini_0_add"))
    passes = {"mini_0_add": 3, "mini_1_reverse_string": 0}
    seen: list[tuple[list[str], int, float]] = []

    def generate(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        seen.append((prompts, n, temperature))
        out = []
        for p in chosen:
            c = passes[p.name]
            good = GOOD[p.language, p.name] + JUNK[p.language]
            out.append([good] * c + [BAD[p.language]] * (n - c))
        return out

    report = evaluate(chosen, generate, n=4, temperature=0.2, ks=(1, 2), progress=False)
    assert seen == [([p.prompt for p in chosen], 4, 0.2)]
    assert [(r.language, r.name, r.n, r.c) for r in report.results] == [
        (p.language, p.name, 4, passes[p.name]) for p in chosen
    ]
    assert report.results[1].statuses == {"failed": 4}
    assert report.pass_at(1, "python") == pytest.approx((3 / 4 + 0) / 2)
    assert report.pass_at(2, "python") == pytest.approx((1 - comb(1, 2) / comb(4, 2)) / 2)
    mean = sum(pass_at_k(4, passes[p.name], 1) for p in chosen) / len(chosen)
    assert report.overall()[1] == pytest.approx(mean)
    table = report.to_markdown()
    assert "| language | problems | n | pass@1 | pass@2 |" in table
    assert "| python | 2 | 4 | 37.5 | 50.0 |" in table
    assert "**all**" in table and report.isolation in table


def test_evaluate_rejects_bad_shapes_and_ks() -> None:
    problem = _problem("python", "mini_0_add")
    with pytest.raises(ValueError, match="wanted 2"):
        evaluate([problem], lambda prompts, n, t: [["x"]], n=2, ks=(1,), progress=False)
    with pytest.raises(ValueError, match="every k"):
        evaluate([problem], lambda prompts, n, t: [["x"] * n], n=2, ks=(1, 5), progress=False)
    with pytest.raises(ValueError, match="no problems"):
        evaluate([], lambda prompts, n, t: [], n=1, ks=(1,), progress=False)


# --- the engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flora.train import ensure_tiny_model

    out = tmp_path_factory.mktemp("passk") / "micro"
    return ensure_tiny_model(out, preset="micro", languages=["python"], progress=False)


def test_evaluate_through_the_engine_on_the_micro_model(micro_model: Path) -> None:
    from flora.engine import LLM, EngineConfig

    chosen = [_problem("python", "mini_0_add"), _problem("python", "mini_3_count_vowels")]
    llm = LLM(micro_model, EngineConfig(max_num_seqs=8, kv_cache_bytes=4 << 20))
    try:
        generate = engine_generator(
            llm, None, max_tokens=12, seed=3, stop_for={p.prompt: p.stop_tokens for p in chosen}
        )
        samples = generate([chosen[0].prompt], 2, 1.0)
        assert len(samples) == 1 and len(samples[0]) == 2
        assert samples == generate([chosen[0].prompt], 2, 1.0)  # seeded: reproducible
        report = evaluate(chosen, generate, n=2, temperature=1.0, ks=(1, 2), progress=False)
    finally:
        llm.engine.close()
    for problem, result in zip(chosen, report.results, strict=True):
        assert (result.name, result.n) == (problem.name, 2) and 0 <= result.c <= 2
        assert sum(result.statuses.values()) == 2
    assert set(report.by_language()) == {"python"}
    assert all(0.0 <= v <= 1.0 for v in report.overall().values())


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["passk", *argv])
    return args.handler(args)


def test_cli_prints_and_writes_the_table(
    micro_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    problems = tmp_path / "one.jsonl"
    problems.write_text(_problem("python", "mini_0_add").model_dump_json() + "\n")
    out = tmp_path / "report.md"
    args = ["--model", str(micro_model), "--problems", str(problems), "-n", "2"]
    assert _cli(*args, "--max-tokens", "8", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "| python | 1 | 2 | " in printed and "pass@1" in printed and "pass@5" not in printed
    assert "| python | 1 | 2 | " in out.read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--adapter", "nodir"], "--adapter takes NAME=DIR"),
        (["--adapter", "x=/nonexistent"], "/nonexistent is not a directory"),
        (["--problems", "/nonexistent.jsonl"], "No such file"),
        (["--languages", "cobol"], "no problems in"),
        (["-n", "2", "-k", "5"], "every k in [1, n=2]"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(
    micro_model: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("--model", str(micro_model), *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
