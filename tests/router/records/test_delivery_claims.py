"""A delivery slower than claim_idle_s keeps its claim: two workers (two instances' consumer
names) on a real Redis and a slow loopback CRM send each step once, and a worker that lost
its entry all the same acks, retries and dead-letters nothing of it."""

from __future__ import annotations

import asyncio
import logging

import pytest

from router.records.outbox import ensure_group
from tests.router.records.outbox_crm import (  # noqa: F401  (fixtures)
    FakeCrm,
    Harness,
    call_record,
    crm_fixture,
    harness_fixture,
    wait_until,
)
from tests.router.records.test_delivery import wait_until_async

GROUP = "delivery"


async def holders(h: Harness) -> dict[str, str]:
    """Pending entries of the outbox stream: id -> the consumer holding it."""
    rows = await h.redis.xpending_range(h.keys.outbox_stream, GROUP, "-", "+", 100)
    return {row["message_id"]: row["consumer"] for row in rows}


async def test_two_workers_send_each_step_of_a_slow_record_once(
    h: Harness, crm: FakeCrm
) -> None:
    """The CRM answers each step in 1 s, a record has three steps (activity, lead,
    task), claim_idle_s is 0.6 s and both workers look for stale entries every 0.3 s: the
    worker delivering a record keeps its claim, so the other never takes it over. Each
    step of each record reaches the CRM once, and each record is acked once."""
    crm.delay_s = 1.0
    for n in range(3):
        await h.outbox.enqueue(call_record(n, customer_id=None, outcome="missed"))
    w1 = h.start("instance-a", claim_idle_s=0.6, concurrency=2)
    w2 = h.start("instance-b", claim_idle_s=0.6, concurrency=2)
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_sent), 3)
    await wait_until_async(h, lambda: h.redis.xlen(h.keys.outbox_stream), 0)
    await h.stop_workers()
    for kind, suffix in (("call", ""), ("lead", ":lead"), ("task", ":task")):
        assert crm.count(kind) == {f"call-{n}{suffix}": 1 for n in range(3)}, kind
    assert w1.stats["delivered"] + w2.stats["delivered"] == 3
    assert w1.stats["duplicate"] + w2.stats["duplicate"] == 0
    assert w1.stats["lost"] + w2.stats["lost"] == 0
    assert await holders(h) == {}
    assert await h.redis.xlen(h.keys.outbox_sent) == 3


async def test_the_heartbeat_renews_only_entries_the_worker_still_holds(
    h: Harness, crm: FakeCrm, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry taken from a worker while its answer is held (as another instance's
    XAUTOCLAIM does when the heartbeat came too late) is not claimed back by that
    worker's heartbeat; the worker stops before the record's next step, logs one line
    naming the new holder, and acks nothing. The new holder sends the rest once."""
    caplog.set_level(logging.WARNING, logger="router.records.delivery")
    crm.stall_keys.add("call-1")
    await h.outbox.enqueue(call_record(1, customer_id=None))  # activity, then a lead
    first = h.start("instance-a", claim_idle_s=1.0)
    await asyncio.wait_for(crm.stalled.wait(), 5)
    ((eid, holder),) = (await holders(h)).items()
    assert holder == "instance-a"

    async def instance_b_heartbeat() -> None:  # instance-b took it and keeps it fresh
        while True:
            await h.redis.xclaim(h.keys.outbox_stream, GROUP, "instance-b", 0, [eid],
                                 justid=True)
            await asyncio.sleep(0.05)

    keeper = asyncio.create_task(instance_b_heartbeat())
    try:
        await asyncio.sleep(0.8)  # two heartbeats of instance-a (every 1/3 s)
        assert await holders(h) == {eid: "instance-b"}
        crm.release.set()
        await wait_until(lambda: first.stats["lost"] == 1)
        assert crm.count("lead") == {}
        assert await holders(h) == {eid: "instance-b"}
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
    assert await h.redis.xlen(h.keys.outbox_sent) == 0
    assert await h.redis.exists(h.keys.delivered("call-1")) == 0
    lines = [r.getMessage() for r in caplog.records if "reclaimed by" in r.getMessage()]
    assert len(lines) == 1
    assert "instance-b" in lines[0]
    await h.stop_workers()

    second = h.start("instance-b")  # takes up its pending entry on start
    await wait_until_async(h, lambda: h.redis.exists(h.keys.delivered("call-1")), 1)
    await wait_until_async(h, lambda: holders(h), {})
    assert crm.count() == {"call-1": 1}
    assert crm.count("lead") == {"call-1:lead": 1}
    assert second.stats["delivered"] == 1
    assert await h.redis.xlen(h.keys.outbox_sent) == 1


@pytest.mark.parametrize("fault", [None, 422, 503], ids=["sent", "rejected", "5xx"])
async def test_a_worker_that_lost_its_entry_finishes_none_of_it(
    h: Harness, crm: FakeCrm, fault: int | None
) -> None:
    """A worker delivering an entry that another consumer holds now (its claim lapsed
    unnoticed: no heartbeat ran in between) neither acks it after a success, nor moves it
    to the retry set after a 503, nor dead-letters it after a 422: the entry stays
    pending with its holder, and the delivery ends as "lost"."""
    if fault is not None:
        crm.faults = [(fault, {})]
    await h.outbox.enqueue(call_record(1))
    await ensure_group(h.redis, h.keys, GROUP)
    (entry,) = await h.worker("instance-a").read(10, None)
    late = h.worker("instance-b")
    assert await late.deliver(entry) == "lost"
    assert late.stats == {"lost": 1}
    assert await holders(h) == {entry.id: "instance-a"}
    assert await h.redis.xlen(h.keys.outbox_stream) == 1
    assert await h.redis.xlen(h.keys.outbox_sent) == 0
    assert await h.redis.xlen(h.keys.outbox_dead) == 0
    assert await h.redis.zcard(h.keys.outbox_retry) == 0
    assert await h.redis.exists(h.keys.delivered("call-1")) == 0
