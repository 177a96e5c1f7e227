"""Holding an answered call's record for the agent's disposition, with a real Redis:
one record per call, with the disposition, whatever the order of events."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from router.crypto import KeyRing
from router.keys import Keys
from router.web.wrapup import Wrapup
from tests.waiting import wait_for

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
    assert await redis.exists(KEYS.web_hold("call:1.1"),
                              KEYS.web_disposition("call:1.1", "7001")) == 0
    assert await redis.zcard(KEYS.web_holds) == 0
    assert await wrap.dispose("call:1.1", "7001", "sale", "", rung=True) == "gone"
    assert await wrap.dispose("call:1.1", "7001", "sale", "") == "not-yours"  # not known


async def test_disposition_before_the_record_is_put_on_it(redis: aioredis.Redis) -> None:
    """Given while the record is still being built (Cdr grace), the disposition is kept
    and the record goes at once when it arrives, with it."""
    wrap, outbox, _, _ = make(redis)
    await wrap.mark_online(["7001"])
    assert await wrap.dispose("call:1.1", "7001", "sale", "", rung=True) == "saved"
    assert outbox.sent == []
    assert await wrap.put(record()) == "enqueued"
    assert outbox.sent[0]["disposition"] == "sale"
    assert outbox.sent[0]["disposition_note"] is None


async def test_another_agents_disposition_is_refused_or_ignored(redis: aioredis.Redis) -> None:
    """Only the agent who answered can dispose: refused on a held record, ignored when
    given early by another agent the call rang."""
    wrap, outbox, _, _ = make(redis)
    await wrap.mark_online(["7001"])
    assert await wrap.dispose("call:2.1", "7002", "sale", "", rung=True) == "saved"  # early
    assert await wrap.put(record("2.1")) == "held"
    assert await wrap.dispose("call:2.1", "7002", "sale", "", rung=True) == "not-yours"
    assert outbox.sent == []


async def test_a_call_not_rung_to_the_agent_is_refused(redis: aioredis.Redis) -> None:
    """A made-up call id (nothing held, sent, on the agent's list, nor seen rung to them)
    is refused and nothing is stored for it; a call rung to the agent is accepted early,
    and one on the agent's list of calls awaiting a disposition is theirs too."""
    wrap, outbox, _, _ = make(redis)
    assert await wrap.dispose("call:made.up", "7002", "sale", "") == "not-yours"
    assert await redis.keys("t:web:disp:*") == []
    assert await wrap.dispose("call:2.2", "7002", "sale", "", rung=True) == "saved"
    await redis.zadd(KEYS.web_todo("7002"), {"call:2.3": 1})
    assert await wrap.dispose("call:2.3", "7002", "sale", "") == "saved"
    assert await wrap.dispose("call:2.3", "7003", "sale", "") == "not-yours"
    assert sorted(await redis.keys("t:web:disp:*")) == [
        KEYS.web_disposition("call:2.2", "7002"), KEYS.web_disposition("call:2.3", "7002")]
    assert outbox.sent == []


async def test_another_agent_cannot_overwrite_the_early_disposition(
    redis: aioredis.Redis,
) -> None:
    """The call rang two agents: 7001 (who answered) gives her disposition before the
    record comes, then 7002 (rung too) gives another: each is kept under its agent, and
    the record takes 7001's, not 7002's nor none."""
    wrap, outbox, _, _ = make(redis)
    await wrap.mark_online(["7001", "7002"])
    assert await wrap.dispose("call:2.4", "7001", "resolved", "hers", rung=True) == "saved"
    assert await wrap.dispose("call:2.4", "7002", "sale", "his", rung=True) == "saved"
    assert await wrap.put(record("2.4")) == "enqueued"
    (sent,) = outbox.sent
    assert (sent["disposition"], sent["disposition_note"], sent["disposition_by"]) == \
        ("resolved", "hers", "7001")
    assert await redis.exists(KEYS.web_disposition("call:2.4", "7001")) == 0


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


K1 = "k1:" + base64.b64encode(b"1" * 32).decode()


async def test_held_records_and_dispositions_are_encrypted_at_rest(
    redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """With a key ring, the held record and the disposition are stored encrypted (no
    number, no note in clear), bound to their Redis key, and still reach the outbox in
    clear; a held value moved under another call's key does not open (dropped, logged)."""
    outbox = Outbox(redis)
    wrap = Wrapup(redis, KEYS, outbox.enqueue, 60, crypto=KeyRing.parse(K1))
    await wrap.mark_online(["7001"])
    assert await wrap.put(record("8.1")) == "held"
    assert await wrap.put(record("9.1")) == "held"
    held = await redis.get(KEYS.web_hold("call:8.1"))
    assert held.startswith("enc1:k1:")
    assert "13800138000" not in held
    await redis.set(KEYS.web_hold("call:9.1"), held)  # another call's value
    assert await wrap.dispose("call:8.1", "7001", "sale", "李雷 wants two") == "saved"
    (sent,) = outbox.sent
    assert (sent["caller"], sent["disposition_note"]) == ("+8613800138000", "李雷 wants two")
    assert await redis.get(KEYS.web_disposition("call:8.1", "7001")) is None  # applied
    assert await wrap.dispose("call:10.1", "7001", "sale", "李雷 early", rung=True) == "saved"
    early = await redis.get(KEYS.web_disposition("call:10.1", "7001"))
    assert early.startswith("enc1:k1:")
    assert "李雷" not in early
    assert await wrap.release_due(now=2e9) == 0
    assert "call:9.1 unreadable" in caplog.text
    assert "does not decrypt" in caplog.text
    assert outbox.sent == [sent]
    assert await redis.zcard(KEYS.web_holds) == 0


async def test_a_late_disposition_becomes_one_update_of_the_sent_record(
    redis: aioredis.Redis,
) -> None:
    """The record went without a disposition (no page open): its copy is kept encrypted
    for late_s; the agent's later disposition is enqueued once as an update of it (key
    call:<id>:disposition, naming the original) and told to the history; another agent
    is refused, a second try finds it gone, and without late_s it is gone at once."""
    outbox, updates = Outbox(redis), []

    async def redisposed(rec: Mapping[str, Any]) -> None:
        updates.append(rec["record_key"])

    wrap = Wrapup(redis, KEYS, outbox.enqueue, 60, crypto=KeyRing.parse(K1), late_s=3600,
                  redisposed=redisposed)
    assert await wrap.put(record("6.1")) == "enqueued"
    kept = await redis.get(KEYS.web_sent("call:6.1"))
    assert kept.startswith("enc1:k1:")
    assert 3500 < await redis.ttl(KEYS.web_sent("call:6.1")) <= 3600
    assert await wrap.dispose("call:6.1", "7002", "sale", "") == "not-yours"
    assert await wrap.dispose("call:6.1", "7001", "follow-up", "call Monday") == "updated"
    original, update = outbox.sent
    assert "disposition" not in original
    assert update["record_key"] == "call:6.1:disposition"
    assert (update["update_of"], update["update_step"]) == ("call:6.1", "call")
    assert (update["disposition"], update["disposition_note"], update["disposition_by"]) == \
        ("follow-up", "call Monday", "7001")
    assert update["caller"] == "+8613800138000"
    assert updates == ["call:6.1:disposition"]
    assert await wrap.dispose("call:6.1", "7001", "sale", "", rung=True) == "gone"
    assert len(outbox.sent) == 2
    strict = Wrapup(redis, KEYS, outbox.enqueue, 60)
    assert await strict.put(record("7.1")) == "enqueued"
    assert await redis.exists(KEYS.web_sent("call:7.1")) == 0
    assert await strict.dispose("call:7.1", "7001", "sale", "", rung=True) == "gone"


async def test_a_disposition_racing_another_instances_send_is_not_lost(
    redis: aioredis.Redis, redis_url: str,
) -> None:
    """Another instance sent the record as it came, without the disposition (the agent's
    page was not open as it looked), while it is held here: this instance's send is a
    duplicate, so the disposition goes as the update of the activity instead of
    vanishing."""
    outbox = Outbox(redis)
    other = aioredis.Redis.from_url(redis_url, decode_responses=True)
    wrap = Wrapup(redis, KEYS, outbox.enqueue, 60, late_s=3600)
    there = Wrapup(other, KEYS, outbox.enqueue, 60, late_s=3600)
    try:
        await wrap.mark_online(["7001"])
        assert await wrap.put(record("5.2")) == "held"
        await wrap.mark_offline("7001")
        assert await there.put(record("5.2")) == "enqueued"  # without it
        assert await wrap.dispose("call:5.2", "7001", "resolved", "") == "updated"
    finally:
        await other.aclose()
    assert [r["record_key"] for r in outbox.sent] == ["call:5.2", "call:5.2:disposition"]
    assert outbox.sent[1]["disposition"] == "resolved"
    assert await redis.exists(KEYS.web_hold("call:5.2"), KEYS.web_sent("call:5.2")) == 0


async def test_two_instances_releasing_one_call_send_it_once_without_an_update(
    redis: aioredis.Redis, redis_url: str,
) -> None:
    """Two instances release the same held record (its wrap-up time is up on both, the
    agent's disposition on it) at the same moment, and two instances' copies of a record
    whose disposition came first arrive together: each call goes once, with its
    disposition, and no update of the activity follows (it would be a second, redundant
    request to the CRM and use up the call's one update)."""
    outbox = Outbox(redis)
    other = aioredis.Redis.from_url(redis_url, decode_responses=True)
    here = Wrapup(redis, KEYS, outbox.enqueue, 60, late_s=3600)
    there = Wrapup(other, KEYS, outbox.enqueue, 60, late_s=3600)
    try:
        await here.mark_online(["7001"])
        assert await here.put(record("5.4")) == "held"
        name = KEYS.web_disposition("call:5.4", "7001")
        await redis.set(name, here._seal({"agent": "7001", "code": "sale", "note": ""}, name))
        counts = await asyncio.gather(here.release_due(now=2e9), there.release_due(now=2e9))
        assert sorted(counts) == [0, 1]
        assert await here.dispose("call:5.5", "7001", "resolved", "", rung=True) == "saved"
        await asyncio.gather(here.put(record("5.5")), there.put(record("5.5")))
    finally:
        await other.aclose()
    assert [(r["record_key"], r.get("disposition")) for r in outbox.sent] == \
        [("call:5.4", "sale"), ("call:5.5", "resolved")]
    assert await redis.keys("t:web:*") == [KEYS.web_online("7001")]


@pytest.mark.parametrize(("late_s", "told", "sent"), [
    (0.0, "gone", ["call:5.6"]),
    (3600.0, "updated", ["call:5.6", "call:5.6:disposition"]),
])
async def test_a_disposition_given_while_its_record_is_released_is_not_told_saved(
    redis: aioredis.Redis, redis_url: str, late_s: float, told: str, sent: list[str],
) -> None:
    """Late dispositions off: the agent saves while another instance is sending the held
    record without it (it had looked for one just before). The save waits for that
    release and answers ``gone`` (the page says it came too late), not ``saved`` for a
    disposition no record carries; with late dispositions on it is the update."""
    outbox = Outbox(redis)
    answers: list[str] = []
    here = Wrapup(redis, KEYS, outbox.enqueue, 60, late_s=late_s)

    async def slow_enqueue(rec: Mapping[str, Any]) -> str:
        """The other instance's enqueue, during which the agent saves here."""
        task = asyncio.create_task(here.dispose("call:5.6", "7001", "sale", ""))
        await asyncio.sleep(0.2)  # the save is stored and waits for the release
        assert not task.done()
        result = await outbox.enqueue(rec)
        task.add_done_callback(lambda t: answers.append(t.result()))
        return result

    other = aioredis.Redis.from_url(redis_url, decode_responses=True)
    there = Wrapup(other, KEYS, slow_enqueue, 60, late_s=late_s)
    try:
        await here.mark_online(["7001"])
        assert await here.put(record("5.6")) == "held"
        assert await there.release_due(now=2e9) == 1
        await wait_for(lambda: bool(answers))
    finally:
        await other.aclose()
    assert answers == [told]
    assert [r["record_key"] for r in outbox.sent] == sent
    assert "disposition" not in outbox.sent[0]
    assert await redis.exists(KEYS.web_disposition("call:5.6", "7001")) == 0


async def test_a_late_disposition_outliving_the_outbox_dedupe_is_still_an_update(
    redis: aioredis.Redis,
) -> None:
    """The call's copy is kept for late dispositions longer than the outbox remembers the
    record (outbox.dedupe_ttl_s below web.late_disposition_s): the disposition is still
    the update of the sent activity, not kept for a record that was sent long ago."""
    outbox = Outbox(redis)
    wrap = Wrapup(redis, KEYS, outbox.enqueue, 60, late_s=30 * 86400)
    assert await wrap.put(record("6.2")) == "enqueued"
    await redis.delete(KEYS.outbox_dedupe("call:6.2"))  # its dedupe key expired
    assert await wrap.dispose("call:6.2", "7001", "sale", "") == "updated"
    assert [r["record_key"] for r in outbox.sent] == ["call:6.2", "call:6.2:disposition"]
    assert await redis.exists(KEYS.web_disposition("call:6.2", "7001")) == 0


class _ClaimsAfter(Wrapup):
    """A Wrapup whose next release-lock claim first lets ``before`` run: what another
    instance does between this one's look at Redis and its claim of the call."""

    before: Any = None

    async def _claim(self, key: str, *, wait: bool) -> str | None:
        before, self.before = self.before, None
        if before is not None:
            await before()
        return await super()._claim(key, wait=wait)


@pytest.mark.parametrize("late_s", [0.0, 3600.0])
async def test_a_disposition_saved_as_the_record_comes_with_no_page_open_goes_with_it(
    redis: aioredis.Redis, redis_url: str, late_s: float,
) -> None:
    """The agent's page is not open as the record comes (it was just closed), so the
    record goes at once; the agent's disposition is saved on another instance between
    this one's look for a disposition (none yet) and its send. It was answered "saved",
    so the record takes it: it goes once, with it, and nothing is left behind."""
    outbox = Outbox(redis)
    other = aioredis.Redis.from_url(redis_url, decode_responses=True)
    here = _ClaimsAfter(redis, KEYS, outbox.enqueue, 60, late_s=late_s)
    there = Wrapup(other, KEYS, outbox.enqueue, 60, late_s=late_s)
    told: list[str] = []

    async def agent_saves() -> None:
        told.append(await there.dispose("call:7.1", "7001", "sale", "note", rung=True))

    here.before = agent_saves
    try:
        assert await here.put(record("7.1")) == "enqueued"
    finally:
        await other.aclose()
    assert told == ["saved"]
    assert [(r["record_key"], r.get("disposition"), r.get("disposition_note"))
            for r in outbox.sent] == [("call:7.1", "sale", "note")]
    assert await redis.keys("t:web:*") == []
