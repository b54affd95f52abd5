"""Where the Triton kernel tests run: compiled on CUDA, else on CPU under Triton's interpreter.

The interpreter needs ``TRITON_INTERPRET=1`` when triton is first imported (triton's own jit
helpers, ``tl.sum`` among them, are built for one mode then). A test module that runs the
kernels calls :func:`prepare` first; the variable stays set only inside its tests (monkeypatch),
so elsewhere the CPU dispatcher never sees the Triton paths, exactly as without Triton.

In a full run something else (``peft`` → ``torch._dynamo``) has usually imported triton
compiled by then: the module's kernel tests skip, and :func:`rerun_fresh` runs the module
again in a fresh interpreter, where :func:`prepare` comes first.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FRESH = "FLORA_TRITON_FRESH_RUN"  # set in the rerun, which must not rerun itself


def prepare(device: str) -> bool:
    """Import triton for ``device`` (interpreted for ``cpu``); whether the kernels can run
    (False also without triton: the caller's ``importorskip`` then says so)."""
    interpreted = torch.device(device).type == "cpu"
    if importlib.util.find_spec("triton") is None:
        return False
    if interpreted and "triton" not in sys.modules:
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
    from flora.adapters._triton_jit import library_interpreted

    return library_interpreted() == interpreted


def skip_unless(ready: bool) -> pytest.MarkDecorator:
    """For the kernel tests: skipped where triton came in compiled (the rerun covers them)."""
    return pytest.mark.skipif(not ready, reason="triton imported compiled: rerun fresh")


def rerun_fresh(test_file: str) -> None:
    """Run ``test_file`` alone in a new interpreter and fail with its output if it fails."""
    if os.environ.get(FRESH):
        pytest.fail("even a fresh interpreter imported triton before the test module")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[FRESH] = "1"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout, done.stdout[-2000:]
