"""The baselines users would otherwise run: transformers ``generate`` on the same weights, and
PEFT's mixed-adapter batch (``generate(adapter_names=…)``) with one LoRA per request."""

from __future__ import annotations

import itertools
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flora.bench.engine import Bench, Method, Run


class _StepClock:
    """A logits processor that only notes when each generation step happens."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamps.append(time.perf_counter())
        return scores


def hf_model(bench: Bench):
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(**bench.args.to_hf_config())
    with torch.device(bench.device):
        model = GPTBigCodeForCausalLM(config).to(bench.model.dtype)
    missing, unexpected = model.load_state_dict(bench.model.base_state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights do not map onto transformers: {missing}, {unexpected}")
    model.tie_weights()
    return model.eval().requires_grad_(False)


def _peft_model(bench: Bench, names: list[str]):
    from peft import PeftModel

    root = bench.root / "adapters"
    model = PeftModel.from_pretrained(hf_model(bench), str(root / names[0]), adapter_name=names[0])
    for name in dict.fromkeys(names[1:]):
        model.load_adapter(str(root / name), adapter_name=name)
    return model.eval()


def generate_run(bench: Bench, m: Method) -> Run:
    from transformers import LogitsProcessorList

    from flora.bench.engine import Run

    names = bench._names(m)
    key = (m.runner, m.kind, m.rank)
    if bench._hf is None:
        bench._hf = {}
    if key not in bench._hf:
        bench.progress(f"building the {m.name} baseline model")
        bench._hf[key] = _peft_model(bench, names) if m.runner == "peft" else hf_model(bench)
    model = bench._hf[key]
    longest = max(len(p) for p in bench.prompts)
    ids = torch.zeros(len(bench.prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(bench.prompts):  # left padding, as generate expects
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    n = bench.workload.output_tokens
    clock = _StepClock()
    kwargs = {"adapter_names": names} if m.runner == "peft" else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids.to(bench.device),
            attention_mask=mask.to(bench.device),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([clock]),
            **kwargs,
        )
    if bench.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    generated = (out.shape[1] - longest) * len(bench.prompts)
    itl = [b - a for a, b in itertools.pairwise(clock.stamps)]
    return Run(generated, seconds, itl * len(bench.prompts))
