"""OpenAI response bodies and stream chunks, built from the replica's chunks.

A completion is assembled from the same chunks that a stream sends, so streamed and
non-streamed answers are equal by construction.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flora.serve.openai_types import usage
from flora.serve.wire import StreamChunk, TokenLogprob

_FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


@dataclass
class Reply:
    """One request's answer as it grows; ``chat`` picks the chat or text-completion shape."""

    model: str
    chat: bool
    want_logprobs: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def request_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def add(self, chunk: StreamChunk) -> None:
        now = time.monotonic()
        if chunk.token_ids:
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
        if chunk.finish_reason:
            self.finish_reason = _FINISH.get(chunk.finish_reason, "stop")

    def _logprobs(self, entries: Sequence[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        "token": e.token,
                        "logprob": e.logprob,
                        "bytes": list(e.token.encode()),
                        "top_logprobs": [{"token": t, "logprob": v} for t, v in e.top],
                    }
                    for e in entries
                ]
            }
        offsets, position = [], offset
        for e in entries:
            offsets.append(position)
            position += len(e.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries],
            "text_offset": offsets,
        }

    def body(self) -> dict[str, Any]:
        """The whole (non-streamed) response."""
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": self.text},
                "logprobs": self._logprobs(self.logprobs, 0),
                "finish_reason": self.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": self.text,
                "logprobs": self._logprobs(self.logprobs, 0),
                "finish_reason": self.finish_reason,
            }
        return {
            "id": self.request_id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(self.prompt_tokens, self.completion_tokens),
        }

    def event(self, chunk: StreamChunk, first: bool) -> str:
        """The SSE event for one replica chunk (after :meth:`add`)."""
        finish = _FINISH.get(chunk.finish_reason, "stop") if chunk.finish_reason else None
        offset = len(self.text) - len(chunk.text)
        if self.chat:
            delta: dict[str, Any] = {"content": chunk.text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": chunk.text}
        choice |= {"logprobs": self._logprobs(chunk.logprobs, offset), "finish_reason": finish}
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if finish is not None:
            body["usage"] = usage(self.prompt_tokens, self.completion_tokens)
        return sse(body)

    @property
    def time_per_token(self) -> float | None:
        if self.first_token_at is None or self.completion_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.completion_tokens - 1)


def sse(body: dict[str, Any] | str) -> str:
    data = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
    return f"data: {data}\n\n"
