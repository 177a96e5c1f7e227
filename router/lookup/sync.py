"""Pre-warm the cache from the CRM: ``callroute sync`` and the periodic sync of ``serve``.

:func:`run_sync` asks the directory for customers changed since the saved cursor, one page
at a time, and writes every number of each customer to the cache (both levels, strict:
a sync that cannot write Redis fails rather than warming only its own process). The cursor
is saved in Redis (``Keys.sync_cursor``) after each completed page, so a sync that crashes
or meets a CRM error resumes from the first page it did not finish.

On the last page (``next_cursor`` None) the cursor that fetched it stays saved: the next
run asks again from there, sees that page again (harmless: writes are idempotent) and
everything changed since.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import dataclass
from datetime import datetime

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from tqdm import tqdm

from router.crm.base import CustomerDirectory
from router.errors import CacheError, CrmError
from router.keys import Keys
from router.lookup.cache import CacheEntry, TwoLevelCache
from router.metrics import SYNC_CUSTOMERS

log = logging.getLogger(__name__)

#: A sync stops after this many pages even if the CRM keeps sending cursors (a loop guard).
MAX_PAGES = 100_000


@dataclass(frozen=True)
class SyncReport:
    """What one sync did."""

    pages: int
    customers: int
    numbers: int
    started_from: str | None
    cursor: str | None


async def load_cursor(redis: aioredis.Redis, keys: Keys) -> str | None:
    """The saved cursor, or None (start from the beginning)."""
    try:
        raw = await redis.get(keys.sync_cursor)
    except (RedisError, OSError, TimeoutError) as exc:
        raise CacheError(f"cannot read the sync cursor: {exc}") from exc
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def save_cursor(redis: aioredis.Redis, keys: Keys, cursor: str) -> None:
    """Remember the cursor of the next page to fetch."""
    try:
        await redis.set(keys.sync_cursor, cursor)
    except (RedisError, OSError, TimeoutError) as exc:
        raise CacheError(f"cannot save the sync cursor: {exc}") from exc


def _stamp(value: datetime | None) -> float:
    return value.timestamp() if value is not None else float("-inf")


async def run_sync(
    directory: CustomerDirectory,
    cache: TwoLevelCache,
    redis: aioredis.Redis,
    keys: Keys,
    *,
    progress: bool,
) -> SyncReport:
    """Pull changed customers page by page into the cache; see the module docstring.

    Raises :class:`~router.errors.CrmError` or :class:`~router.errors.CacheError` when a
    page cannot be fetched or stored; pages completed before stay done.
    """
    start = await load_cursor(redis, keys)
    cursor = start
    pages = customers = numbers = 0
    newest: datetime | None = None
    show = progress and sys.stderr.isatty()
    bar = tqdm(desc="sync", unit=" customers", file=sys.stderr, disable=not show)
    try:
        while pages < MAX_PAGES:
            page = await directory.changed_since(cursor)
            now = cache.clock()
            items = [(n, CacheEntry(customer, now))
                     for customer, nums in page.entries for n in nums]
            await cache.put_many(items, strict=True)
            pages += 1
            customers += len(page.entries)
            numbers += len(items)
            SYNC_CUSTOMERS.inc(len(page.entries))
            bar.update(len(page.entries))
            newest = max([newest, *(c.updated_at for c, _ in page.entries)],
                         key=_stamp, default=None)
            if page.next_cursor is None or page.next_cursor == cursor:
                # The feed is exhausted: next time, start from the newest change seen
                # (an ISO time is a valid cursor; re-reading that instant is harmless).
                if newest is not None:
                    cursor = newest.isoformat()
                    await save_cursor(redis, keys, cursor)
                break
            cursor = page.next_cursor
            await save_cursor(redis, keys, cursor)
        else:
            log.warning("sync stopped after %d pages (loop guard)", MAX_PAGES)
    finally:
        bar.close()
    log.info("sync done: %d pages, %d customers, %d numbers cached (from cursor %r)",
             pages, customers, numbers, start)
    return SyncReport(pages, customers, numbers, start, cursor)


async def periodic_sync(
    directory: CustomerDirectory,
    cache: TwoLevelCache,
    redis: aioredis.Redis,
    keys: Keys,
    interval_s: float,
    *,
    stop: asyncio.Event | None = None,
) -> None:
    """Run :func:`run_sync` every ``interval_s`` until ``stop`` is set (or cancelled).

    Failures are logged and retried at the next interval; they never end the task.
    """
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            await run_sync(directory, cache, redis, keys, progress=False)
        except (CrmError, CacheError) as exc:
            log.warning("periodic sync failed (%s); next try in %gs", exc, interval_s)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            continue
