"""The registry's operations: tenants and keys, register / list / delete / resolve adapters,
and fetching them onto a replica with the sha256 checked.

Crash-safety: a version is written blob first, index second, so the index never points at
missing bytes; if the index write fails the blob is removed (best effort), and an orphan that
survives a crash is invisible because listings come from the index. Deletion marks the record
``deleting`` and announces it before any byte is removed, so no replica serves it afterwards.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from adapter_registry.auth_limits import FailedKeyLimiter
from adapter_registry.base_models import BaseModelCatalog
from adapter_registry.blobs import BlobStore, S3BlobStore, parse_s3_uri, read_s3_files
from adapter_registry.errors import (
    Forbidden,
    IntegrityError,
    NotFound,
    RegistryError,
    TooManyFailedKeys,
    Unauthorized,
    Unavailable,
)
from adapter_registry.formats import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE, validate_adapter
from adapter_registry.index import EventCallback, Index, Subscription
from adapter_registry.keys import hash_key, new_key, same_key
from adapter_registry.last_known import LastKnown
from adapter_registry.names import (
    GLOBAL,
    AdapterSpec,
    check_adapter_name,
    check_name,
    check_optional,
)
from adapter_registry.records import (
    AdapterKind,
    AdapterRecord,
    AdapterStatus,
    Event,
    Resolution,
    Tenant,
)
from adapter_registry.resolution import resolve_implicit

log = logging.getLogger(__name__)
DEFAULT_MAX_ADAPTER_BYTES = 256 << 20


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant, or the admin (whose adapters are the public, global ones)."""

    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None

    @property
    def scope(self) -> str:
        return self.tenant or GLOBAL


@dataclass(frozen=True)
class AdapterMeta:
    """What the uploader says about an adapter; the files say the rest."""

    name: str
    language: str | None = None
    user: str | None = None
    base_model: str | None = None
    description: str = ""

    def checked(self) -> AdapterMeta:
        if len(self.description) > 1000:
            raise RegistryError("description is longer than 1000 characters", param="description")
        return AdapterMeta(
            check_adapter_name(self.name),
            check_optional(self.language, "language"),
            check_optional(self.user, "user"),
            self.base_model or None,
            self.description,
        )


