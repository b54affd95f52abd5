"""A micro StarCoder-architecture model, built once per session (seconds, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flora.train import make_tiny_model


@pytest.fixture(scope="session")
def micro_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "micro"
    return make_tiny_model(out, preset="micro", languages=["python", "c"], progress=False)
