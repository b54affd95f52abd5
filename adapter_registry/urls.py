"""URLs that are safe to log."""

from __future__ import annotations


def hide_password(url: str) -> str:
    """``redis://user:secret@host`` → ``redis://***@host``."""
    scheme, sep, rest = url.partition("://")
    return scheme + sep + ("***@" + rest.split("@", 1)[1] if "@" in rest else rest)
