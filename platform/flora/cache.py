"""Where flora keeps caches (calibration, downloaded adapters, built models): one root."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$FLORA_CACHE_DIR``, or ``~/.cache/flora`` when it is unset or empty."""
    return Path(os.environ.get("FLORA_CACHE_DIR") or Path.home() / ".cache" / "flora")
