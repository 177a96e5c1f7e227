"""The durable outbox of call records: a Redis Stream, with an on-disk spool behind it.

:meth:`Outbox.enqueue` stores a record *before* anything is sent to the CRM:

1. In Redis, atomically (one Lua script): ``SET outbox:seen:<key> NX PX ttl`` and, only
   if that set the key, ``XADD outbox * key .. record .. attempt 0 enq <ms> error ""``.
   Several instances tracking the same AMI feed therefore produce ONE entry per
   ``record_key``.
2. If Redis cannot be reached, in the local :class:`~router.records.spool.Spool` (one fsynced
   file per record). :meth:`Outbox.run_drainer` moves spooled records into the stream
   when Redis is back (idempotent thanks to the dedupe key; a crash between XADD and
   the file removal only yields a "duplicate" on the next drain).
3. If both fail: :class:`~router.errors.OutboxError` and a CRITICAL log line. A record
   is never dropped silently.

Durability across a Redis *crash* needs Redis persistence (``appendonly yes``); the
spool covers Redis being unreachable, not Redis losing its data.

Redis keyspace (all under the configured prefix, see :mod:`router.keys`):

- ``outbox`` stream, consumer group ``delivery`` (``OutboxSettings.group``): entries
  with fields ``key``, ``record`` (JSON), ``attempt``, ``enq`` (first enqueue, epoch
  ms), ``error`` (last error). Acked entries are XDEL'd, so XLEN is the backlog.
- ``outbox:retry`` sorted set: entries waiting for their next attempt, member = JSON
  of the fields above, score = due time (epoch ms).
- ``outbox:dead`` stream: failed records with ``reason``, ``attempt``, ``error``.
- ``outbox:sent`` stream (capped at ``sent_keep``): delivered records, for replay.
- ``outbox:seen:<key>`` / ``outbox:done:<key>`` / ``outbox:step:<step>:<key>``:
  enqueue dedupe, delivered marker and per-step markers, all with TTLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal, Protocol

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from router.crypto import KeyRing, keyring_from_settings
from router.errors import OutboxError
from router.keys import Keys
from router.keys import keys_from_settings as keys_from_settings  # router.app, admin use it
from router.metrics import RECORDS
from router.records.spool import Spool
from router.settings import OutboxSettings, Settings

log = logging.getLogger(__name__)

EnqueueResult = Literal["enqueued", "duplicate", "spooled"]

# KEYS[1] dedupe key, KEYS[2] stream; ARGV: ttl ms, record key, record JSON, enqueue ms
_ENQUEUE_LUA = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], '*', 'key', ARGV[2], 'record', ARGV[3],
                    'attempt', '0', 'enq', ARGV[4], 'error', '')
end
return false
"""


class SupportsModelDump(Protocol):
    """A pydantic model (such as ``ami.records.CallRecord``)."""

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...


