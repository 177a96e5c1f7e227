"""CachedLookup against a real aiohttp CRM on loopback and the real test Redis."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from router.lookup.cache import encode_entry
from router.metrics import REGISTRY
from tests.router.lookup.cache_crm import (
    KEYS,
    FakeClock,
    HttpDirectory,
    LoopbackCrm,
    eventually,
    make_lookup,
    num,
)

ALICE = "+8613800138000"
BOB = "+8613900139000"
NOBODY = "+8613600136000"

pytestmark = pytest.mark.usefixtures("no_gc")


def sample(name: str, labels: dict[str, str]) -> float:
    """Current value of a counter sample (0 when never incremented)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_skipped_numbers_do_no_io(directory: HttpDirectory, crm: LoopbackCrm,
                                        redis: aioredis.Redis) -> None:
    """Anonymous, internal and short-code callers are 'skipped' without CRM or Redis I/O."""
    lookup = make_lookup(directory, redis)
    for raw in ("anonymous", "7001", "110", ""):
        result = await lookup.find(num(raw), timeout_s=0.3)
        assert result.source == "skipped"
        assert result.customer is None
    assert crm.total == 0
    assert await redis.dbsize() == 0
    await lookup.aclose()


async def test_miss_then_lru_then_redis_for_another_instance(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """First call asks the CRM; the next is served from the LRU; a second instance
    (new LRU) is served from Redis; the CRM saw exactly one request."""
    before = sample("callroute_lookups_total", {"source": "crm"})
    first = make_lookup(directory, redis)
    r1 = await first.find(num("13800138000"), timeout_s=1)
    assert (r1.source, r1.found, r1.customer and r1.customer.name) == ("crm", True, "Alice")
    assert sample("callroute_lookups_total", {"source": "crm"}) == before + 1
    r2 = await first.find(num("+86 138 0013 8000"), timeout_s=1)
    assert (r2.source, r2.customer) == ("lru", r1.customer)
    await first.drain()  # the answer reaches Redis in the background
    second = make_lookup(directory, redis)
    r3 = await second.find(num(ALICE), timeout_s=1)
    assert (r3.source, r3.customer) == ("redis", r1.customer)
    r4 = await second.find(num(ALICE), timeout_s=1)
    assert r4.source == "lru"
    assert crm.lookups[ALICE] == 1
    await first.aclose()
    await second.aclose()


async def test_negative_answers_are_cached_with_their_own_ttl(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """An unknown caller is cached as 'not found' for negative_ttl_s (not positive_ttl_s);
    after that it is stale and refreshed once."""
    clock = FakeClock()
    lookup = make_lookup(directory, redis, clock=clock, positive_ttl_s=60, negative_ttl_s=10)
    r1 = await lookup.find(num(NOBODY), timeout_s=1)
    assert (r1.source, r1.found, r1.customer) == ("crm", False, None)
    clock.advance(9)
    assert (await lookup.find(num(NOBODY), timeout_s=1)).source == "lru"
    assert crm.lookups[NOBODY] == 1
    clock.advance(2)  # 11 s: past the negative TTL, well inside the positive one
    r3 = await lookup.find(num(NOBODY), timeout_s=1)
    assert (r3.source, r3.found) == ("stale", False)
    await lookup.drain()
    assert crm.lookups[NOBODY] == 2
    await lookup.aclose()


async def test_exact_keyspace_and_ttls(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """After a known and an unknown lookup Redis holds exactly one value per number and one
    index per customer, with TTL = ttl + stale_max_age_s, and no plaintext digits."""
    lookup = make_lookup(directory, redis, positive_ttl_s=60, negative_ttl_s=10,
                         stale_max_age_s=600)
    await lookup.find(num(ALICE), timeout_s=1)
    await lookup.find(num(NOBODY), timeout_s=1)
    await lookup.drain()  # the answers reach Redis in the background
    keys = {k.decode() async for k in redis.scan_iter(match="*")}
    assert keys == {KEYS.customer(ALICE), KEYS.customer(NOBODY), KEYS.customer_index("C1")}
    assert all("13800138000" not in k and "13600136000" not in k for k in keys)
    assert KEYS.customer(ALICE) == f"callroute:cust:{KEYS.number_hash(ALICE)}"
    pos = await redis.pttl(KEYS.customer(ALICE))
    neg = await redis.pttl(KEYS.customer(NOBODY))
    idx = await redis.pttl(KEYS.customer_index("C1"))
    assert 659_000 < pos <= 660_000
    assert 609_000 < neg <= 610_000
    assert 659_000 < idx <= 660_000
    assert await redis.smembers(KEYS.customer_index("C1")) == {KEYS.number_hash(ALICE).encode()}
    assert await redis.type(KEYS.customer(ALICE)) == b"string"
    await lookup.aclose()


async def test_stale_while_revalidate_serves_at_once_and_refreshes_once(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """Past its TTL an entry is served immediately to every caller while exactly ONE
    background refresh runs; the refreshed record replaces it."""
    clock = FakeClock()
    lookup = make_lookup(directory, redis, clock=clock)
    await lookup.find(num(ALICE), timeout_s=1)
    clock.advance(61)
    crm.behaviour.delay_s = 0.2
    crm.add(ALICE, "C1", "Alice Renamed")
    start = time.monotonic()
    results = await asyncio.gather(*(lookup.find(num(ALICE), timeout_s=1) for _ in range(20)))
    assert time.monotonic() - start < 0.1
    assert {r.source for r in results} == {"stale"}
    assert all(r.customer is not None and r.customer.name == "Alice" for r in results)
    assert results[0].age_s is not None
    assert results[0].age_s >= 61
    await lookup.drain()
    assert crm.lookups[ALICE] == 2
    fresh = await lookup.find(num(ALICE), timeout_s=1)
    assert fresh.source == "lru"
    assert fresh.customer is not None
    assert fresh.customer.name == "Alice Renamed"
    await lookup.aclose()


async def test_stale_if_error_until_stale_max_age(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """While the CRM fails a stale entry keeps being served; once it is older than
    ttl + stale_max_age_s it is no longer served and the caller gets the error."""
    clock = FakeClock()
    lookup = make_lookup(directory, redis, clock=clock, positive_ttl_s=60, stale_max_age_s=100,
                         breaker_failures=100)
    await lookup.find(num(ALICE), timeout_s=1)
    crm.behaviour.mode = "500"
    clock.advance(150)
    for _ in range(3):
        result = await lookup.find(num(ALICE), timeout_s=1)
        assert (result.source, result.found) == ("stale", True)
        await lookup.drain()
    assert crm.lookups[ALICE] == 4  # one fetch, three failed refreshes
    clock.advance(20)  # 170 s > 60 + 100
    result = await lookup.find(num(ALICE), timeout_s=1)
    assert (result.source, result.error, result.customer) == ("error", "5xx", None)
    await lookup.aclose()


async def test_single_flight_one_request_per_number(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """Concurrent cold calls from one number make one CRM request; several numbers make
    one request each."""
    crm.behaviour.delay_s = 0.1
    lookup = make_lookup(directory, redis)
    callers = [ALICE] * 30 + [BOB] * 30 + [NOBODY] * 30
    results = await asyncio.gather(*(lookup.find(num(n), timeout_s=2) for n in callers))
    assert {r.source for r in results} == {"crm"}
    assert sum(r.found for r in results) == 60
    assert dict(crm.lookups) == {ALICE: 1, BOB: 1, NOBODY: 1}
    await lookup.aclose()


async def test_single_flight_holds_while_calls_keep_arriving(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """Calls from a few numbers arrive every millisecond while their CRM requests (20 ms)
    complete: one request per number. A call whose Redis read was under way when the
    answer landed must not take Redis's "not there yet" for an invalidation and drop
    the fresh LRU entry (which would ask the CRM again)."""
    crm.behaviour.delay_s = 0.02
    lookup = make_lookup(directory, redis)
    callers = [ALICE, BOB, NOBODY]
    calls = []
    for i in range(150):
        calls.append(asyncio.create_task(lookup.find(num(callers[i % 3]), timeout_s=1)))
        await asyncio.sleep(0.001)
    results = await asyncio.gather(*calls)
    assert {r.source for r in results} <= {"crm", "lru"}
    assert dict(crm.lookups) == {ALICE: 1, BOB: 1, NOBODY: 1}
    await lookup.aclose()


async def test_deadline_returns_in_time_and_fills_cache_in_background(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """A CRM slower than the budget: find() returns 'deadline' within the budget, the
    request finishes in the background and the next call is a cache hit."""
    crm.behaviour.delay_s = 0.3
    lookup = make_lookup(directory, redis)
    start = time.monotonic()
    result = await lookup.find(num(ALICE), timeout_s=0.05)
    took = time.monotonic() - start
    assert result.source == "deadline"
    assert result.customer is None
    assert 0.045 <= took < 0.07
    assert lookup.background == 1
    await lookup.drain()
    assert lookup.background == 0
    again = await lookup.find(num(ALICE), timeout_s=0.05)
    assert (again.source, again.found) == ("lru", True)
    assert crm.lookups[ALICE] == 1
    await lookup.aclose()


async def test_stalled_crm_bounded_background(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """With the CRM stalled every call still returns by its deadline, repeated calls join
    the running request, and background work is bounded by max_background."""
    crm.behaviour.mode = "stall"
    lookup = make_lookup(directory, redis, max_background=2)
    for n in (ALICE, ALICE, BOB):
        start = time.monotonic()
        result = await lookup.find(num(n), timeout_s=0.03)
        assert result.source == "deadline"
        assert time.monotonic() - start < 0.05
    overflow = await lookup.find(num(NOBODY), timeout_s=0.03)
    assert (overflow.source, overflow.error) == ("error", "overloaded")
    assert lookup.background == 2
    await eventually(lambda: crm.total >= 2)
    assert crm.total == 2
    await lookup.aclose()
    assert lookup.background == 0


async def test_crm_errors_are_classified(
    crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """Each CRM failure mode ends as source='error' with its kind: timeout, unavailable
    (dropped and refused), 5xx, 429, 4xx, bad JSON, mapping mismatch; none is cached."""
    cases = [("500", "5xx"), ("429", "429"), ("badjson", "bad_json"), ("drop", "unavailable"),
             ("401", "4xx"), ("mapping", "mapping"), ("slow", "timeout")]
    directory = HttpDirectory(crm.url, timeout_s=0.1)
    refused = HttpDirectory("http://127.0.0.1:9", timeout_s=0.5)
    lookup = make_lookup(directory, redis, breaker_failures=100)
    for mode, kind in cases:
        crm.behaviour.mode = "ok" if mode == "slow" else mode
        crm.behaviour.delay_s = 0.3 if mode == "slow" else 0.0
        result = await lookup.find(num(ALICE), timeout_s=1)
        assert (result.source, result.error) == ("error", kind), mode
    other = make_lookup(refused, redis)
    result = await other.find(num(BOB), timeout_s=1)
    assert (result.source, result.error) == ("error", "unavailable")
    assert await redis.dbsize() == 0  # failures are never cached
    for item in (lookup, other, directory, refused):
        await item.aclose()


async def test_corrupt_or_old_format_value_is_a_miss(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """Garbage, another envelope version or an invalid record under a customer key is a
    miss (the CRM is asked, the value rewritten), counted as a corrupt cache error."""
    lookup = make_lookup(directory, redis)
    bad_values = [b"\xff\xfenot json", b'{"v": 0, "t": 1, "c": null}', b"[1,2]",
                  b'{"v": 1, "t": "x", "c": null}', b'{"v": 1, "t": 1, "c": {"name": 3}}']
    for i, raw in enumerate(bad_values):
        lookup.cache.lru.clear()
        await redis.set(KEYS.customer(ALICE), raw)
        before = sample("callroute_cache_errors_total", {"kind": "corrupt"})
        result = await lookup.find(num(ALICE), timeout_s=1)
        assert (result.source, result.found) == ("crm", True)
        assert sample("callroute_cache_errors_total", {"kind": "corrupt"}) == before + 1
        assert crm.lookups[ALICE] == i + 1
        await lookup.drain()
        stored = await redis.get(KEYS.customer(ALICE))
        assert stored is not None
        assert stored.startswith(b'{"v":1,')
    await lookup.aclose()


async def test_lru_rechecks_redis_and_follows_invalidation(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """An LRU entry past its trust (lru_recheck_s, or lru_trust_s while the invalidation
    feed listens) is checked against Redis: a newer value written there without an
    announcement wins, and a key deleted there drops the local copy."""
    clock = FakeClock()
    lookup = make_lookup(directory, redis, clock=clock, lru_recheck_s=0, lru_trust_s=0)
    await lookup.find(num(ALICE), timeout_s=1)
    await lookup.drain()
    from router.lookup.cache import CacheEntry
    from router.models import Customer
    newer = CacheEntry(Customer(id="C1", name="Alice (from Redis)"), clock())
    await redis.set(KEYS.customer(ALICE), encode_entry(newer), px=60_000)
    result = await lookup.find(num(ALICE), timeout_s=1)
    assert result.source == "redis"
    assert result.customer is not None
    assert result.customer.name == "Alice (from Redis)"
    await redis.delete(KEYS.customer(ALICE))
    again = await lookup.find(num(ALICE), timeout_s=1)
    assert again.source == "crm"
    assert crm.lookups[ALICE] == 2
    await lookup.aclose()


async def test_lookups_metric_counts_sources(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """callroute_lookups{source} counts one per find(), by source."""
    lookup = make_lookup(directory, redis)
    sources = ("crm", "lru", "skipped")
    before = {s: sample("callroute_lookups_total", {"source": s}) for s in sources}
    await lookup.find(num(ALICE), timeout_s=1)
    await lookup.find(num(ALICE), timeout_s=1)
    await lookup.find(num("anonymous"), timeout_s=1)
    after = {s: sample("callroute_lookups_total", {"source": s}) for s in before}
    assert {s: after[s] - before[s] for s in before} == {"crm": 1, "lru": 1, "skipped": 1}
    await lookup.aclose()


async def test_crm_requests_in_flight_are_bounded(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """A burst of cold callers puts at most max_crm_inflight requests on the wire at once;
    the rest queue in the background and still fill the cache."""
    crm.behaviour.delay_s = 0.05
    lookup = make_lookup(directory, redis, max_crm_inflight=2)
    callers = [num(f"+86138{i:08d}") for i in range(6)]
    await asyncio.gather(*(lookup.find(n, timeout_s=0.02) for n in callers))
    await lookup.drain()
    assert crm.total == 6
    assert crm.peak == 2
    results = await asyncio.gather(*(lookup.find(n, timeout_s=0.02) for n in callers))
    assert {r.source for r in results} == {"lru"}
    await lookup.aclose()


async def test_from_settings_uses_prefix_secret_and_owns_its_client(
    directory: HttpDirectory, crm: LoopbackCrm, redis_url: str
) -> None:
    """from_settings() builds the keys from redis.prefix/key_secret and its own client,
    which aclose() closes."""
    from router.keys import Keys
    from router.lookup.cached_lookup import CachedLookup
    from router.settings import RedisSettings, Settings
    settings = Settings(redis=RedisSettings(url=redis_url, prefix="site1:", key_secret="k1"))
    lookup = CachedLookup.from_settings(settings, directory)
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "crm"
    await lookup.drain()
    check = aioredis.Redis.from_url(redis_url)
    keys = {k.decode() async for k in check.scan_iter(match="*")}
    site = Keys(prefix="site1:", secret=b"k1")
    assert keys == {site.customer(ALICE), site.customer_index("C1")}
    await lookup.aclose()
    await check.aclose()
