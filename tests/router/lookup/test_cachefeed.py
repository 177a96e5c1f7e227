"""The cache invalidation feed between instances (Redis pub/sub), on the real test Redis."""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from router.lookup.cache import CacheEntry
from router.lookup.cachefeed import InvalidationFeed, customer_message, number_message
from router.metrics import REGISTRY
from router.models import Customer
from tests.router.lookup.cache_crm import (
    KEYS,
    HttpDirectory,
    LoopbackCrm,
    eventually,
    listening,
    make_lookup,
    num,
)

ALICE = "+8613800138000"
BOB = "+8613900139000"
BOB2 = "+8613700137000"


async def test_invalidation_on_one_instance_reaches_the_others_lru(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """A webhook invalidation on instance A drops B's LRU copy at once (B re-checks Redis
    only every hour here, so it is the feed that does it): B's next call asks the CRM."""
    a = make_lookup(directory, redis, lru_recheck_s=3600)
    b = make_lookup(directory, redis, lru_recheck_s=3600)
    await listening(a, b)
    assert (await a.find(num(ALICE), timeout_s=1)).source == "crm"
    await a.drain()  # A's answer reaches Redis in the background
    assert (await b.find(num(ALICE), timeout_s=1)).source == "redis"
    assert (await b.find(num(ALICE), timeout_s=1)).source == "lru"
    assert await a.cache.invalidate_numbers([ALICE], strict=True) == 1
    await eventually(lambda: b.cache.get_local(ALICE) is None)
    assert (await b.find(num(ALICE), timeout_s=1)).source == "crm"
    assert crm.lookups[ALICE] == 2
    await a.aclose()
    await b.aclose()


async def test_customer_invalidation_drops_every_number_of_the_customer(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """Invalidating a CRM customer id on A drops all of that customer's numbers from B's
    LRU, and nobody else's."""
    a = make_lookup(directory, redis, lru_recheck_s=3600)
    b = make_lookup(directory, redis, lru_recheck_s=3600)
    await listening(a, b)
    for number in (BOB, BOB2, ALICE):
        await a.find(num(number), timeout_s=1)
        await a.drain()
        await b.find(num(number), timeout_s=1)
    assert await a.cache.invalidate_customer("C2", strict=True) == 2
    await eventually(lambda: b.cache.get_local(BOB) is None and b.cache.get_local(BOB2) is None)
    assert b.cache.get_local(ALICE) is not None
    await a.aclose()
    await b.aclose()


async def test_a_replaced_entry_is_read_again_by_the_others(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """A new value stored on A (a webhook carrying the record, a sync page) is announced:
    B drops its old copy and its next call reads the new value from Redis."""
    a = make_lookup(directory, redis, lru_recheck_s=3600)
    b = make_lookup(directory, redis, lru_recheck_s=3600)
    await listening(a, b)
    await a.find(num(ALICE), timeout_s=1)
    await b.find(num(ALICE), timeout_s=1)
    newer = CacheEntry(Customer(id="C1", name="Alice Renamed"), time.time())
    await a.cache.put(ALICE, newer, strict=True)
    await eventually(lambda: b.cache.get_local(ALICE) is None)
    result = await b.find(num(ALICE), timeout_s=1)
    assert result.source == "redis"
    assert result.customer is not None
    assert result.customer.name == "Alice Renamed"
    assert a.cache.get_local(ALICE) is not None  # its own announcement is not applied
    await a.aclose()
    await b.aclose()


async def test_lru_is_trusted_while_the_feed_covers_it_and_rechecked_when_not(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """With the feed up an LRU entry is served without reading Redis (lru_trust_s) even
    though lru_recheck_s is 0; when the feed's connection is killed the entry is re-read
    from Redis on the next call (messages may have been missed), and once the feed is
    back, entries stored after it resubscribed are trusted again."""
    lookup = make_lookup(directory, redis, lru_recheck_s=0, lru_trust_s=3600)
    await listening(lookup)
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "crm"
    await lookup.drain()
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "lru"
    killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert int(killed) >= 1
    await eventually(lambda: lookup.cache.feed.since is None)
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "redis"
    await eventually(lambda: lookup.cache.feed.since is not None)
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "redis"  # stored before
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "lru"
    assert crm.lookups[ALICE] == 1
    await lookup.aclose()


async def test_messages_are_parsed_strictly(redis: aioredis.Redis) -> None:
    """Own messages are skipped, unknown hashes drop nothing, garbage is counted and
    ignored; nothing raises."""
    dropped: list[object] = []

    def drop_numbers(hashes: list[str]) -> int:
        dropped.append(hashes)
        return len(hashes)

    def drop_customer(cid: str) -> int:
        dropped.append(cid)
        return 1

    feed = InvalidationFeed(redis, KEYS.cache_events, drop_numbers, drop_customer)
    before = REGISTRY.get_sample_value("callroute_cache_errors_total",
                                       {"kind": "feed_message"}) or 0.0
    assert feed.apply(number_message("other", ["h1", "h2"]).encode()) == 2
    assert feed.apply(customer_message("other", "C-9")) == 1
    assert feed.apply(number_message(feed.sender, ["h3"])) == 0
    assert feed.apply(b"\xff\xfe garbage") == 0
    assert feed.apply("other n") == 0
    assert dropped == [["h1", "h2"], "C-9"]
    after = REGISTRY.get_sample_value("callroute_cache_errors_total", {"kind": "feed_message"})
    assert after == before + 2


async def test_messages_name_no_phone_number(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis, redis_url: str
) -> None:
    """What goes over the channel carries keyed hashes, never the number itself; the
    call path's own CRM answer is not announced (no news to the others), a replacement
    and an invalidation are."""
    listener = aioredis.Redis.from_url(redis_url)
    pubsub = listener.pubsub()
    await pubsub.subscribe(KEYS.cache_events)
    lookup = make_lookup(directory, redis)
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "crm"
    await lookup.cache.put(ALICE, CacheEntry(Customer(id="C1", name="Alice"), time.time()))
    await lookup.cache.invalidate_numbers([ALICE], strict=True)
    seen: list[bytes] = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if message is not None:
            seen.append(message["data"])
    assert len(seen) == 2
    assert all(ALICE[1:].encode() not in m and b"13800138000" not in m for m in seen)
    assert all(KEYS.number_hash(ALICE).encode() in m for m in seen)
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await listener.aclose()
    await lookup.aclose()
