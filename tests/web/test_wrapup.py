"""Holding an answered call's record for the agent's disposition, with a real Redis:
one record per call, with the disposition, whatever the order of events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from router.keys import Keys
from router.web.wrapup import Wrapup

KEYS = Keys(prefix="t:", secret=b"s")


def record(lid: str = "1.1", agent: str | None = "7001",
           outcome: str = "answered") -> dict[str, Any]:
    """A call record as the tracker emits it (the fields the wrap-up reads)."""
    return {"record_key": f"call:{lid}", "linkedid": lid, "answered_by_agent": agent,
            "outcome": outcome, "customer_id": "C-1001", "caller": "+8613800138000"}


class Outbox:
    """Stands in for Outbox.enqueue with its dedupe: the first key is 'enqueued'."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.sent: list[dict[str, Any]] = []

    async def enqueue(self, rec: Mapping[str, Any]) -> str:
        added = await self.redis.set(KEYS.outbox_dedupe(rec["record_key"]), "1", nx=True)
        if not added:
            return "duplicate"
        self.sent.append(dict(rec))
        return "enqueued"


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis (flushed)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def make(redis: aioredis.Redis, hold_s: float = 60) -> tuple[Wrapup, Outbox, Clock, list[Any]]:
    """A Wrapup over a dedupe-keeping outbox; ``filed`` collects history writes."""
    outbox, clock, filed = Outbox(redis), Clock(), []

    async def file(rec: Mapping[str, Any]) -> None:
        filed.append(rec["record_key"])

    return Wrapup(redis, KEYS, outbox.enqueue, hold_s, filed=file, clock=clock), outbox, \
        clock, filed


async def test_without_an_open_page_the_record_goes_at_once(redis: aioredis.Redis) -> None:
    """No page for the agent: nothing is held, the record is enqueued and filed once."""
    wrap, outbox, _, filed = make(redis)
    assert await wrap.put(record()) == "enqueued"
    assert await wrap.put(record()) == "duplicate"  # a second instance's copy
    assert [r["record_key"] for r in outbox.sent] == ["call:1.1"]
    assert filed == ["call:1.1"]


async def test_held_record_gets_the_disposition_and_goes_once(redis: aioredis.Redis) -> None:
    """The agent's page is open: the record waits; the disposition is put on it and it is
    enqueued once, with the note; a second disposition finds it gone."""
    wrap, outbox, _, _ = make(redis)
    await wrap.mark_online(["7001"])
    assert await wrap.put(record()) == "held"
    assert await wrap.put(record()) == "held"  # another instance's copy: still one hold
    assert outbox.sent == []
    assert await redis.zcard(KEYS.web_holds) == 1
    assert await wrap.dispose("call:1.1", "7001", "resolved", "call back Monday") == "saved"
    assert len(outbox.sent) == 1
    sent = outbox.sent[0]
    assert (sent["disposition"], sent["disposition_note"], sent["disposition_by"]) == \
        ("resolved", "call back Monday", "7001")
    assert await redis.exists(KEYS.web_hold("call:1.1"), KEYS.web_disposition("call:1.1")) == 0
    assert await redis.zcard(KEYS.web_holds) == 0
    assert await wrap.dispose("call:1.1", "7001", "sale", "") == "gone"


async def test_disposition_before_the_record_is_put_on_it(redis: aioredis.Redis) -> None:
    """Given while the record is still being built (Cdr grace), the disposition is kept
    and the record goes at once when it arrives, with it."""
    wrap, outbox, _, _ = make(redis)
    await wrap.mark_online(["7001"])
    assert await wrap.dispose("call:1.1", "7001", "sale", "") == "saved"
    assert outbox.sent == []
    assert await wrap.put(record()) == "enqueued"
    assert outbox.sent[0]["disposition"] == "sale"
    assert outbox.sent[0]["disposition_note"] is None


async def test_another_agents_disposition_is_refused_or_ignored(redis: aioredis.Redis) -> None:
    """Only the agent who answered can dispose: refused on a held record, ignored when
    given early by someone else."""
    wrap, outbox, _, _ = make(redis)
    await wrap.mark_online(["7001"])
    assert await wrap.dispose("call:2.1", "7002", "sale", "") == "saved"  # early, wrong agent
    assert await wrap.put(record("2.1")) == "held"
    assert await wrap.dispose("call:2.1", "7002", "sale", "") == "not-yours"
    assert outbox.sent == []


async def test_unclaimed_records_are_released_after_the_wrapup_time(
    redis: aioredis.Redis,
) -> None:
    """Nobody disposes: the releaser sends the record as it is once its time is up, and
    not before; a missed or unanswered call is never held."""
    wrap, outbox, clock, filed = make(redis, hold_s=60)
    await wrap.mark_online(["7001"])
    assert await wrap.put(record("3.1")) == "held"
    assert await wrap.put(record("4.1", outcome="missed", agent=None)) == "enqueued"
    clock.now += 59
    assert await wrap.release_due() == 0
    clock.now += 2
    assert await wrap.release_due() == 1
    assert [r["record_key"] for r in outbox.sent] == ["call:4.1", "call:3.1"]
    assert "disposition" not in outbox.sent[1]
    assert filed == ["call:4.1", "call:3.1"]


async def test_held_records_survive_a_restart(redis: aioredis.Redis) -> None:
    """A new Wrapup (another process) releases what an earlier one held."""
    first, _, clock, _ = make(redis, hold_s=30)
    await first.mark_online(["7001"])
    await first.put(record("5.1"))
    second, outbox, _, _ = make(redis, hold_s=30)
    assert await second.release_due(now=clock.now + 31) == 1
    assert outbox.sent[0]["record_key"] == "call:5.1"


async def test_a_bad_held_entry_is_dropped_with_a_log_line(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """A held entry that is not JSON leaves the holds (logged) instead of looping."""
    wrap, _outbox, _clock, _ = make(redis)
    await redis.set(KEYS.web_hold("call:x"), "{nope")
    await redis.zadd(KEYS.web_holds, {"call:x": 0, "call:gone": 0})
    assert await wrap.release_due() == 0
    assert await redis.zcard(KEYS.web_holds) == 0
    assert "not JSON" in caplog.text


async def test_redis_down_sends_the_record_at_once(
    own_redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """When the hold cannot be checked (Redis down), the record goes to the outbox
    (which has its own spool) at once, with a log line: never lost."""
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True,
                                     socket_connect_timeout=0.2)
    sent: list[Any] = []

    async def enqueue(rec: Mapping[str, Any]) -> str:
        sent.append(rec)
        return "spooled"

    wrap = Wrapup(client, KEYS, enqueue, 60)
    await wrap.mark_online(["7001"])
    own_redis.stop()
    try:
        assert await wrap.put(record()) == "spooled"
    finally:
        await client.aclose()
    assert len(sent) == 1
    assert "cannot hold record call:1.1" in caplog.text
    with pytest.raises(RedisConnectionError):
        await aioredis.Redis.from_url(own_redis.url, socket_connect_timeout=0.2).ping()


async def test_online_marks_expire_and_offline_clears(redis: aioredis.Redis) -> None:
    """The page's online mark has a TTL (a crashed instance's pages stop holding) and is
    removed when the agent's last page closes."""
    wrap, _, _, _ = make(redis)
    await wrap.mark_online(["7001", "7002"])
    assert 0 < await redis.ttl(KEYS.web_online("7001")) <= 30
    await wrap.mark_offline("7001")
    assert await redis.exists(KEYS.web_online("7001")) == 0
    assert await redis.get(KEYS.web_online("7002")) == "1"
