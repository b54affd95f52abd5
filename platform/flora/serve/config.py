"""The Serve app's typed arguments: the one place for every default.

``serve run deployments/starcoder.yaml`` passes the YAML's ``args`` here (Ray Serve's app-builder
pattern); replica counts, autoscaling and GPUs stay in the YAML's ``deployments`` section, where
Ray Serve expects them. Registry and storage settings come from the environment (README).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TINY = "tiny"


class LimitsConfig(BaseModel):
    """Per-tenant admission control in the ingress (per ingress replica)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_second: float = Field(20.0, gt=0, description="Sustained rate per tenant.")
    burst: int = Field(40, ge=1, description="Requests a tenant may send at once above the rate.")
    max_concurrent: int = Field(64, ge=1, description="Open requests per tenant.")
    max_in_flight: int = Field(512, ge=1, description="Open requests in total (queue bound).")


class ServeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        TINY,
        description="A checkpoint directory or HF model id; 'tiny' builds a small "
        "StarCoder-architecture model on first start (cached in $FLORA_CACHE_DIR/models).",
    )
    model_name: str | None = Field(
        None,
        description="The name adapters declare as base_model and /v1/models reports "
        "(default: 'flora/tiny' for the tiny model, else `model`).",
    )
    device: str = Field("cpu", description="cpu, cuda or cuda:N (the replica's device).")
    dtype: str = Field("auto", description="fp32, bf16, fp16 or auto.")
    torch_threads: int | None = Field(
        None, ge=1, description="CPU threads for the engine (default: torch's choice)."
    )
    engine: dict[str, Any] = Field(
        default_factory=dict,
        description="EngineConfig overrides, e.g. max_num_seqs, kv_cache_bytes, adapter_slots.",
    )
    max_tokens_default: int = Field(64, ge=1, description="When a request gives no max_tokens.")
    max_request_bytes: int = Field(
        4 << 20,
        ge=1024,
        description="Largest request body, adapter uploads aside (they may carry the registry's "
        "adapter size limit). Prompts are tokenised on the engine thread, so this bounds the "
        "stall one huge prompt can cause before the context check refuses it.",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="Longest a request may run.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    stream_interval_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="A replica joins each request's new tokens for this long before sending "
        "them on (tokens already waiting are always joined): fewer messages per token through "
        "Ray and the proxy, at the cost of burstier streams.",
    )
    stats_interval_s: float = Field(
        1.0,
        ge=0,
        description="A replica's engine counters ride on a stream chunk at most this often (and "
        "on every request's last chunk), so /metrics gauges stay live during long requests.",
    )
    ready_ping_timeout_s: float = Field(
        2.0,
        gt=0,
        description="/readyz pings a replica through its engine thread and waits this long for "
        "the answer (a frozen engine loop or process never answers).",
    )
    ready_window_s: float = Field(
        10.0,
        gt=0,
        description="/readyz is 503 when no replica answered a ping for this long; within it, "
        "one slow ping (a long engine step) does not flip readiness.",
    )

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        return "flora/tiny" if self.model == TINY else self.model
