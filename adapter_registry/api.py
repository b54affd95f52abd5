"""The registry's REST API as a FastAPI router: mount it in the Serve ingress or run it alone.

Every route authenticates with ``Authorization: Bearer <key>``. A tenant key sees only that
tenant's adapters (others answer 404, exactly like names that do not exist); the admin key
manages tenants and the public (global) adapters.
"""

# No ``from __future__ import annotations`` here: FastAPI must see the dependency types that
# build_router defines locally, which string annotations would hide.
import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from adapter_registry.errors import Forbidden, RegistryError
from adapter_registry.formats import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE
from adapter_registry.records import AdapterKind, AdapterRecord, Resolution, Tenant
from adapter_registry.registry import AdapterMeta, Principal, Registry

_bearer = HTTPBearer(auto_error=False, description="a tenant API key, or the admin key")


class TenantCreate(BaseModel):
    name: str = Field(examples=["acme"], description="a-z, 0-9, '.', '_', '-'; 1-64 characters")


class TenantCreated(BaseModel):
    tenant: Tenant
    api_key: str = Field(description="shown once; only its hash is stored")


class AdapterImport(BaseModel):
    """Register an adapter that already sits in S3-compatible storage (it is copied)."""

    name: str = Field(examples=["python-style"])
    uri: str = Field(examples=["s3://team-bucket/adapters/python-style"])
    language: str | None = Field(None, examples=["python"])
    user: str | None = None
    base_model: str | None = Field(None, examples=["bigcode/starcoderbase-1b"])
    description: str = ""


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterRecord]


class Deleted(BaseModel):
    deleted: list[str] = Field(description="ids of the removed versions")


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["name", "config", "weights"],
                    "properties": {
                        "name": {"type": "string", "example": "python-style"},
                        "config": {
                            "type": "string",
                            "format": "binary",
                            "description": CONFIG_FILE,
                        },
                        "weights": {
                            "type": "string",
                            "format": "binary",
                            "description": WEIGHTS_FILE,
                        },
                        "language": {"type": "string", "example": "python"},
                        "user": {"type": "string"},
                        "base_model": {"type": "string"},
                        "description": {"type": "string"},
                    },
                }
            },
            "application/json": {"schema": AdapterImport.model_json_schema()},
        },
    }
}


