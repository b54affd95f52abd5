"""Where adapter files live: one directory (or S3 prefix) per ``tenant/name/version``.

Layout: ``{root}/{tenant}/{name}/{version}/adapter_config.json`` + ``adapter_model.safetensors``.
Names are validated before they get here, so a key can never leave its tenant's prefix.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class BlobStore(ABC):
    url: str  # where this store writes, for logs and docs (no credentials)

    @abstractmethod
    def uri(self, tenant: str, name: str, version: int) -> str:
        """The URI ``put`` writes to for this version."""

    @abstractmethod
    def put(self, tenant: str, name: str, version: int, files: dict[str, bytes]) -> str:
        """Write all ``files`` (name → bytes) under the version's URI; all or nothing visible."""

    @abstractmethod
    def get(self, uri: str, dest: Path, names: list[str]) -> None:
        """Download ``names`` from ``uri`` into the existing directory ``dest``."""

    @abstractmethod
    def delete(self, uri: str) -> None:
        """Remove everything under ``uri``; missing files are not an error."""

    @abstractmethod
    def ping(self) -> None:
        """Raises :class:`~adapter_registry.errors.Unavailable` if the store is unreachable."""
