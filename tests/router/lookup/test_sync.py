"""Pre-warm sync: paging, the cursor saved in Redis, resuming after a crash."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from router.errors import CrmServerError
from router.lookup.cache import TwoLevelCache, decode_entry
from router.lookup.sync import periodic_sync, run_sync
from router.settings import CacheSettings
from tests.router.lookup.cache_crm import KEYS, HttpDirectory, LoopbackCrm

NUMBERS = [f"+8613{i}0013{i}000" for i in range(1, 8)]  # 7 customers, 4 pages of 2

pytestmark = pytest.mark.usefixtures("no_gc")


@pytest.fixture
def seven(crm: LoopbackCrm) -> LoopbackCrm:
    """The CRM with exactly seven customers, two per page."""
    crm.customers.clear()
    for i, n in enumerate(NUMBERS):
        crm.add(n, f"S{i}", f"Customer {i}")
    crm.page_size = 2
    return crm


async def cached_numbers(redis: aioredis.Redis) -> set[str]:
    """Which of NUMBERS have a cache entry in Redis."""
    return {n for n in NUMBERS if await redis.exists(KEYS.customer(n))}


async def test_sync_pages_through_and_fills_the_cache(
    seven: LoopbackCrm, directory: HttpDirectory, redis: aioredis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """All pages are fetched in order, every number is cached with its customer and
    indexed, and the cursor of the last page is saved. No progress bar without a TTY."""
    cache = TwoLevelCache(redis, KEYS, CacheSettings())
    report = await run_sync(directory, cache, redis, KEYS, progress=True)
    assert (report.pages, report.customers, report.numbers) == (4, 7, 7)
    assert seven.pages == [0, 1, 2, 3]
    assert await cached_numbers(redis) == set(NUMBERS)
    raw = await redis.get(KEYS.customer(NUMBERS[4]))
    assert raw is not None
    entry = decode_entry(raw)
    assert entry is not None
    assert entry.customer is not None
    assert entry.customer.id == "S4"
    assert await redis.smembers(KEYS.customer_index("S4")) == {
        KEYS.number_hash(NUMBERS[4]).encode()}
    assert await redis.get(KEYS.sync_cursor) == b"3"
    assert capsys.readouterr().err == ""


async def test_resume_after_a_crash_on_page_3(
    seven: LoopbackCrm, directory: HttpDirectory, redis: aioredis.Redis
) -> None:
    """The CRM fails on the third page: the run raises with pages 1-2 stored and the
    cursor at page 3; the rerun starts at page 3, not at the beginning."""
    cache = TwoLevelCache(redis, KEYS, CacheSettings())
    seven.behaviour.fail_on_page = 2  # 0-based: the third page
    with pytest.raises(CrmServerError):
        await run_sync(directory, cache, redis, KEYS, progress=False)
    assert seven.pages == [0, 1, 2]
    assert await redis.get(KEYS.sync_cursor) == b"2"
    assert await cached_numbers(redis) == set(NUMBERS[:4])
    seven.behaviour.fail_on_page = None
    seven.pages.clear()
    report = await run_sync(directory, cache, redis, KEYS, progress=False)
    assert seven.pages == [2, 3]
    assert (report.started_from, report.pages, report.customers) == ("2", 2, 3)
    assert await cached_numbers(redis) == set(NUMBERS)


async def test_next_sync_starts_from_the_saved_cursor(
    seven: LoopbackCrm, directory: HttpDirectory, redis: aioredis.Redis
) -> None:
    """A second full run does not start over: it asks from the last page's cursor."""
    cache = TwoLevelCache(redis, KEYS, CacheSettings())
    await run_sync(directory, cache, redis, KEYS, progress=False)
    seven.pages.clear()
    report = await run_sync(directory, cache, redis, KEYS, progress=False)
    assert seven.pages == [3]
    assert report.customers == 1


async def test_periodic_sync_repeats_and_survives_failures(
    seven: LoopbackCrm, directory: HttpDirectory, redis: aioredis.Redis
) -> None:
    """The periodic task keeps going after a failing run and stops when asked."""
    cache = TwoLevelCache(redis, KEYS, CacheSettings())
    seven.behaviour.fail_on_page = 0
    stop = asyncio.Event()
    task = asyncio.create_task(periodic_sync(directory, cache, redis, KEYS, 0.02, stop=stop))
    for _ in range(100):
        if len(seven.pages) >= 2:
            break
        await asyncio.sleep(0.01)
    seven.behaviour.fail_on_page = None
    for _ in range(100):
        if await cached_numbers(redis) == set(NUMBERS):
            break
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 1)
    assert seven.pages[:2] == [0, 0]
    assert await cached_numbers(redis) == set(NUMBERS)
