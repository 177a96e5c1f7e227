"""Customer lookup as the call path sees it.

The implementation is :class:`router.lookup.cached_lookup.CachedLookup` (two-level cache,
stale-while-revalidate / stale-if-error, single-flight, deadline, circuit breaker)::

    lookup = CachedLookup.from_settings(settings, RestConnector(settings.crm))
    result = await lookup.find(number, timeout_s=remaining_budget)
    ...
    await lookup.aclose()
"""

from __future__ import annotations

from typing import Protocol

from router.models import CallerNumber, LookupResult


class Lookup(Protocol):
    """Finds the customer for a caller. Never raises: failures are in the result."""

    async def find(self, number: CallerNumber, *, timeout_s: float) -> LookupResult:
        """Answer within ``timeout_s`` seconds: a customer, unknown, or a degraded
        result (``source`` = ``deadline``/``error``/``stale``). A lookup cut off by
        the deadline goes on in the background to fill the cache."""
