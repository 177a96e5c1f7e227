"""The two-level customer cache: a bounded in-process LRU and Redis shared by every instance.

Each entry is one lookup answer (a customer, or "no such customer") with the wall-clock
time it was fetched from the CRM. Whether it is fresh or stale is decided by the reader
from that time and the TTLs in :class:`~router.settings.CacheSettings`, so every instance
agrees. An entry may be served until ``ttl + stale_max_age_s`` after it was fetched
(stale-while-revalidate and stale-if-error); the Redis key expires at exactly that time.

Redis keyspace (see :class:`~router.keys.Keys`; numbers only as keyed hashes)::

    <prefix>cust:<hash>         STRING  envelope JSON, TTL = ttl + stale_max_age_s
    <prefix>custidx:<id>        SET     hashes cached for CRM customer <id>, same TTL
    <prefix>cache:events        pub/sub channel: invalidations, webhook records and sync
                                pages are announced there, so other instances drop their
                                LRU copies (router.lookup.cachefeed)

The value is a versioned JSON envelope ``{"v": 1, "t": <fetched epoch s>, "c": <Customer
JSON or null>}``; anything else (garbage, another version, a record that does not validate)
reads as a miss and counts ``callroute_cache_errors{kind="corrupt"}``.

Redis trouble never reaches the caller: every failure is logged, counted
(``callroute_cache_errors{kind}``) and read as a miss; after a failure Redis is skipped for
``RedisSettings.down_backoff_s`` (calls cost nothing), then the next operation probes it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from typing import NamedTuple

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from router.crypto import KeyRing
from router.errors import CacheError, CryptoError
from router.keys import Keys
from router.log import detached
from router.lookup.cachefeed import InvalidationFeed, customer_message, number_message
from router.metrics import CACHE_ERRORS
from router.models import Customer
from router.settings import CacheSettings, RedisSettings

log = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
#: Largest envelope we accept from Redis (a customer record is a few hundred bytes).
MAX_ENVELOPE_BYTES = 64 * 1024

Clock = Callable[[], float]


class CacheEntry(NamedTuple):
    """One cached lookup answer: ``customer`` None means "the CRM knows no such caller"."""

    customer: Customer | None
    fetched_at: float

    @property
    def found(self) -> bool:
        """True for a positive answer."""
        return self.customer is not None

    def age(self, now: float) -> float:
        """Seconds since the CRM gave this answer (never negative)."""
        return max(0.0, now - self.fetched_at)


def encode_entry(entry: CacheEntry) -> bytes:
    """The versioned JSON envelope stored in Redis."""
    customer = entry.customer.model_dump(mode="json") if entry.customer is not None else None
    doc = {"v": ENVELOPE_VERSION, "t": entry.fetched_at, "c": customer}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_entry(raw: bytes | str) -> CacheEntry | None:
    """Read an envelope; None when it is corrupt, too large or of another version."""
    if len(raw) > MAX_ENVELOPE_BYTES:
        return None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("v") != ENVELOPE_VERSION:
        return None
    fetched = doc.get("t")
    if not isinstance(fetched, int | float) or isinstance(fetched, bool):
        return None
    body = doc.get("c")
    if body is None:
        return CacheEntry(None, float(fetched))
    try:
        return CacheEntry(Customer.model_validate(body), float(fetched))
    except ValidationError:
        return None


class CachePolicy:
    """TTL arithmetic shared by readers and writers."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings

    def ttl(self, entry: CacheEntry) -> float:
        """How long after fetching the entry is fresh."""
        s = self.settings
        return s.positive_ttl_s if entry.found else s.negative_ttl_s

    def fresh(self, entry: CacheEntry, now: float) -> bool:
        """Within its TTL."""
        return entry.age(now) < self.ttl(entry)

    def usable(self, entry: CacheEntry, now: float) -> bool:
        """Still servable (fresh, or stale within ``stale_max_age_s`` past its TTL)."""
        return entry.age(now) < self.ttl(entry) + self.settings.stale_max_age_s

    def redis_ttl(self, entry: CacheEntry, now: float) -> float:
        """Seconds the Redis key should live from ``now``."""
        return self.ttl(entry) + self.settings.stale_max_age_s - entry.age(now)


