"""The lookup ``explain`` uses: what a call would be told now, changing nothing.

:class:`ReadOnlyLookup` answers like :meth:`CachedLookup.find
<router.lookup.cached_lookup.CachedLookup.find>` of the lookup it wraps, in the same
order (in-process LRU, Redis, then the CRM within the deadline; an open circuit
breaker answers ``error``/``circuit_open`` without asking), but it only reads:

* nothing is stored: not in the LRU, not in Redis (no write, no invalidation), and a
  CRM answer past the deadline is dropped instead of filling the cache;
* nothing is counted: no ``callroute_lookups``, the circuit breaker is neither fed nor
  probed, and no background refresh starts for a stale entry;
* the CRM request it sends is a real request, so the connector still counts it in
  ``callroute_crm_requests{op="lookup"}`` (and its failures in ``callroute_crm_errors``):
  those count traffic to the CRM, whoever caused it.

Sharing the service's lookup (``/api/explain`` in ``callroute serve``) shows what the
service's own cache holds; ``callroute explain`` wraps a fresh one (empty LRU).
"""

from __future__ import annotations

import asyncio
import time

from router.errors import CrmError
from router.lookup.breaker import State
from router.lookup.cache import CacheEntry
from router.lookup.cached_lookup import CachedLookup
from router.models import CallerNumber, LookupResult, LookupSource


class ReadOnlyLookup:
    """:class:`~router.lookup.base.Lookup` that reads ``lookup``'s caches and asks its CRM,
    and never writes, counts or feeds anything (see the module docstring)."""

    def __init__(self, lookup: CachedLookup) -> None:
        self.lookup = lookup

    async def find(self, number: CallerNumber, *, timeout_s: float) -> LookupResult:
        """Answer within ``timeout_s``. Never raises."""
        start = time.monotonic()
        try:
            result = await self._find(number, start + timeout_s)
        except Exception as exc:  # explain must print something, whatever happened
            result = _result(None, "error", error=f"internal: {type(exc).__name__}")
        result.elapsed_ms = (time.monotonic() - start) * 1000
        return result

    async def _find(self, number: CallerNumber, deadline: float) -> LookupResult:
        if not number.lookupable or number.e164 is None:
            return _result(None, "skipped")
        cache = self.lookup.cache
        policy = cache.policy
        e164 = number.e164
        now = cache.clock()
        slot = cache.lru.peek(e164)
        if slot is not None and policy.fresh(slot[0], now) and cache.trusted(slot[1]):
            return _result(slot[0], "lru", now)
        entry = slot[0] if slot is not None and policy.usable(slot[0], now) else None
        remaining = deadline - time.monotonic()
        if remaining > 0 and cache.health.available():
            try:
                async with asyncio.timeout(remaining):
                    ok, shared = await cache.get_shared(e164)
            except TimeoutError:
                ok, shared = False, None
            if ok:
                now = cache.clock()
                entry = shared if shared is not None and policy.usable(shared, now) else None
                if entry is not None and policy.fresh(entry, now):
                    return _result(entry, "redis", now)
        if entry is not None:
            return _result(entry, "stale", now)
        if self.lookup.breaker.state is not State.CLOSED:
            return _result(None, "error", error="circuit_open")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return _result(None, "deadline", error="deadline")
        try:
            async with asyncio.timeout(remaining):
                customer = await self.lookup.directory.find_by_number(number)
        except TimeoutError:
            return _result(None, "deadline", error="deadline")
        except CrmError as exc:
            return _result(None, "error", error=exc.kind)
        return _result(CacheEntry(customer, cache.clock()), "crm", cache.clock())


def _result(entry: CacheEntry | None, source: LookupSource, now: float = 0.0,
            *, error: str | None = None) -> LookupResult:
    if entry is None:
        return LookupResult(customer=None, source=source, found=False, age_s=None,
                            error=error, elapsed_ms=0.0)
    return LookupResult(customer=entry.customer, source=source, found=entry.found,
                        age_s=round(entry.age(now), 3), error=error, elapsed_ms=0.0)
