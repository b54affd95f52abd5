"""Production index on Redis: a hash per adapter version, sets per tenant / user / language.

Keys (``ns`` defaults to ``flora:``; names are validated, so ``:`` never occurs in them)::

    {ns}tenants                      hash  tenant → created_at
    {ns}key:{sha256}                 str   tenant owning that API key
    {ns}seq:{tenant}:{name}          int   last version handed out (INCR: atomic, never reused)
    {ns}a:{tenant}:{name}:{version}  hash  record (JSON), user, language
    {ns}t:{tenant}                   set   "{name}:{version}" of every record of the tenant
    {ns}tn:{tenant}:{name}           set   … of one adapter name
    {ns}tu:{tenant}:{user}           set   … of one user
    {ns}tl:{tenant}:{language}       set   … of one language
    {ns}events                       pub/sub channel of JSON events

Multi-key writes run in MULTI/EXEC (or a Lua script where a check must be atomic with the write).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from adapter_registry.breaker import Breaker
from adapter_registry.errors import Conflict, NotFound, Unavailable
from adapter_registry.index.base import EventCallback, Index, Subscription, deliver
from adapter_registry.records import AdapterRecord, AdapterStatus, Event, Tenant
from adapter_registry.urls import hide_password

_DOWN = (redis.ConnectionError, redis.TimeoutError)
_CREATE_TENANT = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""
_ADD_KEY = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""
F = TypeVar("F", bound=Callable[..., Any])


def _available(method: F) -> F:
    """Turn "Redis is down" into :class:`Unavailable` (HTTP 503) with the URL to check, and
    fail fast while it is known to be down (:class:`~adapter_registry.breaker.Breaker`)."""

    @functools.wraps(method)
    def wrapper(self: RedisIndex, *args: Any, **kwargs: Any) -> Any:
        self.breaker.before()
        message = f"the adapter index (Redis at {self.safe_url}) is unreachable"
        try:
            result = method(self, *args, **kwargs)
        except redis.TimeoutError as e:  # hung: hold callers off rather than each wait it out
            self.breaker.failed(message)
            raise Unavailable(message) from e
        except redis.ConnectionError as e:  # refused: fails fast by itself, and a restarted
            self.breaker.succeeded()  # server must be used at once
            raise Unavailable(message) from e
        except BaseException:  # Redis answered (a conflict, a missing key): it is up
            self.breaker.succeeded()
            raise
        self.breaker.succeeded()
        return result

    return wrapper  # type: ignore[return-value]


class RedisIndex(Index):
    def __init__(self, url: str, *, namespace: str = "flora:", cooldown_s: float = 2.0):
        self.ns = namespace
        self.safe_url = hide_password(url)
        self.breaker = Breaker(cooldown_s)
        self.client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
            # a refused or dropped connection (a restart) is worth retrying at once; a timeout
            # (a hung server) is not: retrying it only multiplies the wait
            retry=Retry(
                ExponentialBackoff(cap=0.5, base=0.05), 3, supported_errors=(redis.ConnectionError,)
            ),
            health_check_interval=15,
        )
        # pub/sub on its own client that never reconnects behind the subscription's back: a
        # silent reconnect would re-subscribe without the "reset" that says events were missed
        self.events_client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=15,
        )
        self._create_tenant = self.client.register_script(_CREATE_TENANT)
        self._add_key = self.client.register_script(_ADD_KEY)

    def _adapter_key(self, tenant: str, name: str, version: int) -> str:
        return f"{self.ns}a:{tenant}:{name}:{version}"

    def _sets(self, record: AdapterRecord) -> list[str]:
        t = record.tenant
        sets = [f"{self.ns}t:{t}", f"{self.ns}tn:{t}:{record.name}"]
        if record.user is not None:
            sets.append(f"{self.ns}tu:{t}:{record.user}")
        if record.language is not None:
            sets.append(f"{self.ns}tl:{t}:{record.language}")
        return sets

    # --- tenants and keys -------------------------------------------------------------------
    @_available
    def create_tenant(self, tenant: Tenant, key_hash: str) -> None:
        keys = [f"{self.ns}tenants", f"{self.ns}key:{key_hash}"]
        if not self._create_tenant(keys=keys, args=[tenant.name, repr(tenant.created_at)]):
            raise Conflict(f"tenant {tenant.name!r} already exists")

    @_available
    def add_key(self, tenant: str, key_hash: str) -> None:
        keys = [f"{self.ns}tenants", f"{self.ns}key:{key_hash}"]
        if not self._add_key(keys=keys, args=[tenant]):
            raise NotFound(f"no tenant {tenant!r}")

    @_available
    def get_tenant(self, name: str) -> Tenant | None:
        created = self.client.hget(f"{self.ns}tenants", name)
        return None if created is None else Tenant(name=name, created_at=float(created))

    @_available
    def list_tenants(self) -> list[Tenant]:
        found = self.client.hgetall(f"{self.ns}tenants")
        return [Tenant(name=n, created_at=float(t)) for n, t in sorted(found.items())]

    @_available
    def tenant_for_key(self, key_hash: str) -> str | None:
        return self.client.get(f"{self.ns}key:{key_hash}")

    # --- adapters ---------------------------------------------------------------------------
    @_available
    def next_version(self, tenant: str, name: str) -> int:
        return int(self.client.incr(f"{self.ns}seq:{tenant}:{name}"))

    @_available
    def put(self, record: AdapterRecord) -> None:
        member = f"{record.name}:{record.version}"
        with self.client.pipeline(transaction=True) as tx:
            tx.hset(
                self._adapter_key(record.tenant, record.name, record.version),
                mapping={
                    "record": record.model_dump_json(),
                    "user": record.user or "",
                    "language": record.language or "",
                },
            )
            for key in self._sets(record):
                tx.sadd(key, member)
            tx.execute()

    @_available
    def get(self, tenant: str, name: str, version: int) -> AdapterRecord | None:
        text = self.client.hget(self._adapter_key(tenant, name, version), "record")
        return None if text is None else AdapterRecord.model_validate_json(text)

    @_available
    def list(
        self,
        tenant: str,
        *,
        name: str | None = None,
        user: str | None = None,
        language: str | None = None,
    ) -> list[AdapterRecord]:
        sets = [f"{self.ns}t:{tenant}"]
        for prefix, value in (("tn", name), ("tu", user), ("tl", language)):
            if value is not None:
                sets.append(f"{self.ns}{prefix}:{tenant}:{value}")
        members = self.client.sinter(sets)
        with self.client.pipeline(transaction=False) as pipe:
            for member in members:
                n, _, v = member.rpartition(":")
                pipe.hget(self._adapter_key(tenant, n, int(v)), "record")
            texts = pipe.execute()
        records = [AdapterRecord.model_validate_json(t) for t in texts if t is not None]
        return sorted(records, key=lambda r: (-r.version, r.name))

    @_available
    def set_status(self, tenant: str, name: str, version: int, status: AdapterStatus) -> None:
        key = self._adapter_key(tenant, name, version)

        def update(tx: redis.client.Pipeline) -> None:
            text = tx.hget(key, "record")
            if text is None:
                return
            record = AdapterRecord.model_validate_json(text).model_copy(update={"status": status})
            tx.multi()
            tx.hset(key, "record", record.model_dump_json())

        self.client.transaction(update, key)

    @_available
    def remove(self, tenant: str, name: str, version: int) -> None:
        record = self.get(tenant, name, version)
        if record is None:
            return
        member = f"{name}:{version}"
        with self.client.pipeline(transaction=True) as tx:
            tx.delete(self._adapter_key(tenant, name, version))
            for key in self._sets(record):
                tx.srem(key, member)
            tx.execute()

    # --- events -------------------------------------------------------------------------------
    @_available
    def publish(self, event: Event) -> None:
        self.client.publish(f"{self.ns}events", event.model_dump_json())

    def subscribe(self, callback: EventCallback) -> Subscription:
        return _RedisSubscription(self, callback)

    @_available
    def ping(self) -> None:
        self.client.ping()

    def close(self) -> None:
        self.client.close()
        self.events_client.close()


class _RedisSubscription(Subscription):
    """Pub/sub in a thread that reconnects forever, announcing each reconnect as ``reset``."""

    def __init__(self, index: RedisIndex, callback: EventCallback):
        self._index, self._callback = index, callback
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flora-redis-events", daemon=True)
        self._thread.start()
        self._ready.wait(timeout=5)  # subscribed (or failing): events from now on are seen

    def _run(self) -> None:
        connected_before = False
        while not self._stop.is_set():
            try:
                pubsub = self._index.events_client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(f"{self._index.ns}events")
                if connected_before:
                    deliver(self._callback, Event(type="reset"))
                connected_before = True
                self._ready.set()
                with pubsub:
                    while not self._stop.is_set():
                        message = pubsub.get_message(timeout=0.5)
                        if message and message["type"] == "message":
                            deliver(self._callback, Event.model_validate_json(message["data"]))
            except _DOWN:
                self._ready.set()
                self._stop.wait(0.5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
