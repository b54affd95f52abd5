"""What a caller asks the engine for, and what it streams back."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_ids = itertools.count()

# Below this temperature sampling is greedy (vLLM's _SAMPLING_EPS): dividing logits by a
# vanishing temperature overflows them to ±inf, and softmax then gives NaN.
SAMPLING_EPS = 1e-5


class SamplingParams(BaseModel):
    """How to pick each next token (OpenAI/vLLM semantics); ``temperature=0`` is greedy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(16, ge=1, description="New tokens to generate at most.")
    temperature: float = Field(
        1.0, ge=0.0, le=100.0, description=f"0 (below {SAMPLING_EPS:g}) means greedy."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 keeps all.")
    seed: int | None = Field(
        None,
        ge=-(2**63),
        lt=2**64,
        description="Per-request seed: same seed, same tokens. Any value torch's generator "
        "takes (-2**63 … 2**64-1); beyond that manual_seed overflows.",
    )
    stop: tuple[str, ...] = Field((), description="Stop when the text contains one of these.")
    stop_token_ids: tuple[int, ...] = Field((), description="Stop on any of these token ids.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-text token.")
    logprobs: int | None = Field(
        None, ge=0, le=20, description="Return the sampled token's logprob and this many top ones."
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return (value,) if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS


class Request(BaseModel):
    """One generation request: a prompt, how to sample, and whose adapter to run it through."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str | None = Field(None, description="Text prompt (tokenised by the engine).")
    prompt_ids: tuple[int, ...] | None = Field(None, description="Or the prompt's token ids.")
    params: SamplingParams = Field(default_factory=SamplingParams)
    adapter: str | None = Field(
        None, description="Adapter name in the engine's source; None = base."
    )
    tenant: str = Field("default", min_length=1, max_length=128)
    priority: int = Field(0, description="Higher runs first among waiting requests.")
    request_id: str = Field(default_factory=lambda: f"req-{next(_ids)}")

    @model_validator(mode="after")
    def _one_prompt(self) -> Request:
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt (text) or prompt_ids")
        if self.prompt_ids is not None and not self.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if self.prompt is not None and not self.prompt:
            raise ValueError("prompt must not be empty")
        if self.prompt is not None:
            _encodable(self.prompt)
        return self


def _encodable(text: str) -> None:
    """JSON's ``"\\ud800"`` decodes to a lone surrogate, which is no Unicode text: the tokenizer
    would raise TypeError deep in the engine. Refuse it here, where it is the caller's mistake."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"the prompt holds an unpaired surrogate ({text[e.start]!r} at character {e.start}); "
            "send valid Unicode text"
        ) from None


class FinishReason(enum.StrEnum):
    STOP = "stop"  # end-of-text token, a stop string or a stop token id
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the request could not be served (see ``error`` and ``error_code``)


class ErrorCode(enum.StrEnum):
    """Why a request ended with :attr:`FinishReason.ERROR`: the caller's adapter, or the server."""

    ADAPTER_NON_FINITE = "adapter_non_finite"  # its adapter overflowed to Inf/NaN activations
    NON_FINITE = "non_finite"  # the base model overflowed: a server-side numerical error
    ADAPTER_REFUSED = "adapter_refused"  # its adapter failed to load or validate here
    INTERNAL = "internal"  # a bug or device error in the step


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestOutput:
    """One streamed update: the tokens and text added since the previous update."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    usage: Usage
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None
    error_code: ErrorCode | None = None  # set with ``error``
    adapter: str | None = None  # the adapter (and version) that served it
    created: float = field(default_factory=time.time)

    def then(self, later: RequestOutput) -> RequestOutput:
        """This update followed by ``later`` (of the same request) as one update: the deltas
        joined, the rest (finish, usage, error) as of ``later``."""
        return RequestOutput(
            request_id=self.request_id,
            token_ids=self.token_ids + later.token_ids,
            text=self.text + later.text,
            finished=later.finished,
            usage=later.usage,
            finish_reason=later.finish_reason,
            logprobs=self.logprobs + later.logprobs,
            error=later.error,
            error_code=later.error_code,
            adapter=later.adapter,
            created=later.created,
        )
