"""Registry configuration from the environment — the same variables the Serve deployments read.

========================  =====================================================================
FLORA_ADMIN_KEY           admin key (tenants, public adapters). Unset: generated once and kept
                          in ``$FLORA_DATA_DIR/registry/admin.key`` (mode 0600), never logged.
FLORA_REDIS_URL           ``redis://…`` index. Unset: embedded SQLite in ``$FLORA_DATA_DIR``.
FLORA_STORE_URL           ``s3://bucket/prefix`` or a local directory for adapter files.
                          Unset: ``$FLORA_DATA_DIR/registry/blobs``.
FLORA_DATA_DIR            local state (default ``~/.local/share/flora``).
FLORA_MAX_ADAPTER_BYTES   largest accepted weights file (default 256 MiB).
FLORA_IMPORT_PREFIXES     comma-separated ``s3://`` prefixes tenants may import from (default:
                          any bucket but the registry's own store).
FLORA_BASE_MODELS         extra base models as ``name=/path/to/checkpoint,…`` (their
                          ``config.json`` gives the shapes; StarCoder models are built in).
FLORA_AUTH_MAX_FAILURES   bad API keys one client (peer address) may send per window before it
                          gets 429 ``too_many_failed_keys`` (default 20).
FLORA_AUTH_WINDOW_S       that window in seconds (default 60).
AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION
                          boto3's own variables, for any S3-compatible store.
========================  =====================================================================
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from pydantic import BaseModel

from adapter_registry.auth_limits import DEFAULT_MAX_FAILURES, DEFAULT_WINDOW_S, FailedKeyLimiter
from adapter_registry.base_models import BaseModelCatalog
from adapter_registry.blobs import BlobStore, LocalBlobStore, S3BlobStore
from adapter_registry.index import Index
from adapter_registry.registry import DEFAULT_MAX_ADAPTER_BYTES, Registry
from adapter_registry.urls import hide_password

log = logging.getLogger(__name__)


def default_data_dir() -> Path:
    return Path(os.environ.get("FLORA_DATA_DIR") or Path.home() / ".local" / "share" / "flora")


class RegistrySettings(BaseModel):
    admin_key: str | None = None
    redis_url: str | None = None
    store_url: str | None = None
    data_dir: Path
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    import_prefixes: list[str] | None = None
    base_models: dict[str, str] = {}
    auth_max_failures: int = DEFAULT_MAX_FAILURES
    auth_window_s: float = DEFAULT_WINDOW_S

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> RegistrySettings:
        env = dict(os.environ if env is None else env)
        prefixes = env.get("FLORA_IMPORT_PREFIXES")
        models = [p for p in env.get("FLORA_BASE_MODELS", "").split(",") if p.strip()]
        if any("=" not in m for m in models):
            raise ValueError("FLORA_BASE_MODELS must look like name=/path/to/model,…")
        return cls(
            admin_key=env.get("FLORA_ADMIN_KEY") or None,
            redis_url=env.get("FLORA_REDIS_URL") or None,
            store_url=env.get("FLORA_STORE_URL") or None,
            data_dir=Path(env.get("FLORA_DATA_DIR") or default_data_dir()),
            max_adapter_bytes=int(env.get("FLORA_MAX_ADAPTER_BYTES") or DEFAULT_MAX_ADAPTER_BYTES),
            import_prefixes=[p.strip() for p in prefixes.split(",")] if prefixes else None,
            base_models=dict(m.strip().split("=", 1) for m in models),
            auth_max_failures=int(env.get("FLORA_AUTH_MAX_FAILURES") or DEFAULT_MAX_FAILURES),
            auth_window_s=float(env.get("FLORA_AUTH_WINDOW_S") or DEFAULT_WINDOW_S),
        )

    @property
    def local_dir(self) -> Path:
        return self.data_dir / "registry"

    def build_index(self) -> Index:
        if self.redis_url:
            from adapter_registry.index.redis import RedisIndex

            return RedisIndex(self.redis_url)
        from adapter_registry.index.sqlite import SqliteIndex

        return SqliteIndex(self.local_dir / "index.sqlite3")

    def build_store(self) -> BlobStore:
        if self.store_url and self.store_url.startswith("s3://"):
            return S3BlobStore(self.store_url)
        return LocalBlobStore(self.store_url or self.local_dir / "blobs")

    def resolved_admin_key(self) -> str:
        """The admin key: from the environment, or generated once and kept on disk."""
        if self.admin_key:
            return self.admin_key
        path = self.admin_key_path
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".admin.key.{os.getpid()}")
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write("flr_admin_" + secrets.token_urlsafe(32) + "\n")
            try:  # atomic and first-writer-wins: processes starting together agree on one key
                os.link(staging, path)
                log.warning("FLORA_ADMIN_KEY is unset: generated an admin key in %s", path)
            except FileExistsError:
                pass
            finally:
                staging.unlink()
        return path.read_text().strip()

    @property
    def admin_key_path(self) -> Path:
        return self.local_dir / "admin.key"

    def describe(self) -> str:
        """Where things are, for the startup log (no secrets)."""
        index = "Redis " + hide_password(self.redis_url) if self.redis_url else "embedded SQLite"
        store = self.store_url or str(self.local_dir / "blobs")
        return f"index: {index}; adapter files: {store}; local state: {self.local_dir}"

    def build(self) -> Registry:
        catalog = BaseModelCatalog()
        for name, directory in self.base_models.items():
            catalog.add_config_dir(name, directory)
        return Registry(
            self.build_index(),
            self.build_store(),
            catalog,
            admin_key=self.resolved_admin_key(),
            max_adapter_bytes=self.max_adapter_bytes,
            import_prefixes=self.import_prefixes,
            failed_keys=FailedKeyLimiter(self.auth_max_failures, self.auth_window_s),
        )
