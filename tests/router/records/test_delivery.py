"""Delivery worker against a real Redis and a real loopback CRM."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest

from router.records.delivery import Entry, backoff_delay, plan
from router.records.outbox import ensure_group
from router.settings import OutboxSettings
from tests.router.records.outbox_crm import (  # noqa: F401  (fixtures)
    FakeCrm,
    Harness,
    call_record,
    crm_fixture,
    harness_fixture,
    wait_until,
)


async def dead_entries(h: Harness) -> list[dict[str, str]]:
    return [fields for _id, fields in await h.redis.xrange(h.keys.outbox_dead)]


async def test_delivers_each_record_once_and_clears_the_stream(h: Harness, crm: FakeCrm) -> None:
    """Enqueued records are posted once each with idempotency key = record_key, then XACKed
    and XDELed (stream empty, nothing pending), and the delivered marker is set."""
    for n in range(30):
        assert await h.outbox.enqueue(call_record(n)) == "enqueued"
    h.start()
    await wait_until(lambda: len(crm.objects()) == 30)
    assert set(crm.count().values()) == {1}
    assert crm.objects() == {f"call-{n}" for n in range(30)}
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_stream), 0)
    pending = await h.redis.xpending(h.keys.outbox_stream, "delivery")
    assert pending["pending"] == 0
    assert await h.redis.exists(h.keys.delivered("call-7")) == 1
    assert await h.redis.xlen(h.keys.outbox_sent) == 30


async def wait_until_async(
    h: Harness, probe: object, expected: object, limit_s: float = 10
) -> None:
    """Poll an async probe until it returns ``expected``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        value = await probe()  # type: ignore[operator]
        if value == expected:
            return
        assert loop.time() < deadline, f"still {value!r}, wanted {expected!r}"
        await asyncio.sleep(0.02)


async def attempted_keys(h: Harness) -> set[str]:
    """Keys of the outbox records that already failed at least once (atomic snapshot)."""
    async with h.redis.pipeline(transaction=True) as pipe:
        pipe.zrange(h.keys.outbox_retry, 0, -1)
        pipe.xrange(h.keys.outbox_stream)
        members, entries = await pipe.execute()
    keys = {json.loads(m)["key"] for m in members}
    keys |= {f["key"] for _id, f in entries if int(f["attempt"]) >= 1}
    if len(members) + len(entries) != 200:
        return set()
    return keys


async def test_crm_refusing_connections_then_back_delivers_exactly_once(
    h: Harness, crm: FakeCrm
) -> None:
    """With the CRM down (connection refused) for the whole replay of many records, every
    record is retried, and when it comes back each arrives exactly once."""
    port = crm.port
    await crm.stop()
    for n in range(200):
        await h.outbox.enqueue(call_record(n))
    h.start("w1", max_attempts=10_000)
    h.start("w2", max_attempts=10_000)
    await wait_until_async(h, lambda: attempted_keys(h), {f"call-{n}" for n in range(200)})
    back = FakeCrm(port=port)
    await back.start()
    try:
        await wait_until(lambda: len(back.objects()) == 200, limit_s=20)
        await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_stream), 0)
        await wait_until_async(h, lambda: h.redis.zcard(h.keys.outbox_retry), 0)
        assert back.count() == {f"call-{n}": 1 for n in range(200)}
        assert await dead_entries(h) == []
    finally:
        await back.stop()


async def test_server_errors_are_retried_until_the_crm_recovers(h: Harness, crm: FakeCrm) -> None:
    """500 answers are retried with backoff; after recovery the record is created once and
    the attempts are visible in the CRM log."""
    crm.faults = [(500, {})] * 4
    await h.outbox.enqueue(call_record(1))
    h.start()
    await wait_until(lambda: crm.objects() == {"call-1"})
    assert crm.count()["call-1"] == 5
    assert len(crm.objects()) == 1


async def test_retry_after_is_honoured_as_a_minimum(h: Harness, crm: FakeCrm) -> None:
    """After a 429 with Retry-After: 1, the next attempt comes no earlier than 1 s later,
    although the backoff alone would retry within 0.1 s."""
    crm.faults = [(429, {"Retry-After": "1"})]
    await h.outbox.enqueue(call_record(1))
    h.start()
    await wait_until(lambda: crm.objects() == {"call-1"})
    first, second = [r.at for r in crm.received if r.key == "call-1"]
    assert second - first >= 1.0
    assert second - first < 3.0


