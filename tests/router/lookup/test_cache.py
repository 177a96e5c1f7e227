"""The two-level cache: envelope, LRU bound, invalidation, and Redis down or slow."""

from __future__ import annotations

import asyncio
import gc
import time

import pytest
import redis.asyncio as aioredis

from router.lookup.cache import CacheEntry, LruCache, decode_entry, encode_entry, redis_client
from router.metrics import REGISTRY
from router.models import Customer
from router.settings import RedisSettings
from tests.redis_server import RedisServer
from tests.router.lookup.cache_crm import KEYS, HttpDirectory, LoopbackCrm, make_lookup, num

ALICE = "+8613800138000"
BOB = "+8613900139000"
CAROL = "+8613700137000"

pytestmark = pytest.mark.usefixtures("no_gc")


def errors(kind: str) -> float:
    """callroute_cache_errors{kind}."""
    return REGISTRY.get_sample_value("callroute_cache_errors_total", {"kind": kind}) or 0.0


def test_envelope_round_trip_and_rejects() -> None:
    """The envelope keeps the record and fetch time; anything else decodes to None."""
    entry = CacheEntry(Customer(id="C9", name="Zoë", tags=("vip",), value=12.5), 1234.5)
    assert decode_entry(encode_entry(entry)) == entry
    assert decode_entry(encode_entry(CacheEntry(None, 7.0))) == CacheEntry(None, 7.0)
    for raw in (b"", b"null", b'{"v":2,"t":1,"c":null}', b'{"v":1,"c":null}',
                b'{"v":1,"t":true,"c":null}', b'{"v":1,"t":1,"c":[]}', b"x" * 70_000):
        assert decode_entry(raw) is None, raw[:30]


def test_lru_is_bounded_and_indexes_customers() -> None:
    """The LRU evicts the least recently used entry and can drop a customer's numbers."""
    lru = LruCache(2)
    bob = Customer(id="C2", name="Bob")
    lru.put(BOB, CacheEntry(bob, 1))
    lru.put(CAROL, CacheEntry(bob, 1))
    assert lru.get(BOB) is not None  # BOB is now the most recent
    lru.put(ALICE, CacheEntry(None, 1))
    assert lru.get(CAROL) is None
    assert len(lru) == 2
    assert lru.discard_customer("C2") == [BOB]
    assert lru.get(BOB) is None
    assert lru.get(ALICE) is not None


def test_unknown_callers_in_the_lru_cost_the_garbage_collector_nothing() -> None:
    """The LRU's slots for "no such caller" answers are not tracked by the cyclic
    collector (a full pass would otherwise grow with the cache), and read back whole."""
    lru = LruCache(10_000, hasher=KEYS.number_hash)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(5000):
        lru.put(f"+861860098{i:04d}", CacheEntry(None, 1_800_000_000.0 + i))
    gc.collect()
    assert len(gc.get_objects()) - before < 100
    slot = lru.get("+8618600980007")
    assert slot is not None
    assert slot[0] == CacheEntry(None, 1_800_000_007.0)


