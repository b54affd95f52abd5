"""What the registry stores: adapter records, tenants, and the answer of a resolution."""

from __future__ import annotations

import time
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from adapter_format import AdapterKind
from adapter_registry.names import AdapterSpec


class AdapterStatus(StrEnum):
    READY = "ready"
    DELETING = "deleting"  # marked before its blobs go: never resolved or listed again


class AdapterRecord(BaseModel):
    """One immutable version of one adapter. ``id`` is ``tenant/name@version``."""

    model_config = ConfigDict(
        frozen=True,
        json_schema_extra={
            "example": {
                "id": "acme/python-style@3",
                "tenant": "acme",
                "name": "python-style",
                "version": 3,
                "kind": "flora",
                "rank": 1,
                "alpha": None,
                "base_model": "bigcode/starcoderbase-1b",
                "target_modules": ["c_attn"],
                "language": "python",
                "user": None,
                "sha256": "9f2c…",
                "size": 1052672,
                "uri": "s3://adapters/flora/acme/python-style/3",
                "created_at": 1795900000.0,
                "status": "ready",
                "description": "house style for Python services",
            }
        },
    )

    id: str
    tenant: str
    name: str
    version: int = Field(ge=1)
    kind: AdapterKind
    rank: int = Field(ge=1)
    alpha: float | None = None
    base_model: str
    target_modules: list[str]
    language: str | None = None
    user: str | None = None
    sha256: str
    size: int = Field(ge=0)
    uri: str
    created_at: float = Field(default_factory=time.time)
    status: AdapterStatus = AdapterStatus.READY
    description: str = ""

    @staticmethod
    def make_id(tenant: str, name: str, version: int) -> str:
        """``tenant/name@version`` (:class:`AdapterSpec`'s grammar, parsed with ``scoped``)."""
        return str(AdapterSpec(name, version, tenant))

    @property
    def label(self) -> str:
        """``name@version``: how clients refer to it (the tenant is implied by their key)."""
        return f"{self.name}@{self.version}"


class Tenant(BaseModel):
    name: str
    created_at: float = Field(default_factory=time.time)


class Resolution(BaseModel):
    """Which adapter serves a request and why; ``adapter`` is ``None`` for the base model."""

    adapter: AdapterRecord | None
    reason: str
    rule: str  # "explicit" | "user+language" | "user" | "language" | "global-language" | "base"


class Event(BaseModel):
    """An index change replicas care about. ``reset`` means "events may have been missed"."""

    type: str  # "registered" | "deleted" | "reset"
    tenant: str = ""
    name: str = ""
    version: int = 0
