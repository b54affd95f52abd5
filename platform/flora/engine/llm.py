"""``LLM``: a synchronous, batch-at-once front end for scripts and the ``flora generate`` CLI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flora.engine.adapter_source import AdapterSource
from flora.engine.config import EngineConfig
from flora.engine.engine import LLMEngine, run_to_completion
from flora.engine.request import FinishReason, Request, SamplingParams, TokenLogprob, Usage


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None
    usage: Usage
    adapter: str | None
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None


class LLM:
    def __init__(
        self,
        model: str | Path,
        config: EngineConfig | None = None,
        *,
        adapters: dict[str, str | Path] | None = None,
        adapter_source: AdapterSource | None = None,
    ) -> None:
        self.engine = LLMEngine.from_pretrained(model, config, adapter_source, adapters)

    def generate(
        self,
        prompts: Sequence[str | Request],
        params: SamplingParams | None = None,
        *,
        adapter: str | Sequence[str | None] | None = None,
    ) -> list[Completion]:
        """Run every prompt to completion in one continuously batched stream, in input order."""
        adapters = (
            [adapter] * len(prompts) if adapter is None or isinstance(adapter, str) else adapter
        )
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(adapters)} adapters")
        requests = [
            p
            if isinstance(p, Request)
            else Request(prompt=p, params=params or SamplingParams(), adapter=a)
            for p, a in zip(prompts, adapters, strict=True)
        ]
        results = run_to_completion(self.engine, requests)
        completions = []
        for r in requests:
            outs = results[r.request_id]
            last = outs[-1]
            completions.append(
                Completion(
                    request_id=r.request_id,
                    text="".join(o.text for o in outs),
                    token_ids=tuple(t for o in outs for t in o.token_ids),
                    finish_reason=last.finish_reason,
                    usage=last.usage,
                    adapter=last.adapter,
                    logprobs=tuple(lp for o in outs for lp in o.logprobs),
                    error=last.error,
                )
            )
        return completions