Record = Mapping[str, Any] | SupportsModelDump


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds (the unit of every outbox timestamp)."""
    return int(time.time() * 1000)


def record_dict(record: Record) -> dict[str, Any]:
    """The JSON-able dict of a record (a mapping or a pydantic model)."""
    if isinstance(record, Mapping):
        return dict(record)
    return record.model_dump(mode="json")


def encode_record(record: Record, max_bytes: int) -> tuple[str, str]:
    """``(record_key, JSON)`` of a record; ValueError if it has no key or is too large."""
    data = record_dict(record)
    key = data.get("record_key")
    if not isinstance(key, str) or not key or len(key) > 512:
        raise ValueError("a call record needs a non-empty string record_key (<= 512 chars)")
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"call record {key} is not JSON-serialisable: {exc}") from exc
    if len(text.encode()) > max_bytes:
        raise ValueError(f"call record {key} is larger than {max_bytes} bytes")
    return key, text


def connect_redis(settings: Settings) -> Redis:
    """A Redis client for the outbox: fails fast (one quick retry), and a socket
    timeout longer than the XREADGROUP block time (the cache's timeout is too short)."""
    timeout = max(settings.outbox.redis_timeout_s, settings.outbox.poll_interval_s + 1.0)
    client: Redis = Redis.from_url(
        settings.redis.url,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=settings.redis.connect_timeout_s,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )
    return client


async def ensure_group(redis: Redis, keys: Keys, group: str) -> None:
    """Create the consumer group (reading from the start of the stream) if missing."""
    try:
        await redis.xgroup_create(keys.outbox_stream, group, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class Outbox:
    """Enqueues call records durably (Redis Stream, else spool, else OutboxError)."""

    def __init__(
        self, redis: Redis, keys: Keys, settings: OutboxSettings, spool: Spool,
        crypto: KeyRing | None = None,
    ) -> None:
        self.redis = redis
        #: encrypts the record field at rest (router.crypto); off without a key
        self.crypto = crypto or KeyRing()
        self.keys = keys
        self.settings = settings
        self.spool = spool
        self._enqueue = redis.register_script(_ENQUEUE_LUA)
        #: told of each spooled record once it entered the stream (first time only): what
        #: an "enqueued" answer tells the caller of :meth:`enqueue` (the pages' history)
        self.drained: list[Callable[[Mapping[str, Any]], Awaitable[object]]] = []

    @classmethod
    def from_settings(cls, settings: Settings, redis: Redis | None = None) -> Outbox:
        """Build from the config: outbox Redis client (see :func:`connect_redis`) and spool."""
        out = settings.outbox
        crypto = keyring_from_settings(settings)
        spool = Spool(
            settings.path(out.spool_dir),
            max_records=out.spool_max_records,
            max_bytes=out.spool_max_bytes,
            crypto=crypto,
        )
        return cls(redis or connect_redis(settings), keys_from_settings(settings), out, spool,
                   crypto)

    async def _to_redis(self, key: str, text: str, enq: int) -> bool:
        """XADD once per key; True if added, False if the key was already enqueued."""
        ttl = int(self.settings.dedupe_ttl_s * 1000)
        result = await self._enqueue(
            keys=[self.keys.outbox_dedupe(key), self.keys.outbox_stream],
            args=[ttl, key, text, enq],
        )
        return result is not None

    async def enqueue(self, record: Record) -> EnqueueResult:
        """Store ``record`` durably before delivery. Returns how it was stored.

        Raises ValueError for a record without ``record_key`` (a programming error) and
        :class:`OutboxError` when neither Redis nor the spool could take it.
        """
        key, text = encode_record(record, self.settings.max_record_bytes)
        try:
            added = await self._to_redis(key, self.crypto.seal(text, key), now_ms())
        except (RedisError, OSError) as exc:
            return await self._spool(key, json.loads(text), exc)
        RECORDS.labels("enqueued" if added else "duplicate").inc()
        return "enqueued" if added else "duplicate"

    async def _spool(self, key: str, data: dict[str, Any], cause: Exception) -> EnqueueResult:
        try:
            path = await asyncio.to_thread(self.spool.put, key, data)
        except OutboxError as exc:
            log.critical(
                "CALL RECORD %s NOT STORED: Redis failed (%s) and the spool failed (%s)",
                key, cause, exc,
            )
            raise OutboxError(f"record {key}: Redis ({cause}) and spool ({exc}) failed") from exc
        RECORDS.labels("spooled").inc()
        log.warning("Redis unavailable (%s): record %s spooled to %s", cause, key, path)
        return "spooled"

    async def drain_spool(self, batch: int = 200) -> int:
        """Move spooled records into the stream; return how many left the spool.

        Stops quietly at the first Redis failure (the rest waits for the next try).
        """
        moved = 0
        while True:
            items = await asyncio.to_thread(self.spool.items, batch)
            if not items:
                return moved
            for item in items:
                try:
                    key, text = encode_record(item.record, self.settings.max_record_bytes)
                    enq = int(item.path.name.split("-", 1)[0]) // 1_000_000
                except ValueError as exc:
                    log.error("spooled record %s cannot be enqueued: %s", item.path, exc)
                    await asyncio.to_thread(self.spool.quarantine, item.path, exc)
                    continue
                try:
                    added = await self._to_redis(key, self.crypto.seal(text, key), enq)
                except (RedisError, OSError) as exc:
                    log.info("spool drain paused, Redis still unavailable: %s", exc)
                    return moved
                await asyncio.to_thread(self.spool.remove, item.path)
                RECORDS.labels("enqueued" if added else "duplicate").inc()
                moved += 1
                if added:
                    await self._tell_drained(key, item.record)
            log.info("drained %d spooled record(s) into the outbox", moved)

    async def _tell_drained(self, key: str, record: Mapping[str, Any]) -> None:
        for listener in self.drained:
            try:
                await listener(record)
            except Exception as exc:  # a listener must not stop the drain
                log.warning("record %s drained from the spool, but a listener failed: %s",
                            key, exc)

    async def run_drainer(self, stop: asyncio.Event | None = None) -> None:
        """Background task: drain the spool every ``spool_drain_interval_s`` until stopped."""
        stop = stop or asyncio.Event()
        await asyncio.to_thread(self.spool.clean_tmp)
        while not stop.is_set():
            try:
                count, _ = await asyncio.to_thread(self.spool.usage)
                if count:
                    await self.drain_spool()
            except OutboxError as exc:
                log.error("spool drain failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.spool_drain_interval_s)

    async def aclose(self) -> None:
        """Close the Redis client."""
        await self.redis.aclose()