def declared(statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for the statuses a route answers besides 200 and 422."""
    return {status: {"description": why} for status, why in statuses.items()}


_ERRORS = declared(
    {
        400: "bad name or request",
        401: "missing or invalid API key",
        403: "admin key required",
        404: "no such adapter (or not yours)",
        409: "already exists",
        413: "upload too large",
        422: "not a valid adapter for this registry",
        429: "too many invalid API keys from this client (Retry-After)",
        503: "index or store unreachable; nothing was written",
    }
)


def build_router(registry: Registry) -> APIRouter:
    router = APIRouter(tags=["adapters"], responses=_ERRORS)

    def caller(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> Principal:
        key = credentials.credentials if credentials else None
        principal = registry.authenticate(key, client_address(request))
        remember_tenant(request, principal.tenant)
        return principal

    def admin(principal: Annotated[Principal, Depends(caller)]) -> Principal:
        if not principal.is_admin:
            raise Forbidden("this route needs the admin key")
        return principal

    Caller = Annotated[Principal, Depends(caller)]
    Admin = Annotated[Principal, Depends(admin)]

    @router.post("/v1/tenants", status_code=201, tags=["tenants"])
    def create_tenant(body: TenantCreate, _: Admin) -> TenantCreated:
        tenant, key = registry.create_tenant(body.name)
        return TenantCreated(tenant=tenant, api_key=key)

    @router.get("/v1/tenants", tags=["tenants"])
    def list_tenants(_: Admin) -> list[Tenant]:
        return registry.index.list_tenants()

    @router.post("/v1/tenants/{tenant}/keys", status_code=201, tags=["tenants"])
    def add_key(tenant: str, _: Admin) -> dict[str, str]:
        return {"api_key": registry.add_key(tenant)}

    @router.post("/v1/adapters", status_code=201, openapi_extra=_UPLOAD_BODY)
    async def register(request: Request, principal: Caller) -> AdapterRecord:
        """Upload ``adapter_config.json`` + ``adapter_model.safetensors`` (multipart), or import
        them from an ``s3://`` prefix (JSON). Returns the new version's record."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("application/json"):
            body = AdapterImport.model_validate(await _json(request))
            meta = AdapterMeta(
                body.name, body.language, body.user, body.base_model, body.description
            )
            return await run_in_threadpool(registry.import_uri, principal, meta, body.uri)
        if not content_type.startswith("multipart/form-data"):
            raise RegistryError("send multipart/form-data (files) or application/json (an uri)")
        form = await request.form(max_files=2, max_fields=8, max_part_size=MAX_CONFIG_BYTES)
        try:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            config = await _file(form.get("config"), "config")
            weights = await _file(form.get("weights"), "weights")
        finally:
            await form.close()
        meta = AdapterMeta(
            fields.get("name", ""),
            fields.get("language"),
            fields.get("user"),
            fields.get("base_model"),
            fields.get("description", ""),
        )
        return await run_in_threadpool(registry.register, principal, meta, config, weights)

    @router.get("/v1/adapters")
    def list_adapters(
        principal: Caller,
        user: str | None = None,
        language: str | None = None,
        kind: AdapterKind | None = None,
        include_global: Annotated[bool, Query(description="also list public adapters")] = False,
    ) -> AdapterList:
        """The newest version of each adapter you own, filtered."""
        found = registry.list(
            principal, user=user, language=language, kind=kind, include_global=include_global
        )
        return AdapterList(data=found)

    @router.get("/v1/adapters/resolve")
    def resolve(
        principal: Caller,
        adapter: str | None = None,
        user: str | None = None,
        language: str | None = None,
    ) -> Resolution:
        """Which adapter a request with these fields would be served with, and why."""
        return registry.resolve(principal, adapter=adapter, user=user, language=language)

    @router.get("/v1/adapters/{ref}")
    def show(ref: str, principal: Caller) -> AdapterList:
        """Every version of ``name`` (newest first), or just ``name@version``."""
        if "@" in ref:
            return AdapterList(data=[registry.get(principal, ref, allow_global=False)])
        return AdapterList(data=registry.versions(principal, ref))

    @router.delete("/v1/adapters/{ref}")
    def delete(ref: str, principal: Caller) -> Deleted:
        """Delete ``name@version``, or every version of ``name``. Replicas stop serving it."""
        return Deleted(deleted=[r.id for r in registry.delete(principal, ref)])

    @router.get("/v1/base-models", tags=["tenants"])
    def base_models(_: Caller) -> dict[str, list[str]]:
        return {"data": registry.catalog.names()}

    return router


def remember_tenant(request: Request, tenant: str | None) -> None:
    """Note who was authenticated on the request (``request.state``, i.e. ``scope["state"]``),
    for whatever counts the response afterwards (the Serve ingress labels its metrics with it).
    The admin is no tenant: ``None``."""
    request.state.tenant = tenant


def client_address(request: Request) -> str:
    """Who is calling, for brute-force limits: the peer address as this server sees it.
    X-Forwarded-For is deliberately not trusted (any client can set it); behind a proxy every
    client shares the proxy's address."""
    return request.client.host if request.client else "unknown"


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise RegistryError(f"the body is not valid JSON: {type(e).__name__}") from e


async def _file(value: object, field: str) -> bytes:
    if not isinstance(value, UploadFile):
        expected = CONFIG_FILE if field == "config" else WEIGHTS_FILE
        raise RegistryError(f"multipart field {field!r} must be the file {expected}", param=field)
    return await value.read()


def readiness(registry: Registry, response: Response) -> dict[str, str]:
    """``/readyz``: 200 when the index and the store answer, else 503 with the reasons."""
    status = registry.health()
    if any(v != "ok" for v in status.values()):
        response.status_code = 503
    return status
