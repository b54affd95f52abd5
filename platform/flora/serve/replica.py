"""One engine behind the serving API, free of Ray so it also runs in-process (tests, scripts).

``generate`` takes a :class:`GenerateCall` and streams :class:`StreamChunk` (flora.serve.wire);
it never raises across the wire: a bad request becomes one failure chunk with its HTTP status,
so the ingress answers 4xx before it starts a stream. Chunks carry the engine's counters for
the ingress's ``/metrics`` at most once a second, and on every request's last chunk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from pydantic import ValidationError

from adapter_registry import Registry, RegistrySettings
from flora.engine import EngineConfig, LLMEngine, Request, UnknownAdapterError
from flora.engine.async_engine import AsyncEngine, EngineStoppedError
from flora.engine.engine import RequestError
from flora.engine.request import ErrorCode, RequestOutput
from flora.engine.request import TokenLogprob as EngineLogprob
from flora.model.config import ModelArgs
from flora.serve.config import ServeArgs
from flora.serve.model_dir import prepare_model
from flora.serve.registry_source import RegistryAdapterSource
from flora.serve.wire import GenerateCall, StreamChunk, TokenLogprob

log = logging.getLogger(__name__)


# An engine's error → (HTTP status, OpenAI-style code): the caller's adapter is a 422 (resending
# it cannot help), the server's own failures a 500.
_ERRORS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.ADAPTER_NON_FINITE: (422, "adapter_numerical_error"),
    ErrorCode.ADAPTER_REFUSED: (422, "adapter_not_servable"),
    ErrorCode.NON_FINITE: (500, "engine_error"),
    ErrorCode.INTERNAL: (500, "engine_error"),
}


class _OnEngineThread:
    """Invalidations arrive on the registry's event thread; the engine takes them between steps."""

    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def invalidate_adapter(self, name: str) -> None:
        if self.engine.running:
            self.engine.invalidate_adapter(name)


class ReplicaCore:
    def __init__(self, args: ServeArgs, registry: Registry | None = None):
        self.args = args
        self.registry = registry or RegistrySettings.from_env().build()
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        self.model_dir = prepare_model(args.model)
        config = EngineConfig(device=args.device, dtype=args.dtype, **args.engine)
        self.source = RegistryAdapterSource(self.registry)
        engine = LLMEngine.from_pretrained(self.model_dir, config, self.source)
        if engine.tokenizer is None:
            raise ValueError(f"{self.model_dir} has no tokenizer.json; the server needs one")
        self.engine = AsyncEngine(engine).start()
        self.subscription = self.source.watch(
            _OnEngineThread(self.engine), config.adapter_cache_dir
        )
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        self._stats_sent_at = 0.0
        self.max_model_len = engine.max_model_len
        log.info(
            "replica %s serves %s from %s on %s (%s)",
            self.replica_id,
            args.served_name,
            self.model_dir,
            config.device,
            config.dtype,
        )

    def model_info(self) -> dict[str, Any]:
        """What the ingress needs: the name, the HF config (adapter shapes), the context and the
        adapter limits."""
        args: ModelArgs = self.engine.model_args
        return {
            "name": self.args.served_name,
            "config": args.to_hf_config(),
            "max_model_len": self.max_model_len,
            # what the engine can load: the registry refuses the rest at upload
            "limits": self.engine.serving_limits.model_dump(mode="json"),
        }

    async def generate(self, call: GenerateCall) -> AsyncIterator[StreamChunk]:
        """Stream one request. Never raises across the wire: a request the engine refuses is
        one failure chunk with its HTTP status, so the ingress answers 4xx before any stream."""
        replica = self.replica_id
        adapter = call.adapter.id if call.adapter is not None else None
        try:
            request = Request(
                prompt=call.prompt,
                prompt_ids=call.prompt_ids,
                params=call.params,
                adapter=adapter,
                tenant=call.tenant,
                request_id=call.request_id,
            )
        except ValidationError as e:
            yield StreamChunk.failure(400, "invalid_request", _first_error(e), replica=replica)
            return
        if call.adapter is not None:
            self.source.admit(call.adapter)  # resolved by the ingress: no second index lookup
        try:
            coalesce_s = self.args.stream_interval_ms / 1000
            async for out in self.engine.generate(request, coalesce_s):
                yield await self._chunk(out, adapter)
                if out.finished:
                    return
        except UnknownAdapterError as e:
            yield StreamChunk.failure(404, "model_not_found", str(e), replica=replica)
        except RequestError as e:
            yield StreamChunk.failure(400, "invalid_request", str(e), replica=replica)
        except EngineStoppedError:
            message = "this replica is shutting down; retry"
            yield StreamChunk.failure(503, "unavailable", message, replica=replica)

    async def _chunk(self, out: RequestOutput, adapter: str | None) -> StreamChunk:
        """One engine update on the wire, with the engine's counters now and then."""
        stats = None
        now = time.monotonic()
        if out.finished or now - self._stats_sent_at >= self.args.stats_interval_s:
            self._stats_sent_at = now
            stats = await self.engine.stats()
        if out.error:  # the request's last output, with nothing new to stream
            status, code = _ERRORS[out.error_code or ErrorCode.INTERNAL]
            fetch_failure = self.source.fetch_failure(adapter)
            if out.error_code is ErrorCode.ADAPTER_REFUSED and fetch_failure is not None:
                status, code = fetch_failure  # the store was down, or the version is gone
            return StreamChunk.failure(
                status, code, out.error, replica=self.replica_id, stats=stats
            )
        return StreamChunk(
            replica=self.replica_id,
            token_ids=out.token_ids,
            text=out.text,
            logprobs=tuple(self._logprob(lp) for lp in out.logprobs),
            prompt_tokens=out.usage.prompt_tokens,
            completion_tokens=out.usage.completion_tokens,
            finish_reason=out.finish_reason.value if out.finish_reason else None,
            adapter=out.adapter,
            stats=stats,
        )

    def _logprob(self, lp: EngineLogprob) -> TokenLogprob:
        """A token's log-probability with text, as OpenAI's responses show it."""
        text = self.engine.tokenizer.decode
        return TokenLogprob(
            token=text([lp.token_id]),
            logprob=lp.logprob,
            top=tuple((text([t]), v) for t, v in lp.top),
        )

    async def ping(self) -> None:
        """Answers once the engine thread has run a no-op between two steps, so a frozen or
        wedged engine loop does not answer (the ingress's ``/readyz`` times it out); a stopped
        engine raises :class:`EngineStoppedError`."""
        await asyncio.wrap_future(self.engine.call(lambda: None))

    async def routing_stats(self) -> dict[str, Any]:
        """For the request router: resident adapters (``tenant/name@version``) and load."""
        return await self.engine.routing_snapshot()

    def shutdown(self) -> None:
        self.subscription.close()
        self.engine.shutdown()


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
