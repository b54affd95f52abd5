"""Adapter registry: which adapters exist, whose they are, where their bytes live.

A metadata index (Redis, or embedded SQLite), a blob store (S3-compatible, or a local
directory), strict validation of PEFT-format files, tenants with hashed API keys, and a REST API.
It knows base models only by their shapes and never imports torch.
"""

from adapter_registry.base_models import BaseModelCatalog, BaseModelSpec
from adapter_registry.errors import (
    AdapterTooLarge,
    Conflict,
    Forbidden,
    IntegrityError,
    InvalidAdapter,
    InvalidName,
    NotFound,
    RegistryError,
    TooManyFailedKeys,
    Unauthorized,
    Unavailable,
)
from adapter_registry.records import (
    AdapterKind,
    AdapterRecord,
    AdapterStatus,
    Event,
    Resolution,
    Tenant,
)
from adapter_registry.registry import AdapterMeta, Principal, Registry
from adapter_registry.settings import RegistrySettings

__all__ = [
    "AdapterKind",
    "AdapterMeta",
    "AdapterRecord",
    "AdapterStatus",
    "AdapterTooLarge",
    "BaseModelCatalog",
    "BaseModelSpec",
    "Conflict",
    "Event",
    "Forbidden",
    "IntegrityError",
    "InvalidAdapter",
    "InvalidName",
    "NotFound",
    "Principal",
    "Registry",
    "RegistryError",
    "RegistrySettings",
    "Resolution",
    "Tenant",
    "TooManyFailedKeys",
    "Unauthorized",
    "Unavailable",
]
