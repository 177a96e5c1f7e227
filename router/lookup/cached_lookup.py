"""The customer lookup on the call path: cache first, CRM behind a deadline and a breaker.

:meth:`CachedLookup.find` answers within ``timeout_s`` and never raises:

1. A number that is not lookup-able (anonymous, internal, short code, invalid) is
   ``source="skipped"`` without any I/O.
2. A fresh entry in the in-process LRU is ``"lru"``; a fresh entry in Redis is
   ``"redis"``. An LRU entry is re-read from Redis once it is older than ``lru_trust_s``
   while the invalidation feed (:mod:`router.lookup.cachefeed`) covers it, ``lru_recheck_s``
   otherwise: other instances' changes reach this LRU through the feed, at once.
3. A stale entry (past its TTL, within ``stale_max_age_s`` more) is served at once as
   ``"stale"`` while one background refresh runs (stale-while-revalidate); while the CRM
   fails or the breaker is open the same entry keeps being served (stale-if-error).
4. Otherwise the CRM is asked. Concurrent calls from one number share one request
   (single-flight). An answer back in time is ``"crm"``; a failure is ``"error"`` with the
   error kind; no answer in time is ``"deadline"``, and the request goes on in the
   background to fill the cache (tasks are kept referenced and bounded by
   ``max_background``; at most ``max_crm_inflight`` requests are on the wire at once, so a
   burst of cold callers neither floods the CRM nor starves the event loop). With the
   circuit open nothing is asked: ``"error"``/``circuit_open``.
5. A rate-limited CRM (429, or its limit headers saying nothing is left) is not a failing
   one: the breaker ignores it, and the connector queues the lookups until the CRM's
   limit resets (its rate gate; a lookup that got a 429 is sent again after the pause,
   all within ``crm.limits.lookup_queue_s``, in the background): callers within their
   deadline get the answer, later ones the filled cache, a caller with a stale entry
   gets it at once, and none is refused for a cooldown.

Every answer counts ``callroute_lookups{source}``. Every CRM failure is logged with its
kind (timeout, unavailable, 4xx, 5xx, 429 with Retry-After, bad_json, mapping); the
connector counts it in ``callroute_crm_errors{op,kind}`` (only an exception outside the
:class:`~router.errors.CrmError` tree, a connector bug, is counted here, as
``op="lookup",kind="error"``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from router.crm.base import CustomerDirectory
from router.crypto import KeyRing, keyring_from_settings
from router.errors import CrmError, CrmRateLimited
from router.keys import Keys, keys_from_settings
from router.lookup.breaker import CircuitBreaker, State
from router.lookup.cache import CacheEntry, TwoLevelCache, redis_client
from router.metrics import CRM_ERRORS, LOOKUP_BACKGROUND, LOOKUPS, child
from router.models import CallerNumber, LookupResult, LookupSource
from router.settings import BreakerSettings, CacheSettings, RedisSettings

if TYPE_CHECKING:
    from router.settings import Settings

log = logging.getLogger(__name__)

#: What a background CRM fetch ends with: the new entry, or the classified failure.
FetchOutcome = CacheEntry | CrmError


class CachedLookup:
    """:class:`~router.lookup.base.Lookup` over a :class:`CustomerDirectory`, a two-level cache,
    a deadline and a circuit breaker.

    ``redis_client_or_url``: a redis-py asyncio client (not closed by :meth:`aclose`) or a
    URL (a client with ``redis_settings``' short timeouts is made and closed here).
    ``clock``: tests only; one clock for entry ages and the breaker.
    """

    def __init__(
        self,
        directory: CustomerDirectory,
        redis_client_or_url: aioredis.Redis | str,
        keys: Keys,
        cache_settings: CacheSettings,
        breaker_settings: BreakerSettings,
        *,
        redis_settings: RedisSettings | None = None,
        clock: Callable[[], float] | None = None,
        crypto: KeyRing | None = None,
    ) -> None:
        rs = redis_settings or RedisSettings()
        if isinstance(redis_client_or_url, str):
            redis = redis_client(rs.model_copy(update={"url": redis_client_or_url}))
            self._owns_redis = True
        else:
            redis = redis_client_or_url
            self._owns_redis = False
        self.directory = directory
        self.settings = cache_settings
        self.cache = TwoLevelCache(
            redis, keys, cache_settings, down_backoff_s=rs.down_backoff_s,
            clock=clock or time.time, crypto=crypto,
        )
        self.policy = self.cache.policy
        self.breaker = CircuitBreaker(
            breaker_settings.failures, breaker_settings.cooldown_s,
            clock=clock or time.monotonic,
        )
        self._wall = clock or time.time
        self._inflight: dict[str, asyncio.Task[FetchOutcome]] = {}
        self._tasks: set[asyncio.Task[FetchOutcome]] = set()
        self._crm_slots = asyncio.Semaphore(cache_settings.max_crm_inflight)

    @classmethod
    def from_settings(cls, settings: Settings, directory: CustomerDirectory) -> CachedLookup:
        """Build from the whole configuration; the Redis client is owned (closed by aclose)."""
        return cls(directory, settings.redis.url, keys_from_settings(settings), settings.cache,
                   settings.breaker,
                   redis_settings=settings.redis, crypto=keyring_from_settings(settings))

    @property
    def background(self) -> int:
        """CRM fetches running now."""
        return len(self._tasks)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for background fetches to finish and their cache writes to reach
        Redis (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        await self.cache.writes.drain()

    async def aclose(self) -> None:
        """Cancel background fetches and close the Redis client if this object made it.

        The directory belongs to the caller and is not closed here.
        """
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_redis:
            await self.cache.aclose()
        else:
            await self.cache.feed.aclose()
            await self.cache.reads.aclose()
            await self.cache.writes.drain()

    # --- the call path ---------------------------------------------------------------------
    async def find(self, number: CallerNumber, *, timeout_s: float) -> LookupResult:
        """Answer within ``timeout_s`` (see the module docstring). Never raises."""
        start = time.monotonic()
        self.cache.feed.start()
        try:
            result = await self._find(number, start + timeout_s)
        except Exception:  # a bug must not cost the call its route
            log.exception("lookup failed unexpectedly")
            result = _empty("error", "internal")
        child(LOOKUPS, result.source).inc()
        result.elapsed_ms = (time.monotonic() - start) * 1000
        return result

    async def _find(self, number: CallerNumber, deadline: float) -> LookupResult:
        if not number.lookupable or number.e164 is None:
            return _empty("skipped")
        e164 = number.e164
        entry, source = await self._cached(e164, deadline)
        now = self._wall()
        if entry is not None and self.policy.fresh(entry, now):
            return _result(entry, source, now)
        if entry is not None:
            task = self._fetch_task(number)
            error = None if task is not None else self._refusal()
            return _result(entry, "stale", now, error=error)
        task = self._fetch_task(number)
        if task is None:
            return _empty("error", self._refusal())
        remaining = deadline - time.monotonic()
        if remaining > 0:
            await asyncio.wait({task}, timeout=remaining)
        if not task.done():
            return _empty("deadline", "deadline")
        outcome = task.result()
        if isinstance(outcome, CrmError):
            return _empty("error", outcome.kind)
        return _result(outcome, "crm", self._wall())

    async def _cached(self, e164: str, deadline: float) -> tuple[CacheEntry | None, LookupSource]:
        """The best usable entry (LRU, or Redis when due a re-check) and where it came from."""
        now = self._wall()
        slot = self.cache.get_local(e164)
        local = slot[0] if slot is not None and self.policy.usable(slot[0], now) else None
        trusted = slot is not None and self.cache.trusted(slot[1])
        if local is not None and self.policy.fresh(local, now) and trusted:
            return local, "lru"
        read_at = time.monotonic()
        remaining = deadline - read_at
        if remaining <= 0 or not self.cache.health.available():
            return local, "lru"
        try:
            async with asyncio.timeout(remaining):
                ok, shared = await self.cache.get_shared(e164)
        except TimeoutError:
            ok, shared = False, None
        now = self._wall()
        fresh_slot = self.cache.get_local(e164)
        if fresh_slot is not None and fresh_slot[1] >= read_at:
            # stored while we waited on Redis (a fetch for this number that just finished
            # and left the in-flight table): newer than whatever Redis said, which may be
            # "not there yet", and no reason to ask the CRM a second time
            entry = fresh_slot[0]
            return (entry if self.policy.usable(entry, now) else None), "lru"
        if not ok:
            return local, "lru"
        if shared is None and local is not None and self.cache.writes.pending(e164):
            return local, "lru"  # our own answer is on its way to Redis, not invalidated
        if shared is None or not self.policy.usable(shared, now):
            # Redis is the shared truth: a miss there (e.g. a webhook invalidated it on
            # another instance) drops our copy too.
            self.cache.lru.discard(e164)
            return None, "redis"
        self.cache.lru.put(e164, shared)
        return shared, "redis"

    def _refusal(self) -> str:
        return "circuit_open" if self.breaker.state is not State.CLOSED else "overloaded"

    # --- background fetches ----------------------------------------------------------------
    def _fetch_task(self, number: CallerNumber) -> asyncio.Task[FetchOutcome] | None:
        """The running fetch for this number, a new one, or None (breaker or bound says no)."""
        assert number.e164 is not None
        task = self._inflight.get(number.e164)
        if task is not None:
            return task
        if len(self._tasks) >= self.settings.max_background:
            log.warning("%d CRM lookups already in the background; not starting another",
                        len(self._tasks))
            return None
        if not self.breaker.allow():
            return None
        task = asyncio.create_task(self._fetch(number), name=f"crm-lookup-{number.e164[-4:]}")
        self._inflight[number.e164] = task
        self._tasks.add(task)
        LOOKUP_BACKGROUND.set(len(self._tasks))
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[FetchOutcome]) -> None:
        self._tasks.discard(task)
        LOOKUP_BACKGROUND.set(len(self._tasks))

    async def _fetch(self, number: CallerNumber) -> FetchOutcome:
        """Ask the CRM once, feed the breaker, fill the cache. Returns failures as values."""
        assert number.e164 is not None
        try:
            try:
                async with self._crm_slots:
                    customer = await self.directory.find_by_number(number)
            except CrmError as exc:
                self.breaker.failure(exc)
                _log_crm_error(exc)
                return exc
            except asyncio.CancelledError:
                self.breaker.release()
                raise
            except Exception as exc:  # a connector bug: classified, never propagated
                self.breaker.release()
                log.exception("CRM connector raised %s", type(exc).__name__)
                err = CrmError(f"connector bug: {type(exc).__name__}")
                CRM_ERRORS.labels(op="lookup", kind=err.kind).inc()
                return err
            self.breaker.success()
            entry = CacheEntry(customer, self._wall())
            self.cache.put_behind(number.e164, entry)
            return entry
        finally:
            if self._inflight.get(number.e164) is asyncio.current_task():
                del self._inflight[number.e164]


def _log_crm_error(exc: CrmError) -> None:
    extra = ""
    if isinstance(exc, CrmRateLimited) and exc.retry_after is not None:
        extra = f" (retry after {exc.retry_after:g}s)"
    status = getattr(exc, "status", None)
    log.warning("CRM lookup failed: kind=%s%s%s: %s", exc.kind,
                f" status={status}" if status is not None else "", extra, exc)


def _result(
    entry: CacheEntry, source: LookupSource, now: float, *, error: str | None = None
) -> LookupResult:
    # validated construction is the fast one in pydantic 2 (model_construct is Python)
    return LookupResult(
        customer=entry.customer, source=source, found=entry.found,
        age_s=round(entry.age(now), 3), error=error, elapsed_ms=0.0,
    )


def _empty(source: LookupSource, error: str | None = None) -> LookupResult:
    return LookupResult(
        customer=None, source=source, found=False, age_s=None, error=error, elapsed_ms=0.0
    )
