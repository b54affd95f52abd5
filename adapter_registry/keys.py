"""API keys: random, shown once, stored only as a hash.

Keys carry 256 bits of randomness, so a plain SHA-256 is a sound verifier (no salt or slow hash
is needed against guessing, unlike passwords) and it lets the index look a key up directly.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "flr_"


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def same_key(presented: str, expected_hash: str) -> bool:
    """Constant-time check of ``presented`` against a stored hash."""
    return hmac.compare_digest(hash_key(presented), expected_hash)
