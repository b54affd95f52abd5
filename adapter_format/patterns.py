"""Tenant regexes (PEFT's ``rank_pattern``, ``alpha_pattern``, ``target_modules``,
``feedforward_modules``) compiled by RE2, whose matching is linear in the input.

Python's ``re`` backtracks: a 73-character key such as ``.{0,9}`` twelve times then ``X`` took
13 s on one module name and held the GIL the whole time, freezing the server. RE2 cannot
backtrack; it refuses what it cannot run in linear time (back-references, look-arounds) and,
with ``max_mem`` capped, patterns whose automaton would be large. Refused patterns are the
uploader's 4xx, never a stall.
"""

from __future__ import annotations

import functools

import re2

from adapter_format.errors import AdapterFormatError

MAX_PATTERN_CHARS = 200
_COMPILE_MEMORY = 1 << 21  # bytes of automaton RE2 may build; larger patterns are refused


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = _COMPILE_MEMORY
    return options


@functools.lru_cache(maxsize=4096)
def _compiled(pattern: str) -> re2._Regexp:
    return re2.compile(pattern, _options())


def compile_pattern(pattern: object, field: str, wrap: str = "{}") -> re2._Regexp:
    """``wrap`` around ``pattern`` as a linear-time regex, or :class:`AdapterFormatError`
    saying why not (the length limit applies to the tenant's ``pattern``)."""
    if not isinstance(pattern, str):
        raise AdapterFormatError(f"{field}: patterns must be strings, got {pattern!r}"[:200])
    shown = pattern[:80] + ("…" if len(pattern) > 80 else "")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterFormatError(
            f"{field} key {shown!r} is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}",
            param=field,
        )
    try:
        _compiled(pattern)  # alone first: a key cannot unbalance the wrapper's groups
        return _compiled(wrap.format(pattern))
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise AdapterFormatError(
            f"{field} key {shown!r} is not a pattern this server can match in linear time "
            f"(RE2 syntax: no back-references or look-arounds): {reason}",
            param=field,
        ) from None


def matches_suffix(key: str, module: str, field: str) -> bool:
    """PEFT's ``get_pattern_key``: ``key`` matches a dotted suffix of the module's name."""
    return compile_pattern(key, field, r"(?:.*\.)?(?:{})").fullmatch(module) is not None


def matches_whole(pattern: str, module: str, field: str) -> bool:
    """PEFT's string ``target_modules`` / ``feedforward_modules``: a regex over the full name."""
    return compile_pattern(pattern, field).fullmatch(module) is not None
