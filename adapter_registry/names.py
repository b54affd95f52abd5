"""Names that are safe everywhere they end up: Redis keys, S3 keys, file paths, URLs, logs.

One strict alphabet for tenants, adapters, users and languages means no escaping is ever needed
and a name can never climb out of its tenant's prefix (no ``/``, ``..``, NUL or ``:``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from adapter_registry.errors import InvalidName

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # user ids come from client systems
GLOBAL = "_global"  # the scope of public adapters; the leading "_" keeps it out of tenant names
RESERVED = frozenset({"resolve", "base"})  # clash with routes and with `model: "base"`


def check_name(value: object, what: str = "name") -> str:
    """``value`` if it is a valid lowercase name, else :class:`InvalidName` saying why."""
    return _check(value, what, _NAME, "a-z")


def check_user(value: object) -> str:
    return _check(value, "user", _USER, "A-Z, a-z")


def _check(value: object, what: str, pattern: re.Pattern[str], letters: str) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{what} must be a string", param=what)
    if not pattern.fullmatch(value) or ".." in value:
        shown = value[:80] + ("…" if len(value) > 80 else "")
        raise InvalidName(
            f"invalid {what} {shown!r}: use 1-64 characters from {letters}, 0-9, '.', '_', '-', "
            "starting with a letter or digit, without '..'",
            param=what,
        )
    return value


def check_adapter_name(value: object) -> str:
    name = check_name(value, "name")
    if name in RESERVED:
        raise InvalidName(f"{name!r} is reserved; choose another adapter name", param="name")
    return name


def check_optional(value: str | None, what: str) -> str | None:
    """``None`` for absent or empty values; ``user`` keeps its wider alphabet."""
    if value in (None, ""):
        return None
    return check_user(value) if what == "user" else check_name(value, what)


@dataclass(frozen=True)
class AdapterSpec:
    """``name`` or ``name@version`` as clients write it."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        name, sep, version = text.partition("@")
        if not sep:
            return cls(check_adapter_name(name))
        if not version.isdigit() or int(version) < 1 or len(version) > 12:
            raise InvalidName(f"invalid version {version!r} in {text!r}: expected name@N, N ≥ 1")
        return cls(check_adapter_name(name), int(version))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"
