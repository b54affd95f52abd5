"""How long one PEFT pattern-key match takes: Python's ``re`` (what the registry and engine used
before issue 14) against RE2 (``adapter_format``), on the families that froze the server.

    python scripts/regex_timing.py OUT_DIR

Prints a table and writes ``regex-timing.csv`` and ``.md`` to OUT_DIR.
"""

from __future__ import annotations

import csv
import re
import sys
import time
from pathlib import Path

from adapter_format.patterns import matches_suffix

MODULE = "transformer.h.0.attn.c_attn"
FAMILIES = {
    "dot": lambda n: ".{0,9}" * n + "X",
    "class": lambda n: "[^X]{0,9}" * n + "X",
    "word": lambda n: "\\w{0,5}\\.?" * n + "X",
}
GROUPS = {"dot": (8, 10, 11, 12), "class": (8, 10, 11, 12), "word": (10, 12, 14)}


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family, make in FAMILIES.items():
        for n in GROUPS[family]:
            key = make(n)
            python_re = timed(lambda k=key: re.match(rf"(.*\.)?({k})$", MODULE))
            re2 = timed(lambda k=key: matches_suffix(k, MODULE, "rank_pattern"))
            rows.append({"family": family, "groups": n, "chars": len(key),
                         "python_re_s": round(python_re, 4), "re2_s": round(re2, 6)})  # fmt: skip
            print(f"{family:6s} ×{n:2d} ({len(key):3d} chars): re {python_re:8.3f} s   "
                  f"RE2 {re2 * 1e3:7.3f} ms", flush=True)  # fmt: skip
    with open(out / "regex-timing.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| family | groups | characters | Python re (s) | RE2 (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['family']} | {r['groups']} | {r['chars']} | {r['python_re_s']} | "
              f"{r['re2_s']} |" for r in rows]  # fmt: skip
    (out / "regex-timing.md").write_text(
        f"One match against `{MODULE}` (`python scripts/regex_timing.py`).\n\n"
        + "\n".join(lines)
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
