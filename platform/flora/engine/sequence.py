"""One request's life inside the engine: its tokens, KV blocks, adapter slot and stream state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from flora.engine.adapter_source import AdapterRef
from flora.engine.request import ErrorCode, FinishReason, Request, TokenLogprob
from flora.model.tokenizer import IncrementalDecoder


class Status(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request: Request
    prompt_ids: list[int]
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys/values are in the KV cache
    status: Status = Status.WAITING
    adapter_ref: AdapterRef | None = None  # None: the base model
    slot: int | None = None  # adapter slot once resident; -1 for the base model
    adapter_label: str | None = None  # "name@version" that serves it
    generator: torch.Generator | None = None
    decoder: IncrementalDecoder | None = None
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_code: ErrorCode | None = None
    preemptions: int = 0
    # what has been streamed so far
    sent_tokens: int = 0
    sent_text: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, begin: int, end: int) -> list[int]:
        """Token ids at positions ``[begin, end)`` of prompt + output."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[begin:end]
        return (self.prompt_ids + self.output_ids)[begin:end]

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token lacks keys/values: the next step is a one-token decode."""
        return self.num_computed == self.num_tokens - 1 and bool(self.output_ids)

    @property
    def remaining_prefill(self) -> int:
        return self.num_tokens - self.num_computed