async def test_invalidate_customer_uses_the_index(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """Invalidating a customer id removes every number cached for it (both levels) and
    the index, and nothing else."""
    lookup = make_lookup(directory, redis)
    for n in (ALICE, BOB, CAROL):
        await lookup.find(num(n), timeout_s=1)
    await lookup.drain()
    removed = await lookup.cache.invalidate_customer("C2")
    assert removed == 2
    keys = {k.decode() async for k in redis.scan_iter(match="*")}
    assert keys == {KEYS.customer(ALICE), KEYS.customer_index("C1")}
    assert lookup.cache.lru.get(BOB) is None
    assert lookup.cache.lru.get(ALICE) is not None
    await lookup.aclose()


async def test_redis_stopped_mid_test_calls_still_answered_then_used_again(
    directory: HttpDirectory, crm: LoopbackCrm, own_redis: RedisServer
) -> None:
    """Redis killed: calls are answered from the LRU or the CRM, quickly, with a metric;
    during the back-off window Redis costs nothing; after restart it is used again
    without any help."""
    client = redis_client(RedisSettings(url=own_redis.url))
    lookup = make_lookup(directory, client, lru_recheck_s=0,
                         redis_settings=RedisSettings(down_backoff_s=0.2))
    await lookup.find(num(ALICE), timeout_s=1)
    # its answer written to Redis before Redis stops: a write still lingering would fail
    # beside the read below (two failures, when the loaded machine runs them together)
    await lookup.drain()
    own_redis.stop()
    before = errors("connection")
    start = time.monotonic()
    cached = await lookup.find(num(ALICE), timeout_s=1)
    assert (cached.source, cached.found) == ("lru", True)
    fresh = await lookup.find(num(BOB), timeout_s=1)
    assert (fresh.source, fresh.found) == ("crm", True)
    assert time.monotonic() - start < 0.2
    assert errors("connection") == before + 1  # once; then skipped during back-off
    skipped_start = time.monotonic()
    for _ in range(20):
        assert (await lookup.find(num(ALICE), timeout_s=1)).source == "lru"
    assert time.monotonic() - skipped_start < 0.02
    assert errors("connection") == before + 1
    own_redis.start()
    await asyncio.sleep(0.25)
    again = await lookup.find(num(CAROL), timeout_s=1)
    assert again.source == "crm"
    await lookup.drain()
    assert not lookup.cache.health.down
    assert await client.exists(KEYS.customer(CAROL)) == 1
    await lookup.aclose()
    await client.aclose()


async def test_slow_redis_costs_at_most_the_socket_timeout(
    directory: HttpDirectory, crm: LoopbackCrm, own_redis: RedisServer
) -> None:
    """A Redis that does not answer (CLIENT PAUSE) costs one socket timeout (50 ms), counts
    a timeout error, and the call is still answered from the CRM."""
    client = redis_client(RedisSettings(url=own_redis.url, socket_timeout_s=0.05))
    admin = aioredis.Redis.from_url(own_redis.url)
    lookup = make_lookup(directory, client)
    await client.ping()
    before = errors("timeout")
    await admin.execute_command("CLIENT", "PAUSE", "400", "ALL")
    start = time.monotonic()
    result = await lookup.find(num(ALICE), timeout_s=1)
    took = time.monotonic() - start
    assert (result.source, result.found) == ("crm", True)
    assert took < 0.15
    assert errors("timeout") == before + 1
    await asyncio.sleep(0.45)
    await lookup.aclose()
    await client.aclose()
    await admin.aclose()


async def test_lookup_deadline_bounds_a_slow_redis(
    directory: HttpDirectory, crm: LoopbackCrm, own_redis: RedisServer
) -> None:
    """Even with a long Redis socket timeout the decision budget wins: find() returns by
    its deadline."""
    client = redis_client(RedisSettings(url=own_redis.url, socket_timeout_s=1.0))
    admin = aioredis.Redis.from_url(own_redis.url)
    lookup = make_lookup(directory, client)
    await client.ping()
    await admin.execute_command("CLIENT", "PAUSE", "300", "ALL")
    start = time.monotonic()
    result = await lookup.find(num(ALICE), timeout_s=0.05)
    assert result.source == "deadline"
    assert time.monotonic() - start < 0.07
    await asyncio.sleep(0.35)
    await lookup.drain()
    await lookup.aclose()
    await client.aclose()
    await admin.aclose()


async def test_concurrent_reads_are_one_mget(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """50 concurrent calls served from Redis cost Redis one MGET, not 50 GETs (the
    server's own command statistics say so)."""
    lookup = make_lookup(directory, redis, lru_size=0)
    callers = [num(n) for n in (ALICE, BOB, CAROL)]
    for n in callers:
        await lookup.find(n, timeout_s=1)
    await lookup.drain()
    await redis.config_resetstat()
    results = await asyncio.gather(*(lookup.find(callers[i % 3], timeout_s=1)
                                     for i in range(50)))
    assert {r.source for r in results} == {"redis"}
    stats = await redis.info("commandstats")
    assert stats["cmdstat_mget"]["calls"] == 1
    assert "cmdstat_get" not in stats
    assert crm.total == 3
    await lookup.aclose()
