"""One engine behind the serving API, free of Ray so it also runs in-process (tests, scripts).

``generate`` streams plain dicts and never raises across the wire: a bad request becomes one
``{"error": {...}}`` chunk with its HTTP status, so the ingress answers 4xx before it starts a
stream. The final chunk carries the engine's counters for the ingress's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import torch
from pydantic import ValidationError

from adapter_registry import Registry, RegistrySettings
from flora.engine import EngineConfig, LLMEngine, Request, SamplingParams, UnknownAdapterError
from flora.engine.async_engine import AsyncEngine, EngineStoppedError
from flora.engine.engine import RequestError
from flora.engine.request import ErrorCode, TokenLogprob
from flora.model.config import ModelArgs
from flora.serve.config import ServeArgs
from flora.serve.model_dir import prepare_model
from flora.serve.registry_source import RegistryAdapterSource

log = logging.getLogger(__name__)


def error_chunk(status: int, message: str, code: str) -> dict[str, Any]:
    """What the ingress turns into that HTTP status (first chunk) or an SSE error event."""
    return {"error": {"status": status, "message": message, "code": code}}


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
            self.engine.call(lambda: self.engine.engine.invalidate_adapter(name))


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
        args: ModelArgs = self.engine.engine.model.args
        return {
            "name": self.args.served_name,
            "config": args.to_hf_config(),
            "max_model_len": self.max_model_len,
            # what the engine can load: the registry refuses the rest at upload
            "limits": self.engine.engine.serving_limits.model_dump(mode="json"),
        }

    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Stream one request: ``payload`` has prompt or prompt_ids, params, adapter, tenant."""
        try:
            request = Request(
                prompt=payload.get("prompt"),
                prompt_ids=payload.get("prompt_ids"),
                params=SamplingParams(**payload.get("params", {})),
                adapter=payload.get("adapter"),
                tenant=payload["tenant"],
                request_id=payload["request_id"],
            )
        except ValidationError as e:
            yield error_chunk(400, _first_error(e), "invalid_request")
            return
        try:
            async for out in self.engine.generate(request):
                if out.error:  # the request's last output, with nothing new to stream
                    if not out.token_ids and self.source.unreachable(request.adapter):
                        yield error_chunk(503, out.error, "adapter_store_unavailable")
                        return
                    status, code = _ERRORS[out.error_code or ErrorCode.INTERNAL]
                    stats = {"replica": self.replica_id} | await self.engine.stats()
                    yield error_chunk(status, out.error, code) | {"stats": stats}
                    return
                chunk: dict[str, Any] = {
                    "token_ids": list(out.token_ids),
                    "text": out.text,
                    "finish_reason": out.finish_reason.value if out.finish_reason else None,
                    "usage": [out.usage.prompt_tokens, out.usage.completion_tokens],
                    "logprobs": [self._logprob(lp) for lp in out.logprobs],
                    "error": None,
                    "adapter": out.adapter,
                    "replica": self.replica_id,  # lets the ingress forget a replica that died
                }
                if out.finished:
                    chunk["stats"] = {"replica": self.replica_id} | await self.engine.stats()
                yield chunk
        except UnknownAdapterError as e:
            yield error_chunk(404, str(e), "model_not_found")
        except RequestError as e:
            yield error_chunk(400, str(e), "invalid_request")
        except EngineStoppedError:
            yield error_chunk(503, "this replica is shutting down; retry", "unavailable")

    def _logprob(self, lp: TokenLogprob) -> dict[str, Any]:
        """A token's log-probability with text, as OpenAI's responses show it."""
        text = self.engine.engine.tokenizer.decode
        return {
            "token": text([lp.token_id]),
            "logprob": lp.logprob,
            "top": [(text([t]), v) for t, v in lp.top],
        }

    async def ping(self) -> None:
        """Answers once the engine thread has run a no-op between two steps, so a frozen or
        wedged engine loop does not answer (the ingress's ``/readyz`` times it out); a stopped
        engine raises :class:`EngineStoppedError`."""
        await asyncio.wrap_future(self.engine.call(lambda: None))

    async def routing_stats(self) -> dict[str, Any]:
        """For the request router: resident adapters (``tenant/name@version``) and load."""
        return await asyncio.wrap_future(self.engine.call(self._routing_snapshot))

    def _routing_snapshot(self) -> dict[str, Any]:  # on the engine thread
        engine = self.engine.engine
        stats = engine.stats()
        resident = list(engine.adapters.resident()) if engine.adapters is not None else []
        return {"resident": resident, "running": stats["running"], "waiting": stats["waiting"]}

    def shutdown(self) -> None:
        self.subscription.close()
        self.engine.shutdown()


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