async def test_rejected_record_is_dead_lettered_with_reason(h: Harness, crm: FakeCrm) -> None:
    """A 4xx (non-retryable) is not retried: the record goes to the dead-letter stream with
    reason, attempt count and the last error, and leaves the outbox."""
    crm.faults = [(422, {})]
    await h.outbox.enqueue(call_record(1))
    h.start()
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_dead), 1)
    (dead,) = await dead_entries(h)
    assert dead["key"] == "call-1"
    assert dead["reason"] == "rejected"
    assert dead["attempt"] == "1"
    assert dead["error"].startswith("4xx")
    assert crm.count()["call-1"] == 1
    assert await h.redis.xlen(h.keys.outbox_stream) == 0


async def test_dead_letter_after_max_attempts(h: Harness, crm: FakeCrm) -> None:
    """A record failing with a retryable error is dead-lettered after max_attempts tries,
    with reason max_attempts, the attempt count and the last error."""
    crm.faults = [(503, {})] * 100
    await h.outbox.enqueue(call_record(1))
    h.start(max_attempts=3)
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_dead), 1)
    (dead,) = await dead_entries(h)
    assert (dead["reason"], dead["attempt"]) == ("max_attempts", "3")
    assert dead["error"].startswith("5xx")
    assert crm.count()["call-1"] == 3
    assert await h.redis.zcard(h.keys.outbox_retry) == 0


async def test_two_workers_share_the_work_without_duplicates(h: Harness, crm: FakeCrm) -> None:
    """Two workers in one consumer group each deliver part of the backlog; no record is
    posted twice."""
    for n in range(300):
        await h.outbox.enqueue(call_record(n))
    # Reclaiming is tested elsewhere; a long idle time keeps a loaded machine from
    # reclaiming (and legitimately re-posting) slow in-flight entries here.
    w1 = h.start("w1", concurrency=4, claim_idle_s=30.0)
    w2 = h.start("w2", concurrency=4, claim_idle_s=30.0)
    await wait_until(lambda: len(crm.objects()) == 300)
    assert set(crm.count().values()) == {1}
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_sent), 300)
    await wait_until(lambda: w1.stats["delivered"] + w2.stats["delivered"] == 300)
    assert w1.stats["delivered"] > 0
    assert w2.stats["delivered"] > 0
    assert w1.stats["delivered"] + w2.stats["delivered"] == 300
    consumers = await h.redis.xinfo_consumers(h.keys.outbox_stream, "delivery")
    assert {c["name"] for c in consumers} == {"w1", "w2"}


async def test_unknown_caller_and_missed_call_make_lead_and_task(h: Harness, crm: FakeCrm) -> None:
    """An unknown caller gets a lead (key:lead), a missed call a task (key:task), a known
    answered call neither; with both options off, only the activity is posted."""
    await h.outbox.enqueue(call_record(1, customer_id=None, outcome="missed"))
    await h.outbox.enqueue(call_record(2))
    await h.outbox.enqueue(call_record(3, customer_id="C9", outcome="abandoned"))
    h.start()
    await wait_until(lambda: len(crm.objects("task")) == 2 and len(crm.objects()) == 3)
    assert crm.objects("lead") == {"call-1:lead"}
    assert crm.objects("task") == {"call-1:task", "call-3:task"}
    off = OutboxSettings(create_leads=False, create_tasks=False)
    assert plan(call_record(1, customer_id=None, outcome="missed"), off) == ["call"]


async def test_partial_record_retry_skips_completed_steps(h: Harness, crm: FakeCrm) -> None:
    """When the activity succeeds but the lead fails (500), the retry only re-sends the
    lead: the CRM sees one activity request and two lead requests."""
    crm.kind_faults["lead"] = [500]
    await h.outbox.enqueue(call_record(1, customer_id=None))
    h.start()
    await wait_until(lambda: crm.objects("lead") == {"call-1:lead"})
    assert crm.count()["call-1"] == 1
    assert crm.count("lead")["call-1:lead"] == 2


