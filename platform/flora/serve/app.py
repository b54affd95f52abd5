"""The Ray Serve application: ``serve run deployments/starcoder.yaml`` imports ``build_app``.

Two deployments: ``Ingress`` (FastAPI: OpenAI API, registry REST, health, metrics) and
``StarCoderReplica`` (one engine each). Requests from all tenants reach the same replicas, and
the adapter id travels in the body, so every replica batches across tenants; the
``AdapterAffinityRouter`` prefers replicas that already hold the adapter.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from adapter_registry import RegistrySettings
from flora.serve.backends import RayBackend
from flora.serve.config import ServeArgs
from flora.serve.ingress import build_ingress_app
from flora.serve.replica import ReplicaCore
from flora.serve.wire import GenerateCall, StreamChunk

log = logging.getLogger("ray.serve")


@serve.deployment(
    name="StarCoderReplica",
    max_ongoing_requests=256,
    health_check_period_s=10,
    graceful_shutdown_wait_loop_s=2,
    graceful_shutdown_timeout_s=120,  # in-flight streams finish before the replica goes
    request_router_config=RequestRouterConfig(
        request_router_class="flora.serve.routing:AdapterAffinityRouter",
        request_routing_stats_period_s=2,
    ),
)
class StarCoderReplica:
    def __init__(self, args: dict[str, Any]):
        self.core = ReplicaCore(ServeArgs.model_validate(args))
        config = self.core.engine.config
        log.info(
            "StarCoderReplica: serving %s from %s on %s (%s), context %d, %d adapter slots",
            self.core.args.served_name,
            self.core.model_dir,
            config.device,
            config.torch_dtype,
            self.core.max_model_len,
            config.adapter_slots,
        )

    async def generate(self, call: GenerateCall) -> AsyncIterator[StreamChunk]:
        async for chunk in self.core.generate(call):
            yield chunk

    def model_info(self) -> dict[str, Any]:
        return self.core.model_info()

    async def ping(self) -> None:
        """The ingress's readiness ping: answers only if the engine thread does (a frozen engine
        loop, or a frozen process, leaves it unanswered and ``/readyz`` turns 503)."""
        await self.core.ping()

    async def record_routing_stats(self) -> dict[str, Any]:
        return await self.core.routing_stats()

    def check_health(self) -> None:
        if not self.core.engine.running:
            raise RuntimeError("the engine loop stopped")

    def __del__(self) -> None:
        self.core.shutdown()


@serve.deployment(name="Ingress", max_ongoing_requests=2048, graceful_shutdown_timeout_s=120)
@serve.ingress()
class Ingress:
    def __init__(self, replica: Any, args: dict[str, Any]):
        self.args = ServeArgs.model_validate(args)
        settings = RegistrySettings.from_env()
        self.registry = settings.build()
        self.replica = RayBackend(replica)
        log.info("FLoRA Serve ingress: model %s; %s", self.args.served_name, settings.describe())
        if not settings.admin_key:
            log.warning("FLORA_ADMIN_KEY is unset: the admin key is in %s", settings.admin_key_path)

    def __serve_build_asgi_app__(self) -> Any:
        return build_ingress_app(self.registry, self.replica, self.args)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve's app builder: typed args (``ServeArgs``) in, the bound application out."""
    plain = ServeArgs.model_validate(args).model_dump()
    return Ingress.bind(StarCoderReplica.bind(plain), plain)
