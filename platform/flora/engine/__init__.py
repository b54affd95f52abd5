"""Continuous batching where every request has its own adapter: requests, scheduler, KV cache,
sampling, the adapter cache tiers, and the sync/async front ends."""

from flora.engine.adapter_cache import AdapterCache, AdapterLoadError
from flora.engine.adapter_source import (
    AdapterRef,
    AdapterSource,
    LocalAdapterSource,
    UnknownAdapterError,
)
from flora.engine.async_engine import AsyncEngine, EngineStoppedError
from flora.engine.config import EngineConfig
from flora.engine.engine import LLMEngine, RequestError, run_to_completion
from flora.engine.llm import LLM, Completion
from flora.engine.request import (
    FinishReason,
    Request,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    Usage,
)

__all__ = [
    "LLM",
    "AdapterCache",
    "AdapterLoadError",
    "AdapterRef",
    "AdapterSource",
    "AsyncEngine",
    "Completion",
    "EngineConfig",
    "EngineStoppedError",
    "FinishReason",
    "LLMEngine",
    "LocalAdapterSource",
    "Request",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
    "UnknownAdapterError",
    "Usage",
    "run_to_completion",
]