async def test_reclaimed_entry_already_delivered_is_acked_without_sending(
    h: Harness, crm: FakeCrm
) -> None:
    """An entry left pending by a dead consumer is reclaimed after claim_idle_s; if its
    delivered marker exists it is acked without a second post."""
    await h.outbox.enqueue(call_record(1))
    await h.outbox.enqueue(call_record(2))
    dead = h.worker("dead")
    await ensure_group(h.redis, h.keys, "delivery")
    taken = await dead.read(10, None)
    assert [e.key for e in taken] == ["call-1", "call-2"]
    await h.redis.set(h.keys.delivered("call-1"), "1")
    h.start("alive", claim_idle_s=0.2)
    await wait_until(lambda: crm.objects() == {"call-2"})
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_stream), 0)
    assert crm.count()["call-1"] == 0


async def test_a_slow_delivery_reclaimed_by_its_own_worker_is_not_sent_twice(
    h: Harness, crm: FakeCrm
) -> None:
    """A delivery that outlasts claim_idle_s (a slow CRM, a long rate-limit wait) is handed
    back by XAUTOCLAIM to the very worker still delivering it: that worker does not start
    it a second time, so the CRM gets one request."""
    crm.stall_keys.add("call-1")
    await h.outbox.enqueue(call_record(1))
    worker = h.start(claim_idle_s=0.1)
    await asyncio.wait_for(crm.stalled.wait(), 5)
    await asyncio.sleep(0.6)  # several reclaim rounds while the answer is held
    crm.release.set()
    await wait_until_async(h, lambda: h.redis.exists(h.keys.delivered("call-1")), 1)
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_stream), 0)
    assert crm.count()["call-1"] == 1
    assert worker.stats["delivered"] == 1
    assert await h.redis.xlen(h.keys.outbox_sent) == 1


def test_backoff_is_capped_full_jitter_with_retry_after_floor() -> None:
    """Delays stay within [0, min(cap, base*2^(n-1))], spread over that range, and never
    go below Retry-After."""
    rng = random.Random(7)
    for failures in range(1, 12):
        ceiling = min(5.0, 0.5 * 2 ** (failures - 1))
        delays = [backoff_delay(failures, 0.5, 5.0, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8
        assert min(delays) < ceiling * 0.2
    assert all(backoff_delay(1, 0.5, 5.0, rng, retry_after=3.0) >= 3.0 for _ in range(50))


def test_entry_parsing_never_raises_on_bad_fields() -> None:
    """Garbage stream fields give an entry with defaults rather than an exception."""
    entry = Entry.from_fields("1-0", {"key": "k", "attempt": "x", "enq": ""})
    assert (entry.key, entry.attempt, entry.enq, entry.record) == ("k", 0, 0, "")


async def test_bad_entry_is_dead_lettered_not_crashing(h: Harness, crm: FakeCrm) -> None:
    """A stream entry whose record is not JSON goes to dead letters (reason bad_entry) and
    the worker goes on delivering the next record."""
    await h.redis.xadd(h.keys.outbox_stream, {"key": "junk", "record": "{not json", "attempt": "0"})
    await h.outbox.enqueue(call_record(1))
    h.start()
    await wait_until(lambda: crm.objects() == {"call-1"})
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_dead), 1)
    (dead,) = await dead_entries(h)
    assert (dead["key"], dead["reason"]) == ("junk", "bad_entry")


@pytest.mark.parametrize(("fields", "steps"), [
    ({"customer_id": None, "outcome": "answered"}, ["call", "lead"]),
    ({"customer_id": None, "outcome": "voicemail"}, ["call", "lead", "task"]),
    ({"customer_id": "C1", "outcome": "rejected"}, ["call"]),
    ({"customer_id": None, "outcome": "rejected"}, ["call"]),
    ({"customer_id": None, "caller": None, "outcome": "missed"}, ["call"]),
    ({"customer_id": "C1", "caller": None, "outcome": "abandoned"}, ["call"]),
])
def test_leads_and_tasks_follow_the_outcome(fields: dict[str, Any], steps: list[str]) -> None:
    """No lead and no call-back task for a rejected (blocked) caller or a caller without a
    number; a voicemail gets a call-back task; an unknown caller with a number a lead."""
    assert plan(call_record(1, **fields), OutboxSettings()) == steps
