"""Embedded index: one SQLite file, so a fresh machine needs no server.

Safe across threads and processes (WAL, a connection per call, ``BEGIN IMMEDIATE`` where order
matters). Events are rows that subscribers poll, which also works across processes — the Serve
demo's replicas run in their own Ray workers.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from adapter_registry.errors import Conflict, NotFound, Unavailable
from adapter_registry.index.base import EventCallback, Index, Subscription, deliver
from adapter_registry.records import AdapterRecord, AdapterStatus, Event, Tenant

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (hash TEXT PRIMARY KEY, tenant TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    tenant TEXT NOT NULL, name TEXT NOT NULL, last INTEGER NOT NULL, PRIMARY KEY (tenant, name));
CREATE TABLE IF NOT EXISTS adapters (
    tenant TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
    user TEXT, language TEXT, record TEXT NOT NULL, PRIMARY KEY (tenant, name, version));
CREATE INDEX IF NOT EXISTS adapters_by_language ON adapters (tenant, language);
CREATE INDEX IF NOT EXISTS adapters_by_user ON adapters (tenant, user);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
"""
_KEEP_EVENTS = 10_000
POLL_SECONDS = 0.2


class SqliteIndex(Index):
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"cannot create the index directory {self.path.parent}: {e}") from e
        with self._usable(), closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as e:
            raise Unavailable(f"cannot open the index at {self.path}: {e}") from e

    @contextmanager
    def _usable(self) -> Iterator[None]:
        """The file failing (locked past the timeout, I/O, not a database) is :class:`Unavailable`
        (HTTP 503) like a Redis outage; other sqlite3 errors are bugs and stay as they are."""
        try:
            yield
        except sqlite3.Error as e:
            if not isinstance(e, sqlite3.OperationalError) and type(e) is not sqlite3.DatabaseError:
                raise
            raise Unavailable(f"the adapter index at {self.path} is unusable: {e}") from e

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no upgrade deadlocks)."""
        with self._usable(), closing(self._connect()) as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):  # may already be rolled back
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._usable(), closing(self._connect()) as db:
            return db.execute(sql, args).fetchall()

    # --- tenants and keys -------------------------------------------------------------------
    def create_tenant(self, tenant: Tenant, key_hash: str) -> None:
        with self._tx() as db:
            try:
                db.execute("INSERT INTO tenants VALUES (?, ?)", (tenant.name, tenant.created_at))
            except sqlite3.IntegrityError as e:
                raise Conflict(f"tenant {tenant.name!r} already exists") from e
            db.execute("INSERT INTO api_keys VALUES (?, ?)", (key_hash, tenant.name))

    def add_key(self, tenant: str, key_hash: str) -> None:
        with self._tx() as db:
            if not db.execute("SELECT 1 FROM tenants WHERE name = ?", (tenant,)).fetchone():
                raise NotFound(f"no tenant {tenant!r}")
            db.execute("INSERT INTO api_keys VALUES (?, ?)", (key_hash, tenant))

    def get_tenant(self, name: str) -> Tenant | None:
        rows = self._query("SELECT name, created_at FROM tenants WHERE name = ?", (name,))
        return Tenant(name=rows[0][0], created_at=rows[0][1]) if rows else None

    def list_tenants(self) -> list[Tenant]:
        rows = self._query("SELECT name, created_at FROM tenants ORDER BY name")
        return [Tenant(name=n, created_at=t) for n, t in rows]

    def tenant_for_key(self, key_hash: str) -> str | None:
        rows = self._query("SELECT tenant FROM api_keys WHERE hash = ?", (key_hash,))
        return rows[0][0] if rows else None

    # --- adapters ---------------------------------------------------------------------------
    def next_version(self, tenant: str, name: str) -> int:
        with self._tx() as db:
            (version,) = db.execute(
                "INSERT INTO versions VALUES (?, ?, 1) ON CONFLICT (tenant, name) "
                "DO UPDATE SET last = last + 1 RETURNING last",
                (tenant, name),
            ).fetchone()
        return int(version)

    def put(self, record: AdapterRecord) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.tenant,
                    record.name,
                    record.version,
                    record.user,
                    record.language,
                    record.model_dump_json(),
                ),
            )

    def get(self, tenant: str, name: str, version: int) -> AdapterRecord | None:
        rows = self._query(
            "SELECT record FROM adapters WHERE tenant = ? AND name = ? AND version = ?",
            (tenant, name, version),
        )
        return AdapterRecord.model_validate_json(rows[0][0]) if rows else None

    def list(
        self,
        tenant: str,
        *,
        name: str | None = None,
        user: str | None = None,
        language: str | None = None,
    ) -> list[AdapterRecord]:
        sql, args = "SELECT record FROM adapters WHERE tenant = ?", [tenant]
        for column, value in (("name", name), ("user", user), ("language", language)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        rows = self._query(sql + " ORDER BY version DESC, name", tuple(args))
        return [AdapterRecord.model_validate_json(r[0]) for r in rows]

    def set_status(self, tenant: str, name: str, version: int, status: AdapterStatus) -> None:
        with self._tx() as db:
            row = db.execute(
                "SELECT record FROM adapters WHERE tenant = ? AND name = ? AND version = ?",
                (tenant, name, version),
            ).fetchone()
            if row is None:
                return
            record = AdapterRecord.model_validate_json(row[0]).model_copy(update={"status": status})
            db.execute(
                "UPDATE adapters SET record = ? WHERE tenant = ? AND name = ? AND version = ?",
                (record.model_dump_json(), tenant, name, version),
            )

    def remove(self, tenant: str, name: str, version: int) -> None:
        with self._tx() as db:
            db.execute(
                "DELETE FROM adapters WHERE tenant = ? AND name = ? AND version = ?",
                (tenant, name, version),
            )

    # --- events -------------------------------------------------------------------------------
    def publish(self, event: Event) -> None:
        with self._tx() as db:
            (last,) = db.execute(
                "INSERT INTO events (event) VALUES (?) RETURNING id", (event.model_dump_json(),)
            ).fetchone()
            db.execute("DELETE FROM events WHERE id <= ?", (last - _KEEP_EVENTS,))

    def subscribe(self, callback: EventCallback) -> Subscription:
        (start,) = self._query("SELECT COALESCE(MAX(id), 0) FROM events")[0]
        return _PollingSubscription(self, callback, start)

    def ping(self) -> None:
        self._query("SELECT COUNT(*) FROM sqlite_master")  # reads the file: "SELECT 1" does not


class _PollingSubscription(Subscription):
    def __init__(self, index: SqliteIndex, callback: EventCallback, start: int):
        self._index, self._callback, self._last = index, callback, start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flora-index-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                rows = self._index._query(
                    "SELECT id, event FROM events WHERE id > ? ORDER BY id", (self._last,)
                )
            except (sqlite3.Error, Unavailable):
                time.sleep(1)
                continue
            if rows and rows[0][0] > self._last + 1 and self._last:
                deliver(self._callback, Event(type="reset"))  # pruned past us: we missed some
            for event_id, text in rows:
                self._last = event_id
                deliver(self._callback, Event.model_validate_json(text))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
