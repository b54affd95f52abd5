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
# ASCII digits only: ``str.isdigit`` and ``int`` also take "²", "٣" or "𝟙" (read as 1)
_VERSION = re.compile(r"[0-9]{1,12}")
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


class InvalidVersion(InvalidName):
    """The ``@version`` of a reference is not a version (a 400 wherever it arrives, also as a
    completion's ``model``, where a name that is merely unknown or invalid is a 404)."""


def parse_version(version: str, text: str) -> int:
    """``version`` (the part after ``@`` of ``text``) as an int ≥ 1, else :class:`InvalidVersion`.

    Only ASCII digits count: "x@²", "x@٣" and "x@𝟙" are refused, never read as another number.
    """
    if not _VERSION.fullmatch(version) or int(version) < 1:
        shown = text if len(text) <= 80 else text[:80] + "…"
        raise InvalidVersion(
            f"invalid version {version[:20]!r} in {shown!r}: expected name@N, where N is a "
            "number ≥ 1 written with the ASCII digits 0-9 (at most 12)"
        )
    return int(version)


@dataclass(frozen=True)
class AdapterSpec:
    """The one grammar of adapter references: ``name`` or ``name@version`` as clients write
    them, and ``scope/name@version`` (a record's id; the scope a tenant or ``_global``)."""

    name: str
    version: int | None = None
    scope: str | None = None

    @classmethod
    def parse(cls, text: str, *, scoped: bool = False) -> AdapterSpec:
        """The name is checked first, so an invalid name is always an invalid name whatever
        follows its ``@``; then the version (:func:`parse_version`). ``scoped`` accepts (and
        needs) the ``scope/`` of a record id."""
        scope = None
        if scoped:
            scope, slash, text = text.partition("/")
            if not slash:
                raise InvalidName(f"{scope[:80]!r} is not an adapter id (scope/name@version)")
            if scope != GLOBAL:
                check_name(scope, "tenant")
        name, sep, version = text.partition("@")
        name = check_adapter_name(name)
        if not sep:
            return cls(name, None, scope)
        return cls(name, parse_version(version, text), scope)

    def __str__(self) -> str:
        text = self.name if self.version is None else f"{self.name}@{self.version}"
        return text if self.scope is None else f"{self.scope}/{text}"
