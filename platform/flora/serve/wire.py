"""What crosses the Ray handle between the ingress and a replica: one call, a stream of chunks.

Both sides import these types and nothing else crosses. The ingress resolves the adapter once
and sends its immutable record (id, uri, sha256, kind, rank…); the replica fetches by it without
asking the index again. A chunk is what one request gained since the last one (several engine
steps when they queued up, or within ``stream_interval_ms``); a failure is a chunk whose
``error`` carries the HTTP status and a stable code.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from adapter_registry import AdapterRecord
from flora.engine import SamplingParams


class _Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GenerateCall(_Wire):
    """One completion, as the ingress resolved it."""

    request_id: str
    tenant: str
    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    params: SamplingParams
    adapter: AdapterRecord | None = Field(None, description="None: the base model.")


class WireError(_Wire):
    """Why a request failed: the HTTP status the ingress answers, a code, a message."""

    status: int
    code: str
    message: str


class TokenLogprob(_Wire):
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


class StreamChunk(_Wire):
    """What one request gained since its previous chunk; the last one has ``finish_reason``
    (or ``error``). ``stats`` are the replica's engine counters, sent at most once a second."""

    replica: str | None = None  # host:pid, so the ingress can forget a replica that died
    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    adapter: str | None = None  # the id (tenant/name@version) of the adapter that served it
    error: WireError | None = None
    stats: dict[str, int | float] | None = None
    lost_replica: str | None = None  # set by the ingress's backend when a replica died

    @classmethod
    def failure(cls, status: int, code: str, message: str, **extra: object) -> StreamChunk:
        return cls(error=WireError(status=status, code=code, message=message), **extra)

    @property
    def done(self) -> bool:
        return self.error is not None or self.finish_reason is not None
