"""Backends for the ingress: the replicas behind a Ray Serve handle, or one in-process engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayActorError

from flora.serve.replica import ReplicaCore
from flora.serve.wire import GenerateCall, StreamChunk


class LocalBackend:
    """One :class:`ReplicaCore` in this process (tests, scripts, single-process serving)."""

    def __init__(self, core: ReplicaCore):
        self.core = core

    def stream(self, call: GenerateCall) -> AsyncIterator[StreamChunk]:
        return self.core.generate(call)

    async def model_info(self) -> dict[str, Any]:
        return self.core.model_info()

    async def ping(self) -> None:
        """Returns once the engine thread answered (never blocks the event loop)."""
        await self.core.ping()


class RayBackend:
    """The ``StarCoderReplica`` deployment; the request router picks the replica."""

    def __init__(self, handle: Any):  # a ray.serve DeploymentHandle
        self.handle = handle

    async def stream(self, call: GenerateCall) -> AsyncIterator[StreamChunk]:
        response = self.handle.options(stream=True).generate.remote(call)
        finished, replica = False, None
        try:
            async for chunk in response:
                replica = chunk.replica or replica
                yield chunk
            finished = True
        except RayActorError as e:  # the replica died under this request; Ray starts another
            finished = True
            message = f"the replica serving this request stopped ({type(e).__name__}); retry"
            yield StreamChunk.failure(503, "unavailable", message, lost_replica=replica)
        finally:
            if not finished:  # the client left: stop the replica's generator (frees its KV)
                response.cancel()

    async def model_info(self) -> dict[str, Any]:
        return await self.handle.model_info.remote()

    async def ping(self) -> None:
        """Returns once a replica (whichever the router picks) answered through its engine
        thread; the caller bounds the wait, and cancelling it cancels the call."""
        await self.handle.ping.remote()
