"""A Python client for the registry API (used by the ``flora adapters`` CLI and by tests).

Server errors come back as the same typed exceptions the registry raises, so
``except NotFound`` works the same on both sides of the wire.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from adapter_registry import errors
from adapter_registry.formats import CONFIG_FILE, WEIGHTS_FILE
from adapter_registry.records import AdapterRecord, Resolution, Tenant

_BY_STATUS: dict[int, type[errors.RegistryError]] = {
    401: errors.Unauthorized,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    413: errors.AdapterTooLarge,
    422: errors.InvalidAdapter,
    502: errors.IntegrityError,
    503: errors.Unavailable,
}


class RegistryClient:
    def __init__(self, url: str, key: str | None = None, *, timeout: float = 120.0):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise errors.Unavailable(
                f"cannot reach the registry at {self.http.base_url}: {e}"
            ) from e
        if response.is_success:
            return response.json()
        try:
            error = response.json()["error"]
            message, param = error["message"], error.get("param")
        except (ValueError, KeyError, TypeError):
            message, param = response.text[:500] or response.reason_phrase, None
        raise _BY_STATUS.get(response.status_code, errors.RegistryError)(
            f"{response.status_code}: {message}", param=param
        )

    # --- tenants (admin key) -------------------------------------------------------------------
    def create_tenant(self, name: str) -> tuple[Tenant, str]:
        body = self._call("POST", "/v1/tenants", json={"name": name})
        return Tenant.model_validate(body["tenant"]), body["api_key"]

    # --- adapters -------------------------------------------------------------------------------
    def register(
        self,
        directory: str | Path,
        name: str,
        *,
        language: str | None = None,
        user: str | None = None,
        base_model: str | None = None,
        description: str = "",
    ) -> AdapterRecord:
        """Upload an adapter directory as written by PEFT's ``save_pretrained`` (or FLoRA's)."""
        directory = Path(directory)
        fields = {
            "name": name,
            "language": language,
            "user": user,
            "base_model": base_model,
            "description": description,
        }
        data = {k: v for k, v in fields.items() if v}
        with (
            open(directory / CONFIG_FILE, "rb") as config,
            open(directory / WEIGHTS_FILE, "rb") as weights,
        ):
            files = {"config": (CONFIG_FILE, config), "weights": (WEIGHTS_FILE, weights)}
            body = self._call("POST", "/v1/adapters", data=data, files=files)
        return AdapterRecord.model_validate(body)

    def import_uri(self, uri: str, name: str, **meta: str | None) -> AdapterRecord:
        body = {"name": name, "uri": uri} | {k: v for k, v in meta.items() if v}
        return AdapterRecord.model_validate(self._call("POST", "/v1/adapters", json=body))

    def list(self, **filters: str | bool | None) -> list[AdapterRecord]:
        params = {k: v for k, v in filters.items() if v not in (None, False)}
        body = self._call("GET", "/v1/adapters", params=params)
        return [AdapterRecord.model_validate(r) for r in body["data"]]

    def show(self, ref: str) -> list[AdapterRecord]:
        body = self._call("GET", f"/v1/adapters/{_segment(ref)}")
        return [AdapterRecord.model_validate(r) for r in body["data"]]

    def delete(self, ref: str) -> list[str]:
        return self._call("DELETE", f"/v1/adapters/{_segment(ref)}")["deleted"]

    def resolve(self, **fields: str | None) -> Resolution:
        params = {k: v for k, v in fields.items() if v}
        return Resolution.model_validate(self._call("GET", "/v1/adapters/resolve", params=params))


def _segment(ref: str) -> str:
    """One URL path segment: anything that would change the route is refused up front."""
    if not ref or "/" in ref or ref in (".", "..") or not ref.isprintable():
        raise errors.InvalidName(f"invalid adapter reference {ref!r}")
    return ref