class LruCache:
    """A bounded in-process map from E.164 number to entry, least recently used out first.

    Each slot remembers when it was stored (monotonic) so a reader can tell how long the
    entry went without being checked against Redis. Slots are plain tuples of the entry's
    fields: the cyclic garbage collector stops tracking a plain tuple of atoms (a "no
    such caller" slot), and its full passes pause the event loop in proportion to the
    objects it tracks; the LRU holds tens of thousands. A second map, customer id -> numbers,
    makes invalidation by customer id cheap.
    """

    def __init__(self, size: int, hasher: Callable[[str], str] | None = None) -> None:
        self.size = size
        #: number -> (customer, fetched_at, stored_at)
        self._data: OrderedDict[str, tuple[Customer | None, float, float]] = OrderedDict()
        self._by_customer: dict[str, set[str]] = {}
        #: keyed hash -> number, for invalidations that name hashes (None: no such index)
        self._hasher = hasher
        self._by_hash: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._data)

    def get(self, e164: str) -> tuple[CacheEntry, float] | None:
        """The entry and its monotonic store time, or None."""
        slot = self._data.get(e164)
        if slot is None:
            return None
        self._data.move_to_end(e164)
        return CacheEntry(slot[0], slot[1]), slot[2]

    def peek(self, e164: str) -> tuple[CacheEntry, float] | None:
        """As :meth:`get`, without marking the entry used (a read that changes nothing)."""
        slot = self._data.get(e164)
        return None if slot is None else (CacheEntry(slot[0], slot[1]), slot[2])

    def put(self, e164: str, entry: CacheEntry) -> None:
        """Store (or replace) the entry for ``e164``, evicting the oldest over the bound."""
        if self.size <= 0:
            return
        self.discard(e164)
        self._data[e164] = (entry.customer, entry.fetched_at, time.monotonic())
        if self._hasher is not None:
            self._by_hash[self._hasher(e164)] = e164
        if entry.customer is not None:
            self._by_customer.setdefault(entry.customer.id, set()).add(e164)
        while len(self._data) > self.size:
            oldest = next(iter(self._data))
            self.discard(oldest)

    def discard(self, e164: str) -> None:
        """Forget ``e164`` if present."""
        slot = self._data.pop(e164, None)
        if slot is not None and self._hasher is not None:
            self._by_hash.pop(self._hasher(e164), None)
        if slot is None or slot[0] is None:
            return
        cid = slot[0].id
        numbers = self._by_customer.get(cid)
        if numbers is not None:
            numbers.discard(e164)
            if not numbers:
                del self._by_customer[cid]

    def discard_customer(self, customer_id: str) -> list[str]:
        """Forget every number cached for ``customer_id``; returns them."""
        numbers = list(self._by_customer.get(customer_id, ()))
        for e164 in numbers:
            self.discard(e164)
        return numbers

    def discard_hashes(self, hashes: Iterable[str]) -> int:
        """Forget the numbers with these keyed hashes; returns how many were held."""
        dropped = 0
        for number_hash in hashes:
            e164 = self._by_hash.get(number_hash)
            if e164 is not None:
                self.discard(e164)
                dropped += 1
        return dropped

    def clear(self) -> None:
        """Forget everything."""
        self._data.clear()
        self._by_customer.clear()
        self._by_hash.clear()


def redis_client(settings: RedisSettings) -> aioredis.Redis:
    """A redis-py client with short socket timeouts and no client-side retries.

    A down Redis must cost a call at most one socket timeout, so retries are off; the
    cache's back-off window does the reconnecting (redis-py reconnects on the next use).
    The pool is bounded (``max_connections``): a burst of calls waits for a connection
    instead of opening hundreds at once (each connect costs the event loop ~1 ms).
    Other users of Redis (the outbox) may want their own client with longer timeouts.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url,
        max_connections=settings.max_connections,
        timeout=settings.connect_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        retry=Retry(NoBackoff(), 0),
        # no CLIENT SETINFO: saves a round trip per new connection, and redis-py would
        # read its package metadata from disk, blocking the loop, for each one
        driver_info=None,
    )
    return aioredis.Redis.from_pool(pool)


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, RedisTimeoutError | asyncio.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionError | OSError) or "Connection" in type(exc).__name__:
        return "connection"
    return "error"


def _pool_exhausted(exc: BaseException) -> bool:
    """redis-py's BlockingConnectionPool found no free connection in time."""
    return isinstance(exc, RedisConnectionError) and "No connection available" in str(exc)


