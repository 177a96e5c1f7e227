"""The call path's cache writes: queued, coalesced into pipelines, never waited on.

The queue is tested with a recording ``send`` (what would go to Redis, batch by batch);
the lookup's use of it against the real test Redis and the loopback CRM.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from router.lookup import cache as cache_module
from router.lookup.cache import (
    MAX_BATCH,
    MAX_QUEUED_WRITES,
    MAX_WRITES_INFLIGHT,
    CacheEntry,
    PutBatch,
    WriteBehind,
)
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


class Recorder:
    """A ``send`` that records each batch; ``gate`` (when set) holds every send open."""

    def __init__(self) -> None:
        self.batches: list[PutBatch] = []
        self.gate: asyncio.Event | None = None
        self.open = 0

    async def __call__(self, batch: PutBatch) -> None:
        self.batches.append(batch)
        self.open += 1
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.open -= 1


def entry(name: str | None = None, at: float = 1_800_000_000.0) -> CacheEntry:
    return CacheEntry(Customer(id=name, name=name) if name else None, at)


def dropped() -> float:
    return REGISTRY.get_sample_value("callroute_cache_errors_total", {"kind": "dropped"}) or 0.0


@pytest.fixture(name="long_linger")
def long_linger_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued writes stay queued for the whole test unless drained or flushed by size."""
    monkeypatch.setattr(cache_module, "WRITE_LINGER_S", 30.0)


async def test_writes_within_the_linger_go_out_as_one_batch() -> None:
    """Ten writes queued back to back are sent as one batch after the linger, not ten;
    add() returns at once (nothing is sent before the linger)."""
    send = Recorder()
    writes = WriteBehind(send)
    for i in range(10):
        writes.add(f"+86138000000{i:02d}", entry())
    assert send.batches == []
    assert writes.queued == 10
    await asyncio.sleep(cache_module.WRITE_LINGER_S * 3)
    assert [len(b) for b in send.batches] == [10]
    assert writes.queued == 0


async def test_a_newer_write_of_a_queued_number_replaces_it(long_linger: None) -> None:
    """Two answers for one number while queued: only the newer one is sent."""
    send = Recorder()
    writes = WriteBehind(send)
    writes.add(ALICE, entry("old", at=1.0))
    writes.add(ALICE, entry("new", at=2.0))
    await writes.drain()
    assert send.batches == [[(ALICE, entry("new", at=2.0))]]


async def test_a_full_batch_is_sent_without_waiting_for_the_linger(long_linger: None) -> None:
    """MAX_BATCH queued writes go out at once (the linger is 30 s here)."""
    send = Recorder()
    writes = WriteBehind(send)
    for i in range(MAX_BATCH + 3):
        writes.add(f"+8618600{i:06d}", entry())
    await asyncio.sleep(0)
    assert [len(b) for b in send.batches] == [MAX_BATCH]
    assert writes.queued == 3
    await writes.drain()
    assert [len(b) for b in send.batches] == [MAX_BATCH, 3]


async def test_pipelines_in_flight_are_bounded_and_the_queue_is_capped(
    long_linger: None,
) -> None:
    """While Redis holds every pipeline open, at most MAX_WRITES_INFLIGHT are sent; further
    writes queue up to MAX_QUEUED_WRITES, beyond which they are dropped and counted; when
    Redis answers, the queue goes out."""
    send = Recorder()
    send.gate = asyncio.Event()
    writes = WriteBehind(send)
    before = dropped()
    n = MAX_BATCH * MAX_WRITES_INFLIGHT + MAX_QUEUED_WRITES + 5
    for i in range(n):
        writes.add(f"+861860{i:07d}", entry())
    await asyncio.sleep(0)
    assert send.open == MAX_WRITES_INFLIGHT
    assert writes.queued == MAX_QUEUED_WRITES
    assert dropped() == before + 5
    send.gate.set()
    await writes.drain()
    assert sum(len(b) for b in send.batches) == n - 5
    assert writes.queued == 0


async def test_pending_covers_queued_and_in_flight_writes(long_linger: None) -> None:
    """pending() is true from add() until the pipeline carrying the write is done."""
    send = Recorder()
    send.gate = asyncio.Event()
    writes = WriteBehind(send)
    writes.add(ALICE, entry("a"))
    assert writes.pending(ALICE)
    assert not writes.pending(BOB)
    drained = asyncio.create_task(writes.drain())
    await asyncio.sleep(0.01)
    assert writes.queued == 0
    assert send.open == 1
    assert writes.pending(ALICE)
    send.gate.set()
    await drained
    assert not writes.pending(ALICE)


async def test_cancel_forgets_outdated_queued_writes(long_linger: None) -> None:
    """cancel() drops the queued writes its predicate names, and only those."""
    send = Recorder()
    writes = WriteBehind(send)
    writes.add(ALICE, entry("C1"))
    writes.add(BOB, entry("C2"))
    assert writes.cancel(lambda _n, e: e.customer is not None and e.customer.id == "C1") == 1
    await writes.drain()
    assert [n for b in send.batches for n, _ in b] == [BOB]


# --- the lookup's writes, real Redis ---------------------------------------------------


async def test_a_miss_is_answered_before_its_cache_write_and_written_after(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis, long_linger: None
) -> None:
    """A CRM answer is returned while its Redis write is still queued; the next call on
    this instance is served from the LRU even with Redis re-checked on every call (the
    write is on its way, not an invalidation); drain() puts it in Redis."""
    lookup = make_lookup(directory, redis, lru_recheck_s=0, lru_trust_s=0)
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "crm"
    assert await redis.exists(KEYS.customer(ALICE)) == 0
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "lru"
    assert crm.lookups[ALICE] == 1
    await lookup.drain()
    assert await redis.exists(KEYS.customer(ALICE)) == 1
    assert (await lookup.find(num(ALICE), timeout_s=1)).source == "redis"
    await lookup.aclose()


async def test_an_invalidation_cancels_a_queued_write_here_and_on_other_instances(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis, long_linger: None
) -> None:
    """An older answer must not overwrite an invalidation: a number invalidated on this
    instance, or announced by another one, loses its queued write."""
    a = make_lookup(directory, redis, lru_recheck_s=3600)
    b = make_lookup(directory, redis, lru_recheck_s=3600)
    await listening(a)
    await a.find(num(ALICE), timeout_s=1)
    await a.find(num(BOB), timeout_s=1)
    assert a.cache.writes.queued == 2
    await a.cache.invalidate_numbers([ALICE])
    assert a.cache.writes.queued == 1
    await b.cache.invalidate_numbers([BOB], strict=True)
    await eventually(lambda: a.cache.writes.queued == 0)
    await a.drain()
    assert await redis.exists(KEYS.customer(ALICE), KEYS.customer(BOB)) == 0
    await a.aclose()
    await b.aclose()


async def test_closing_the_lookup_sends_the_queued_writes(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis, long_linger: None
) -> None:
    """aclose() (shutdown) sends what is still queued instead of losing it."""
    lookup = make_lookup(directory, redis)
    await lookup.find(num(ALICE), timeout_s=1)
    assert await redis.exists(KEYS.customer(ALICE)) == 0
    await lookup.aclose()
    assert await redis.exists(KEYS.customer(ALICE)) == 1
