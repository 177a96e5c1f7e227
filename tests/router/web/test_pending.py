"""Each agent's calls awaiting a disposition, with a real Redis: on the list while the
call's record is held or kept for a late disposition, off it once it got one or can
get none; only the agent's own, masked, encrypted at rest."""

from __future__ import annotations

import base64
from typing import Any

import redis.asyncio as aioredis

from router.crypto import KeyRing
from router.web.pending import Pending
from router.web.wrapup import Wrapup
from tests.router.web.test_wrapup import KEYS, Clock, Outbox

K1 = "k1:" + base64.b64encode(b"\x01" * 32).decode()


def record(lid: str, agent: str = "7001", **fields: Any) -> dict[str, Any]:
    """An answered call's record as the tracker emits it."""
    return {"record_key": f"call:{lid}", "linkedid": lid, "answered_by_agent": agent,
            "outcome": "answered", "customer_id": "C-1001", "customer_tier": "gold",
            "caller": "+8613800138000", "caller_name": "LI LEI MOBILE",
            "start": "2026-11-22T01:10:00+00:00", "talk_s": 42.0, "queue": "vip", **fields}


def rig(redis: aioredis.Redis, *, late_s: float = 3600, hold_s: float = 60,
        names: dict[str, str] | None = None) -> tuple[Wrapup, Pending, Outbox, Clock,
                                                      list[str]]:
    """A Wrapup with its list, over a dedupe-keeping outbox; ``told`` collects the agents
    whose list changed."""
    outbox, clock, told = Outbox(redis), Clock(), []
    pending = Pending(redis, KEYS, hold_s=hold_s, late_s=late_s, clock=clock,
                      crypto=KeyRing.parse(K1),
                      name_of=lambda lid, agent: (names or {}).get(f"{lid}/{agent}"))
    pending.changed = told.append
    wrap = Wrapup(redis, KEYS, outbox.enqueue, hold_s, clock=clock, late_s=late_s,
                  crypto=KeyRing.parse(K1), pending=pending)
    return wrap, pending, outbox, clock, told


async def test_a_held_call_is_listed_then_taken_off_by_its_disposition(
    redis: aioredis.Redis,
) -> None:
    """A call held for 7001's disposition is on 7001's list (held, the card's name and
    the number masked, until the late window ends), not on 7002's; the disposition given
    takes it off (one record sent, with it), and both changes are told."""
    wrap, pending, outbox, clock, told = rig(redis, names={"1.1/7001": "Li Lei"})
    await wrap.mark_online(["7001"])
    assert await wrap.put(record("1.1")) == "held"
    (row,) = await pending.calls("7001")
    assert row == {
        "call": "1.1", "start": "2026-11-22T01:10:00+00:00", "ended_at": clock.now,
        "outcome": "answered", "customer_id": "C-1001", "tier": "gold", "name": "L.L.",
        "number": "+86138****8000", "anonymous": False, "talk_s": 42.0, "queue": "vip",
        "wrapup_until": clock.now + 60, "until": clock.now + 3600, "held": True}
    assert await pending.calls("7002") == []
    assert told == ["7001"]
    assert await wrap.dispose("call:1.1", "7001", "sale", "") == "saved"
    assert await pending.calls("7001") == []
    assert told == ["7001", "7001"]
    assert [r.get("disposition") for r in outbox.sent] == ["sale"]


async def test_a_call_released_without_a_disposition_stays_for_a_late_one(
    redis: aioredis.Redis,
) -> None:
    """The wrap-up time ends without a disposition: the record goes, the call stays on
    the list (no longer held) and the disposition given from it is an update; then it
    is off the list. A withheld caller is listed without a number, a call without a
    card's name with its caller id name masked."""
    wrap, pending, outbox, clock, _ = rig(redis)
    await wrap.mark_online(["7001"])
    await wrap.put(record("2.1"))
    clock.now += 30
    await wrap.put(record("3.1", caller=None, anonymous=True, caller_name=None,
                          customer_id=None))
    assert await wrap.release_due(now=clock.now + 61) == 2
    rows = await pending.calls("7001")
    assert [(r["call"], r["held"]) for r in rows] == [("3.1", False), ("2.1", False)]
    assert [(r["name"], r["number"], r["anonymous"]) for r in rows] == \
        [(None, None, True), ("L.L.M.", "+86138****8000", False)]
    assert await wrap.dispose("call:2.1", "7001", "follow-up", "") == "updated"
    assert [r["call"] for r in await pending.calls("7001")] == ["3.1"]
    assert [r["record_key"] for r in outbox.sent] == ["call:2.1", "call:3.1",
                                                      "call:2.1:disposition"]


async def test_a_call_that_can_get_none_any_more_leaves_the_list(
    redis: aioredis.Redis,
) -> None:
    """Without late dispositions a call released without one leaves the list; with them,
    it leaves once the late window is over (or its kept copy expired), on the next read;
    a call whose page was closed (sent at once) is listed for a late one."""
    wrap, pending, _, clock, _ = rig(redis, late_s=0)
    await wrap.mark_online(["7001"])
    await wrap.put(record("4.1"))
    assert [r["until"] for r in await pending.calls("7001")] == [clock.now + 60]
    await wrap.release_due(now=clock.now + 61)
    assert await pending.calls("7001") == []

    wrap, pending, _, clock, _ = rig(redis, late_s=3600)
    assert await wrap.put(record("5.1", agent="7002")) == "enqueued"  # no page open
    assert [(r["call"], r["held"]) for r in await pending.calls("7002")] == [("5.1", False)]
    clock.now += 3601
    assert await pending.calls("7002") == []
    assert await redis.zcard(KEYS.web_todo("7002")) == 0
    assert await redis.hlen(KEYS.web_todo_rows("7002")) == 0
    await wrap.put(record("6.1", agent="7002"))
    await redis.delete(KEYS.web_sent("call:6.1"))  # its kept copy expired
    assert await pending.calls("7002") == []


async def test_rows_are_encrypted_at_rest_and_noted_once(redis: aioredis.Redis) -> None:
    """The stored row is sealed for its key and field (no name, number or customer id in
    clear); a second note (another instance's, or the release) keeps the first row."""
    wrap, pending, _, _, told = rig(redis, names={"7.1/7001": "Li Lei"})
    await wrap.mark_online(["7001"])
    await wrap.put(record("7.1"))
    stored = await redis.hget(KEYS.web_todo_rows("7001"), "call:7.1")
    assert stored.startswith("enc1:k1:")
    for clear in ("L.L.", "8000", "C-1001", "Li Lei"):
        assert clear not in stored
    await pending.note(record("7.1", customer_id="C-9"))
    assert [r["customer_id"] for r in await pending.calls("7001")] == ["C-1001"]
    assert told == ["7001", "7001"]  # each note tells this instance's pages
    other = await redis.hget(KEYS.web_todo_rows("7001"), "call:7.1")
    await redis.hset(KEYS.web_todo_rows("7001"), "call:8.1", other)  # moved: bound
    await redis.zadd(KEYS.web_todo("7001"), {"call:8.1": 1_000_000.0})
    await redis.set(KEYS.web_hold("call:8.1"), "x")
    assert [r["call"] for r in await pending.calls("7001")] == ["7.1"]
    await redis.hset(KEYS.web_todo_rows("7001"), "call:7.1", "enc1:k1:" + "A" * 60)
    assert await pending.calls("7001") == []  # a row that does not decrypt is dropped