def _of_customer(entry: CacheEntry, customer_id: str) -> bool:
    return entry.customer is not None and entry.customer.id == customer_id


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisHealth:
    """Tracks whether Redis is usable: after a failure, skip it for a back-off window."""

    def __init__(self, backoff_s: float) -> None:
        self.backoff_s = backoff_s
        self._down_until = 0.0
        self.down = False

    def available(self) -> bool:
        """False inside the back-off window after a failure."""
        return time.monotonic() >= self._down_until

    def failed(self, op: str, exc: BaseException) -> None:
        """Record a failure: metric, one log line per outage (then debug), back off."""
        kind = _error_kind(exc)
        CACHE_ERRORS.labels(kind=kind).inc()
        if not self.down:
            log.warning("redis %s failed (%s: %s); serving without Redis for now",
                        op, kind, exc or type(exc).__name__)
        else:
            log.debug("redis %s failed again (%s)", op, kind)
        self.down = True
        self._down_until = time.monotonic() + self.backoff_s

    def ok(self) -> None:
        """Record a success (logs the recovery once)."""
        if self.down:
            log.info("redis is answering again; cache back to two levels")
            self.down = False


ReadOutcome = tuple[bool, bytes | str | None]

#: Most keys in one coalesced MGET.
MAX_BATCH = 256