class Registry:
    def __init__(
        self,
        index: Index,
        blobs: BlobStore,
        catalog: BaseModelCatalog | None = None,
        *,
        admin_key: str | None = None,
        max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
        import_prefixes: list[str] | None = None,
        failed_keys: FailedKeyLimiter | None = None,
        stale_reads_s: float = 300.0,
    ):
        self.index = index
        self.blobs = blobs
        self.catalog = catalog or BaseModelCatalog()
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self.max_adapter_bytes = max_adapter_bytes
        self.import_prefixes = import_prefixes
        self.failed_keys = failed_keys or FailedKeyLimiter()
        # keys and adapter lookups read before an index outage keep answering through it
        self.last_known = LastKnown(stale_reads_s)

    # --- tenants and keys -------------------------------------------------------------------
    def authenticate(self, key: str | None, client: str | None = None) -> Principal:
        """Who ``key`` belongs to. ``client`` (the peer address) enables brute-force
        protection: after too many bad keys it gets :class:`TooManyFailedKeys`, even for a
        correct key, until the window passes."""
        if client is not None and (wait := self.failed_keys.retry_after(client)) is not None:
            raise TooManyFailedKeys(wait)
        if not key:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if self._admin_hash and same_key(key, self._admin_hash):
            return Principal(None)
        hashed = hash_key(key)
        tenant = self.last_known.read(
            ("key", hashed), lambda: self.index.tenant_for_key(hashed), keep=lambda t: t is not None
        )
        if tenant is None:
            if client is not None:
                self.failed_keys.failed(client)
            raise Unauthorized("invalid API key")
        return Principal(tenant)

    def create_tenant(self, name: str) -> tuple[Tenant, str]:
        """A new tenant and its first API key — the only time the key is ever visible."""
        tenant = Tenant(name=check_name(name, "tenant"))
        key = new_key()
        self.index.create_tenant(tenant, hash_key(key))
        log.info("created tenant %s", tenant.name)
        return tenant, key

    def add_key(self, tenant: str) -> str:
        key = new_key()
        self.index.add_key(check_name(tenant, "tenant"), hash_key(key))
        return key

    # --- registering --------------------------------------------------------------------------
    def register(
        self, principal: Principal, meta: AdapterMeta, config: bytes, weights: bytes
    ) -> AdapterRecord:
        """Validate, store and index a new version of ``meta.name`` for the caller."""
        meta = meta.checked()
        info = validate_adapter(
            config,
            weights,
            self.catalog,
            base_model=meta.base_model,
            max_bytes=self.max_adapter_bytes,
        )
        scope = principal.scope
        version = self.index.next_version(scope, meta.name)
        uri = self.blobs.put(
            scope, meta.name, version, {WEIGHTS_FILE: weights, CONFIG_FILE: config}
        )
        record = AdapterRecord(
            id=AdapterRecord.make_id(scope, meta.name, version),
            tenant=scope,
            name=meta.name,
            version=version,
            kind=info.kind,
            rank=info.rank,
            alpha=info.alpha,
            base_model=info.base_model,
            target_modules=info.target_modules,
            language=meta.language,
            user=meta.user,
            sha256=info.sha256,
            size=info.size,
            uri=uri,
            description=meta.description,
        )
        try:
            self.index.put(record)
        except BaseException:
            self._forget_blob(uri)
            raise
        self._announce(Event(type="registered", tenant=scope, name=meta.name, version=version))
        log.info(
            "registered %s (%s, rank %d, %d bytes)", record.id, info.kind, info.rank, info.size
        )
        return record

    def import_uri(self, principal: Principal, meta: AdapterMeta, uri: str) -> AdapterRecord:
        """Register the adapter found under an existing ``s3://`` prefix (copied, then owned)."""
        meta = meta.checked()  # a bad name is the caller's 400 before any store is touched
        self._check_import(uri)
        limits = {WEIGHTS_FILE: self.max_adapter_bytes, CONFIG_FILE: MAX_CONFIG_BYTES}
        files = read_s3_files(uri, [CONFIG_FILE, WEIGHTS_FILE], max_bytes=limits)
        return self.register(principal, meta, files[CONFIG_FILE], files[WEIGHTS_FILE])

    def _check_import(self, uri: str) -> None:
        bucket, key = parse_s3_uri(uri)
        if any(part in (".", "..") for part in key.split("/")):
            # a store that normalises dot segments would resolve them into another prefix
            raise Forbidden("import URIs must not contain '.' or '..' segments", param="uri")
        own = isinstance(self.blobs, S3BlobStore) and bucket == self.blobs.bucket
        if own and (not self.blobs.prefix or (key + "/").startswith(self.blobs.prefix + "/")):
            # would let one tenant copy another's adapter through the registry's credentials
            raise Forbidden("cannot import from the registry's own store", param="uri")
        if self.import_prefixes is not None and not any(
            uri.startswith(p) for p in self.import_prefixes
        ):
            raise Forbidden(
                f"imports are allowed only from {self.import_prefixes} (FLORA_IMPORT_PREFIXES)",
                param="uri",
            )

    # --- reading ------------------------------------------------------------------------------
    def _ready(
        self, scope: str, *, name: str | None = None, user: str | None = None, language=None
    ) -> list[AdapterRecord]:
        records = self.last_known.read(
            ("list", scope, name, user, language),
            lambda: self.index.list(scope, name=name, user=user, language=language),
        )
        return [r for r in records if r.status is AdapterStatus.READY]

    def list(
        self,
        principal: Principal,
        *,
        user: str | None = None,
        language: str | None = None,
        kind: AdapterKind | None = None,
        include_global: bool = False,
    ) -> list[AdapterRecord]:
        """The newest ready version of each adapter the caller owns (plus public ones if asked)."""
        user, language = check_optional(user, "user"), check_optional(language, "language")
        scopes = [principal.scope] + ([GLOBAL] if include_global and principal.tenant else [])
        newest: dict[tuple[str, str], AdapterRecord] = {}
        for scope in scopes:
            for r in self._ready(scope, user=user, language=language):
                if kind is None or r.kind == kind:
                    current = newest.get((r.tenant, r.name))
                    if current is None or r.version > current.version:
                        newest[(r.tenant, r.name)] = r
        return sorted(newest.values(), key=lambda r: (r.tenant, r.name))

    def versions(self, principal: Principal, name: str) -> list[AdapterRecord]:
        """Every ready version of one of the caller's adapters, newest first."""
        found = self._ready(principal.scope, name=check_adapter_name(name))
        if not found:
            raise NotFound(f"no adapter named {name!r}")
        return found

    def get(self, principal: Principal, ref: str, *, allow_global: bool = True) -> AdapterRecord:
        """``name`` (newest) or ``name@version``: the caller's own first, then a public one."""
        spec = AdapterSpec.parse(ref)
        scopes = [principal.scope]
        if allow_global and principal.tenant:
            scopes.append(GLOBAL)
        for scope in scopes:
            found = self._ready(scope, name=spec.name)
            if spec.version is not None:
                found = [r for r in found if r.version == spec.version]
            if found:
                return max(found, key=lambda r: r.version)
        raise NotFound(f"no adapter {str(spec)!r}", param="model")

    def resolve(
        self,
        principal: Principal,
        *,
        adapter: str | None = None,
        user: str | None = None,
        language: str | None = None,
    ) -> Resolution:
        """Which adapter serves a request, with the reason (see ``resolution.py``)."""
        if adapter:
            record = self.get(principal, adapter)
            return Resolution(adapter=record, rule="explicit", reason=f"{record.label}: named")
        user, language = check_optional(user, "user"), check_optional(language, "language")
        return resolve_implicit(
            lambda scope, u, lang: self._ready(scope, user=u, language=lang),
            principal.scope,
            user,
            language,
        )

    # --- deleting -----------------------------------------------------------------------------
    def delete(self, principal: Principal, ref: str) -> list[AdapterRecord]:
        """Delete one version (``name@N``) or every version of an adapter the caller owns."""
        spec = AdapterSpec.parse(ref)
        records = self.index.list(principal.scope, name=spec.name)  # deleting ones too: retries
        if spec.version is not None:
            records = [r for r in records if r.version == spec.version]
        if not records:
            raise NotFound(f"no adapter {str(spec)!r}")
        for r in records:
            self.index.set_status(r.tenant, r.name, r.version, AdapterStatus.DELETING)
            self._announce(Event(type="deleted", tenant=r.tenant, name=r.name, version=r.version))
        for r in records:
            self.blobs.delete(r.uri)  # raises Unavailable: the record stays marked, DELETE again
            self.index.remove(r.tenant, r.name, r.version)
            log.info("deleted %s", r.id)
        return records

    # --- replicas -----------------------------------------------------------------------------
    def fetch(self, record: AdapterRecord, dest: str | Path) -> Path:
        """``dest`` holding the record's two files, downloaded once and sha256-verified.

        Callers key ``dest`` by tenant, name and version (the engine's adapter cache does), so
        an existing ``dest`` already holds exactly these verified bytes.
        """
        final = Path(dest)
        if (final / WEIGHTS_FILE).is_file():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=final.parent))
        try:
            self.blobs.get(record.uri, staging, [CONFIG_FILE, WEIGHTS_FILE])
            digest = _sha256(staging / WEIGHTS_FILE)
            if digest != record.sha256:
                raise IntegrityError(
                    f"{record.id}: downloaded weights hash to {digest[:12]}…, the registry "
                    f"recorded {record.sha256[:12]}…; refusing to load them"
                )
            try:
                staging.rename(final)
            except OSError:  # another fetch of the same version won the race
                if not (final / WEIGHTS_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final

    def subscribe(self, callback: EventCallback) -> Subscription:
        return self.index.subscribe(callback)

    def health(self) -> dict[str, str]:
        """``ok`` or the reason per backend (for /readyz)."""
        status = {}
        for name, check in (("index", self.index.ping), ("store", self.blobs.ping)):
            try:
                check()
                status[name] = "ok"
            except RegistryError as e:
                status[name] = e.message
        return status

    # --- helpers ------------------------------------------------------------------------------
    def _announce(self, event: Event) -> None:
        try:
            self.index.publish(event)
        except Unavailable:
            # replicas resynchronise on reconnect ("reset"); the write itself stands
            log.warning("could not publish %s: index unreachable", event)

    def _forget_blob(self, uri: str) -> None:
        try:
            self.blobs.delete(uri)
        except RegistryError:
            log.warning("could not remove orphaned blob %s (it is not indexed)", uri)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
