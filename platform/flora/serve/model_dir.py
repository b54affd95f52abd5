"""Where the replica's checkpoint comes from: a path, a cached HF id, or the tiny test model."""

from __future__ import annotations

import logging
from pathlib import Path

from flora.cache import cache_root
from flora.model.checkpoint import resolve_model_dir
from flora.serve.config import TINY

log = logging.getLogger(__name__)


def prepare_model(model: str) -> Path:
    """A local checkpoint directory for ``model``; builds the tiny model once if asked for it."""
    if model != TINY:
        return resolve_model_dir(model)
    from flora.model.tiny import ensure_tiny_model

    target = cache_root() / "models" / TINY
    log.info("tiny StarCoder-architecture model: %s (built on first start)", target)
    return ensure_tiny_model(target, progress=False)