class ReadBatcher:
    """Coalesces concurrent GETs into one MGET per event-loop tick.

    Each caller awaits a future resolved to ``(ok, raw)``; a Redis failure resolves every
    waiter of the batch to ``(False, None)`` and is recorded once in :class:`RedisHealth`.
    Batch tasks are kept referenced until done. A waiter cancelled by its deadline just
    stops waiting.
    """

    def __init__(self, redis: aioredis.Redis, health: RedisHealth) -> None:
        self.redis = redis
        self.health = health
        self._pending: dict[str, list[asyncio.Future[ReadOutcome]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: str) -> ReadOutcome:
        """The raw value of ``key`` (None when missing), or ``(False, None)`` on failure."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ReadOutcome] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.setdefault(key, []).append(future)
        if len(self._pending) >= MAX_BATCH:
            self._flush()
        return await future

    def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        # one read for many calls: in no call's context (log lines carry no call id)
        task = asyncio.get_running_loop().create_task(self._run(batch), context=detached())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[str, list[asyncio.Future[ReadOutcome]]]) -> None:
        keys = list(batch)
        outcomes: list[ReadOutcome]
        try:
            values = await self.redis.mget(keys)
        except (TimeoutError, RedisError, OSError) as exc:
            if _pool_exhausted(exc):
                # every pooled connection busy: local congestion, Redis itself is fine
                CACHE_ERRORS.labels(kind="pool").inc()
            else:
                self.health.failed("get", exc)
            outcomes = [(False, None)] * len(keys)
        except asyncio.CancelledError:
            self._resolve(batch, [(False, None)] * len(keys))
            raise
        else:
            self.health.ok()
            outcomes = [(True, v) for v in values]
        self._resolve(batch, outcomes)

    @staticmethod
    def _resolve(
        batch: dict[str, list[asyncio.Future[ReadOutcome]]], outcomes: list[ReadOutcome]
    ) -> None:
        for futures, outcome in zip(batch.values(), outcomes, strict=True):
            for future in futures:
                if not future.done():
                    future.set_result(outcome)

    async def aclose(self) -> None:
        """Let running batches finish (they are bounded by the socket timeout)."""
        self._flush()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)


#: How long the first queued write waits for others before its pipeline is sent. Writes
#: have no waiter (the LRU already holds the entry): another instance sees the entry up
#: to this much later, which costs nothing, and a pipeline carries ~10 entries at 500
#: misses/s instead of one (a pipeline costs the loop ~0.1 ms, an entry in it ~0.01 ms).
WRITE_LINGER_S = 0.02
#: Pipelines of queued writes on the wire at once; beyond, writes wait in the queue.
MAX_WRITES_INFLIGHT = 4
#: Most writes queued; beyond, a write is dropped (counted): Redis is not keeping up, and
#: the entry is still served from this instance's LRU.
MAX_QUEUED_WRITES = 4 * MAX_BATCH

PutBatch = list[tuple[str, "CacheEntry"]]


class WriteBehind:
    """Queues the call path's cache writes and sends them in one pipeline per linger.

    The caller does not wait on Redis: :meth:`add` returns at once, the first write of a
    batch arms one timer (``WRITE_LINGER_S``), and the batch goes out as a pipeline
    (``send``, which records failures in :class:`RedisHealth` and never raises). A newer
    write of a queued number replaces the older one. At most ``MAX_WRITES_INFLIGHT``
    pipelines run at once and ``MAX_QUEUED_WRITES`` wait; a write beyond that is dropped
    and counted (``callroute_cache_errors{kind="dropped"}``): the entry is still in this
    instance's LRU. :meth:`pending` tells a reader that Redis does not have an entry *yet*.
    """

    def __init__(self, send: Callable[[PutBatch], Coroutine[None, None, object]]) -> None:
        self._send = send
        self._queue: dict[str, CacheEntry] = {}
        self._sending: dict[asyncio.Task[object], PutBatch] = {}
        self._armed: asyncio.TimerHandle | None = None

    @property
    def queued(self) -> int:
        """Writes waiting for a pipeline."""
        return len(self._queue)

    def pending(self, e164: str) -> bool:
        """Whether a write of ``e164`` is queued or on the wire (not in Redis yet)."""
        if e164 in self._queue:
            return True
        return any(e164 == n for batch in self._sending.values() for n, _ in batch)

    def cancel(self, drop: Callable[[str, CacheEntry], bool]) -> int:
        """Forget the queued writes ``drop`` says are outdated (an invalidation or a newer
        record arrived meanwhile: the older answer must not overwrite it in Redis)."""
        outdated = [e164 for e164, entry in self._queue.items() if drop(e164, entry)]
        for e164 in outdated:
            del self._queue[e164]
        return len(outdated)

    def add(self, e164: str, entry: CacheEntry) -> None:
        """Queue one write (never blocks, never raises)."""
        if len(self._queue) >= MAX_QUEUED_WRITES and e164 not in self._queue:
            CACHE_ERRORS.labels(kind="dropped").inc()
            log.debug("cache write queue full; dropping a write")
            return
        self._queue[e164] = entry
        if len(self._queue) >= MAX_BATCH:
            self._flush()
        elif self._armed is None:
            self._armed = asyncio.get_running_loop().call_later(WRITE_LINGER_S, self._flush)

    def _flush(self) -> None:
        if self._armed is not None:
            self._armed.cancel()
            self._armed = None
        if not self._queue or len(self._sending) >= MAX_WRITES_INFLIGHT:
            return  # nothing to do, or Redis is slow: the next pipeline done sends these
        batch = list(self._queue.items())[:MAX_BATCH]
        for e164, _ in batch:
            del self._queue[e164]
        task = asyncio.get_running_loop().create_task(self._send(batch), context=detached())
        self._sending[task] = batch
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[object]) -> None:
        del self._sending[task]
        if self._queue and self._armed is None:
            self._flush()

    async def drain(self, timeout_s: float = 1.0) -> None:
        """Send everything queued now and wait (bounded) for the pipelines."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._queue or self._sending:
            self._flush()
            remaining = deadline - loop.time()
            if remaining <= 0 or not self._sending:
                return
            await asyncio.wait(set(self._sending), timeout=remaining)


class TwoLevelCache:
    """LRU in front of Redis. Reads never raise; writes raise only when ``strict``.

    ``clock`` is wall-clock time (entries are compared across instances).
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        settings: CacheSettings,
        *,
        down_backoff_s: float = 1.0,
        clock: Clock = time.time,
        crypto: KeyRing | None = None,
    ) -> None:
        self.redis = redis
        #: encrypts values at rest (router.crypto); without a key: plain JSON
        self.crypto = crypto or KeyRing()
        self.keys = keys
        self.settings = settings
        self.policy = CachePolicy(settings)
        self.lru = LruCache(settings.lru_size, hasher=keys.number_hash)
        self.health = RedisHealth(down_backoff_s)
        self.reads = ReadBatcher(redis, self.health)
        self.writes = WriteBehind(
            lambda batch: self._redis_put(batch, strict=False, announce=False))
        self.clock = clock
        self.feed = InvalidationFeed(redis, keys.cache_events, self._drop_hashes,
                                     self._drop_customer)

    def _drop_hashes(self, hashes: Iterable[str]) -> int:
        """Another instance changed these numbers: drop our copies and queued writes."""
        wanted = set(hashes)
        self.writes.cancel(lambda e164, _entry: self.keys.number_hash(e164) in wanted)
        return self.lru.discard_hashes(wanted)

    def _drop_customer(self, customer_id: str) -> int:
        """Another instance changed a customer: drop its numbers and queued writes."""
        self.writes.cancel(lambda _e164, entry: _of_customer(entry, customer_id))
        return len(self.lru.discard_customer(customer_id))

    def trusted(self, stored_at: float) -> bool:
        """Whether an LRU slot stored at ``stored_at`` (monotonic) may be served without
        re-reading Redis: for ``lru_trust_s`` when the invalidation feed covers it, else
        for ``lru_recheck_s`` (see :mod:`router.lookup.cachefeed`)."""
        age = time.monotonic() - stored_at
        if self.feed.covers(stored_at):
            return age < self.settings.lru_trust_s
        return age < self.settings.lru_recheck_s

    # --- reads ---------------------------------------------------------------------------
    def get_local(self, e164: str) -> tuple[CacheEntry, float] | None:
        """The LRU slot (entry, monotonic store time) for ``e164``; no I/O."""
        return self.lru.get(e164)

    async def get_shared(self, e164: str) -> tuple[bool, CacheEntry | None]:
        """``(ok, entry)`` from Redis: ok is False when Redis was skipped or failed;
        entry is None on a miss or a corrupt value.

        Concurrent reads are coalesced into one ``MGET`` per event-loop tick (see
        :class:`ReadBatcher`), so a burst of calls costs Redis and the loop one command.
        """
        if not self.health.available():
            return False, None
        key = self.keys.customer(e164)
        ok, raw = await self.reads.get(key)
        if not ok or raw is None:
            return ok, None
        try:
            entry = decode_entry(self.crypto.open_bytes(
                raw if isinstance(raw, bytes) else raw.encode(), key.encode()))
            why = ""
        except CryptoError as exc:
            entry, why = None, f" ({exc})"
        if entry is None:
            CACHE_ERRORS.labels(kind="corrupt").inc()
            log.warning("unreadable cache value under %s%s; treated as a miss", key, why)
        return True, entry

    # --- writes --------------------------------------------------------------------------
    async def put(
        self, e164: str, entry: CacheEntry, *, strict: bool = False, announce: bool = True
    ) -> None:
        """Store in both levels (Redis: value, TTL and the customer index).

        ``announce``: tell the other instances to drop their LRU copy (a webhook's new
        record, a sync page). The call path's own CRM answers pass False: they are no
        news to the others, whose copies are still within their own TTL (and every
        instance, this one too, would have to read the message)."""
        self.lru.put(e164, entry)
        await self._redis_put([(e164, entry)], strict=strict, announce=announce)

    def put_behind(self, e164: str, entry: CacheEntry) -> None:
        """Store in the LRU now and in Redis soon, unannounced (:class:`WriteBehind`): the
        call path's own CRM answers, which no caller should wait on Redis for."""
        self.lru.put(e164, entry)
        self.writes.add(e164, entry)

    async def put_many(
        self, items: Iterable[tuple[str, CacheEntry]], *, strict: bool = False
    ) -> None:
        """Store several entries with one Redis round trip, announced to the others."""
        batch = list(items)
        numbers = {e164 for e164, _ in batch}
        self.writes.cancel(lambda e164, _entry: e164 in numbers)
        for e164, entry in batch:
            self.lru.put(e164, entry)
        await self._redis_put(batch, strict=strict)

    async def _redis_put(
        self, batch: list[tuple[str, CacheEntry]], *, strict: bool, announce: bool = True
    ) -> None:
        if not batch or (not strict and not self.health.available()):
            return
        now = self.clock()
        pipe = self.redis.pipeline(transaction=False)
        hashes: list[str] = []
        for e164, entry in batch:
            ttl_ms = int(self.policy.redis_ttl(entry, now) * 1000)
            if ttl_ms <= 0:
                continue
            hashes.append(self.keys.number_hash(e164))
            key = self.keys.customer_by_hash(hashes[-1])
            pipe.set(key, self.crypto.seal_bytes(encode_entry(entry), key.encode()), px=ttl_ms)
            if entry.customer is not None:
                index = self.keys.customer_index(entry.customer.id)
                pipe.sadd(index, hashes[-1])
                # the index lives as long as its longest-lived member
                pipe.pexpire(index, ttl_ms, nx=True)
                pipe.pexpire(index, ttl_ms, gt=True)
        if not hashes:
            return
        if announce:
            pipe.publish(self.keys.cache_events, number_message(self.feed.sender, hashes))
        await self._run(pipe, "set", strict=strict)

    async def invalidate_numbers(self, numbers: Iterable[str], *, strict: bool = False) -> int:
        """Forget the entries of these E.164 numbers in both levels; returns how many."""
        numbers = list(numbers)
        dropped = set(numbers)
        self.writes.cancel(lambda e164, _entry: e164 in dropped)
        for e164 in numbers:
            self.lru.discard(e164)
        if not numbers:
            return 0
        if not strict and not self.health.available():
            return 0
        hashes = [self.keys.number_hash(n) for n in numbers]
        pipe = self.redis.pipeline(transaction=False)
        pipe.delete(*(self.keys.customer_by_hash(h) for h in hashes))
        pipe.publish(self.keys.cache_events, number_message(self.feed.sender, hashes))
        result = await self._run(pipe, "delete", strict=strict)
        return int(str(result[0])) if result else 0

    async def invalidate_customer(self, customer_id: str, *, strict: bool = False) -> int:
        """Forget every number cached for a CRM customer id (LRU map and Redis index)."""
        self.lru.discard_customer(customer_id)
        self.writes.cancel(lambda _e164, entry: _of_customer(entry, customer_id))
        if not strict and not self.health.available():
            return 0
        index = self.keys.customer_index(customer_id)
        try:
            hashes = await self.redis.smembers(index)
            keys = [self.keys.customer_by_hash(_text(h)) for h in hashes]
            removed = int(await self.redis.delete(*keys)) if keys else 0
            await self.redis.delete(index)
            await self.redis.publish(self.keys.cache_events,
                                     customer_message(self.feed.sender, customer_id))
        except (TimeoutError, RedisError, OSError) as exc:
            self.health.failed("invalidate", exc)
            if strict:
                raise CacheError(f"redis invalidate failed: {exc}") from exc
            return 0
        self.health.ok()
        return removed

    async def _run(
        self, pipe: aioredis.client.Pipeline, op: str, *, strict: bool
    ) -> list[object] | None:
        try:
            result: list[object] = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            self.health.failed(op, exc)
            if strict:
                raise CacheError(f"redis {op} failed: {exc}") from exc
            return None
        self.health.ok()
        return result

    async def aclose(self) -> None:
        """Stop the feed, finish pending reads and writes, and close the Redis client."""
        await self.feed.aclose()
        await self.reads.aclose()
        await self.writes.drain()
        await self.redis.aclose()
