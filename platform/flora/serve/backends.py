"""Backends for the ingress: the replicas behind a Ray Serve handle, or one in-process engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError

from flora.serve.replica import ReplicaCore, error_chunk


class LocalBackend:
    """One :class:`ReplicaCore` in this process (tests, scripts, single-process serving)."""

    def __init__(self, core: ReplicaCore):
        self.core = core

    def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        return self.core.generate(payload)

    async def model_info(self) -> dict[str, Any]:
        return self.core.model_info()

    async def ping(self) -> None:
        """Returns once the engine thread answered (never blocks the event loop)."""
        await self.core.ping()


class RayBackend:
    """The ``StarCoderReplica`` deployment; the request router picks the replica."""

    def __init__(self, handle: Any):  # a ray.serve DeploymentHandle
        self.handle = handle

    async def stream(self, payload: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        response = self.handle.options(stream=True).generate.remote(payload)
        finished, replica = False, None
        try:
            async for chunk in response:
                replica = chunk.get("replica", replica)
                yield chunk
            finished = True
        except RayActorError as e:  # the replica died under this request; Ray starts another
            finished = True
            message = f"the replica serving this request stopped ({type(e).__name__}); retry"
            yield error_chunk(503, message, "unavailable") | {"lost_replica": replica}
        finally:
            if not finished:  # the client left: stop the replica's generator (frees its KV)
                response.cancel()

    async def model_info(self) -> dict[str, Any]:
        return await self.handle.model_info.remote()

    async def ping(self) -> None:
        """Returns once a replica (whichever the router picks) answered through its engine
        thread; the caller bounds the wait, and cancelling it cancels the call."""
        await self.handle.ping.remote()
