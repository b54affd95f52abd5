"""The baselines users would otherwise run: transformers ``generate`` on the same weights, and
PEFT's mixed-adapter batch (``generate(adapter_names=…)``) with one LoRA per request.

Needs the ``bench`` extra (transformers, peft), imported when a baseline is built or run.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flora.bench.engine_methods import Run

if TYPE_CHECKING:
    from flora.model import GPTBigCode


class _StepClock:
    """A logits processor that only notes when each generation step happens."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def hf_model(model: GPTBigCode, device: str):
    """transformers' GPTBigCode with ``model``'s weights, on ``device`` in its dtype."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(**model.args.to_hf_config())
    with torch.device(device):
        hf = GPTBigCodeForCausalLM(config).to(model.dtype)
    missing, unexpected = hf.load_state_dict(model.base_state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto transformers: {missing}, {unexpected}")
    hf.tie_weights()
    return hf.eval().requires_grad_(False)


def peft_model(model: GPTBigCode, device: str, adapter_root: Path, names: Sequence[str | None]):
    """:func:`hf_model` wrapped by PEFT with every adapter ``names`` lists (dirs under the root)."""
    from peft import PeftModel

    first, *rest = [n for n in names if n is not None]
    peft = PeftModel.from_pretrained(
        hf_model(model, device), str(adapter_root / first), adapter_name=first
    )
    for name in dict.fromkeys(rest):
        peft.load_adapter(str(adapter_root / name), adapter_name=name)
    return peft.eval()


def generate_run(
    model,
    prompts: Sequence[Sequence[int]],
    output_tokens: int,
    device: str,
    adapter_names: Sequence[str | None] | None = None,
) -> Run:
    """One batched greedy ``generate`` of exactly ``output_tokens`` per prompt (left-padded);
    with ``adapter_names`` (a PEFT model), request i runs on adapter i."""
    from transformers import LogitsProcessorList

    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    n = output_tokens
    clock = _StepClock()
    kwargs = {"adapter_names": list(adapter_names)} if adapter_names is not None else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
            **kwargs,
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - longest) * len(prompts)
    itl = [b - a for a, b in itertools.pairwise(clock.stamps)]
    return Run(generated, seconds, itl * len(prompts))
