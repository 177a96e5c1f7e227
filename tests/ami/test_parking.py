"""Calls in progress across a restart: the tracker's saved states (parked at shutdown,
checkpointed as calls go), picked up again or posted once at the next start, kept in a
real Redis by :class:`ami.parking.CallParking`."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from ami.parking import CallParking
from ami.protocol import Message
from ami.records import CallRecord
from ami.tracker import CallTracker, extension_agent
from router.crypto import KeyRing
from router.keys import Keys
from tests.ami.helpers import parse
from tests.ami.test_tracker import BASIC, without_cdrs
from tests.redis_server import RedisServer

CALL_2 = "1795338363.4"  # owner 7009 busy, then queue vip, 7101 answers
KEYS = Keys(prefix="park-test:")
SCOPE = "10.0.0.5:5038"


@pytest.fixture
def basic(fixtures_dir: Path) -> list[Message]:
    return parse((fixtures_dir / "ami-basic.raw").read_bytes())


def cut_at(messages: list[Message], event: str, linkedid: str) -> int:
    """The index just after the first ``event`` of the call ``linkedid``."""
    return next(i for i, m in enumerate(messages)
                if m.event == event and m.get("Linkedid") == linkedid) + 1


def channels_up(messages: Iterable[Message]) -> list[Message]:
    """What ``CoreShowChannels`` would list after these events (one per live channel)."""
    live: dict[str, dict[str, str]] = {}
    for m in messages:
        uid = m.get("Uniqueid")
        if not uid or not m.get("Channel"):
            continue
        if m.event == "Hangup":
            live.pop(uid, None)
        elif m.event == "Newchannel" or uid in live:
            live[uid] = {"Event": "CoreShowChannel", "Uniqueid": uid,
                         "Linkedid": m.get("Linkedid") or uid,
                         "Channel": m.get("Newname") or m.get("Channel") or "",
                         "CallerIDNum": m.get("CallerIDNum") or "",
                         "Exten": m.get("Exten") or ""}
    return [Message(h) for h in live.values()]


def tracker_into(records: list[CallRecord], clock: float = 1_000.0) -> CallTracker:
    return CallTracker(records.append, region="CN", agent_for_device=extension_agent,
                       clock=lambda: clock)


def record_of(records: list[CallRecord], linkedid: str) -> CallRecord:
    (record,) = [r for r in records if r.linkedid == linkedid]
    return record


# --- the tracker ---------------------------------------------------------------------------

def test_a_parked_call_picked_up_again_gets_the_record_of_a_call_followed_throughout(
        basic: list[Message]) -> None:
    """Parked while the caller waits in the queue (its owner was rung and busy), picked
    up again from CoreShowChannels by a new tracker with its saved state: the record is
    the one a tracker that never stopped builds, routing and agents rung included, but
    flagged incomplete (events may have been missed between the two runs)."""
    cut = cut_at(basic, "QueueCallerJoin", CALL_2)
    before: list[CallRecord] = []
    first = tracker_into(before)
    first.handle_all(basic[:cut])
    states = first.open_states()
    assert list(states) == [CALL_2]
    assert first.close(parked=set(states)) == 0
    assert [r.linkedid for r in before] == ["1795338333.0"]

    after: list[CallRecord] = []
    second = tracker_into(after)
    assert second.expect_parked(states) == []
    second.resync(channels_up(basic[:cut]))
    assert second.take_parked_gone() == {}
    assert second.parked_adopted == 1
    second.handle_all(basic[cut:])
    second.flush()
    record = record_of(after, CALL_2).model_dump(mode="json")
    assert without_cdrs(record) == {**BASIC[1], "incomplete": True}
    assert [c["UniqueID"] for c in record["cdrs"]] == [
        "1795338363.7", "1795338363.9", "1795338363.4", "1795338363.5", "1795338363.5"]


def test_without_its_parked_state_the_picked_up_call_misses_the_routing(
        basic: list[Message]) -> None:
    """The control: the same call adopted without a saved state knows neither the route
    nor the owner it rang first (what parking keeps)."""
    cut = cut_at(basic, "QueueCallerJoin", CALL_2)
    records: list[CallRecord] = []
    tracker = tracker_into(records)
    tracker.resync(channels_up(basic[:cut]))
    tracker.handle_all(basic[cut:])
    tracker.flush()
    record = record_of(records, CALL_2)
    assert (record.route_target, record.route_queue) == (None, None)
    assert record.agents_rung == ["Local/7101@agents"]


def test_a_parked_call_that_ended_meanwhile_is_posted_from_its_state(
        basic: list[Message]) -> None:
    """A parked call Asterisk no longer shows ended while nobody followed it: its record
    is built from the saved state, flagged incomplete, with the caller, DID, route and
    start it had, ending at the last moment it was known to be up."""
    cut = cut_at(basic, "AgentConnect", CALL_2)
    first = tracker_into([])
    first.handle_all(basic[:cut])
    state = {**first.open_states()[CALL_2], "saved_at": 1_010.0}
    records: list[CallRecord] = []
    second = tracker_into(records, clock=2_000.0)
    second.expect_parked({CALL_2: state})
    second.resync([])
    gone = second.take_parked_gone()
    assert list(gone) == [CALL_2]
    assert second.post_parked(CALL_2, gone[CALL_2], last_seen=1_030.0)
    assert not second.post_parked(CALL_2, gone[CALL_2])  # once
    record = record_of(records, CALL_2)
    assert record.incomplete
    assert (record.caller, record.did, record.route_target, record.route_queue) == (
        "+8613900139000", "4008001000", "Local/7009@agents", "vip")
    assert (record.outcome, record.answered_by) == ("answered", "Local/7101@agents")
    assert record.agents_rung == ["Local/7009@agents", "Local/7101@agents"]
    assert record.start is not None
    assert record.end is not None
    # Asterisk's clock (the Cdrs of the legs that ended before: Local/7009's from
    # 09:06:03), and the end on the same clock: up until last seen, 30 s after the
    # call was first seen
    assert record.start.isoformat() == "2026-11-22T09:06:03+00:00"
    assert (record.end - record.start).total_seconds() == pytest.approx(30.0, abs=1.0)


def test_a_state_loaded_late_is_merged_into_the_call_already_followed(
        basic: list[Message]) -> None:
    """Redis was down at start: the call was adopted without its state; the state read
    later gives it the route. States of calls whose records this run already emitted
    are returned as spent."""
    cut = cut_at(basic, "QueueCallerJoin", CALL_2)
    first = tracker_into([])
    first.handle_all(basic[:cut])
    states = first.open_states()
    records: list[CallRecord] = []
    second = tracker_into(records)
    second.resync(channels_up(basic[:cut]))
    second.handle_all(basic[cut:])  # calls 2 (adopted), 3 and 4 end
    second.flush()
    call_3 = first_of(basic, "1795338393.10")
    spent = second.expect_parked({**states, "1795338393.10": call_3})
    assert spent == [CALL_2, "1795338393.10"]
    assert second.take_parked_gone() == {}
    third: list[CallRecord] = []
    tracker = tracker_into(third)
    tracker.resync(channels_up(basic[:cut]))
    assert tracker.expect_parked(states) == []  # the call is open: merged now
    tracker.handle_all(basic[cut:])
    tracker.flush()
    assert record_of(third, CALL_2).route_target == "Local/7009@agents"


def first_of(messages: list[Message], linkedid: str) -> dict[str, Any]:
    """A saved state of a call after its first events."""
    tracker = tracker_into([])
    tracker.handle_all(m for m in messages if m.get("Linkedid") == linkedid and
                       m.event == "Newchannel")
    return tracker.open_states()[linkedid]


def test_an_unreadable_state_changes_nothing_and_a_wrong_call_is_refused(
        basic: list[Message], caplog: pytest.LogCaptureFixture) -> None:
    """A saved state of another version (or call) is logged and ignored: the call is
    followed as any adopted call."""
    cut = cut_at(basic, "QueueCallerJoin", CALL_2)
    first = tracker_into([])
    first.handle_all(basic[:cut])
    state = first.open_states()[CALL_2]
    records: list[CallRecord] = []
    second = tracker_into(records)
    second.expect_parked({CALL_2: {**state, "v": 99}})
    with caplog.at_level(logging.ERROR, logger="ami.tracker"):
        second.resync(channels_up(basic[:cut]))
    assert "unreadable" in caplog.text
    assert second.parked_adopted == 0
    second.handle_all(basic[cut:])
    second.flush()
    assert record_of(records, CALL_2).route_target is None


def test_checkpoints_name_calls_changed_in_a_way_their_record_shows(
        basic: list[Message]) -> None:
    """Only calls whose record changed are checkpointed, each once however many events,
    and none once finalised; a VarSet of a variable the record ignores marks nothing."""
    tracker = tracker_into([])
    cut = cut_at(basic, "QueueCallerJoin", CALL_2)
    tracker.handle_all(basic[:cut])
    assert list(tracker.checkpoints()) == [CALL_2]
    assert tracker.checkpoints() == {}
    tracker.handle(Message({"Event": "VarSet", "Uniqueid": "1795338363.5",
                            "Linkedid": CALL_2, "Channel": "Local/x;2",
                            "Variable": "BRIDGEPEER", "Value": "x"}))
    assert tracker.checkpoints() == {}
    tracker.handle(Message({"Event": "VarSet", "Uniqueid": "1795338363.5",
                            "Linkedid": CALL_2, "Channel": "Local/x;2",
                            "Variable": "QUEUEWAIT_MS", "Value": "10"}))
    assert list(tracker.checkpoints()) == [CALL_2]
    tracker.touch([CALL_2, "nosuch.1"])
    assert list(tracker.checkpoints()) == [CALL_2]
    tracker.touch([CALL_2, "1795338363.4"])
    for lid in ("7.1", "8.1"):
        tracker.handle(Message({"Event": "Newchannel", "Uniqueid": lid, "Linkedid": lid,
                                "Channel": f"PJSIP/t-{lid}"}))
    taken = [*tracker.checkpoints(limit=2), *tracker.checkpoints(limit=2)]
    assert sorted(taken) == [CALL_2, "7.1", "8.1"]  # the rest wait for the next round
    assert tracker.checkpoints() == {}
    tracker.handle_all(basic[cut:])
    tracker.flush()
    tracker.touch([CALL_2])
    assert tracker.checkpoints() == {}


# --- CallParking on a real Redis -----------------------------------------------------------

@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client: Redis = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


CRYPTO = KeyRing({"k1": base64.b64decode(base64.b64encode(b"k" * 32))})


class Clock:
    def __init__(self, now: float = 5_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def parking_of(redis: Redis, tracker: CallTracker, clock: Clock | None = None,
               scope: str = SCOPE, crypto: KeyRing = CRYPTO) -> CallParking:
    return CallParking(redis, KEYS, scope, tracker, crypto, settle_s=3.0, timeout_s=1.0,
                       clock=clock or Clock())


async def stored(redis: Redis, scope: str = SCOPE) -> dict[str, str]:
    return dict(await redis.hgetall(KEYS.parked_calls(scope)))


async def test_checkpoints_are_sealed_in_redis_and_go_once_the_record_is_stored(
        redis: Redis, basic: list[Message]) -> None:
    """A tick writes the changed calls, encrypted for their hash and field (the saved
    time beside the state), and the alive mark; a released call's state is removed."""
    tracker = tracker_into([])
    parking = parking_of(redis, tracker)
    assert await parking.load()
    tracker.handle_all(basic[:cut_at(basic, "QueueCallerJoin", CALL_2)])
    await parking.tick()
    saved = await stored(redis)
    assert list(saved) == [CALL_2]
    assert saved[CALL_2].startswith("enc1:k1:")
    assert "4008001000" not in saved[CALL_2]
    state = parking.open(CALL_2, saved[CALL_2])
    assert (state["saved_at"], state["parked"], state["vars"]["ROUTE_QUEUE"]) == (
        5_000.0, False, "vip")
    assert await redis.get(KEYS.parked_alive(SCOPE)) == "5000.000"
    with pytest.raises(ValueError, match="does not decrypt"):
        parking.open("1795338333.0", saved[CALL_2])  # bound to its field
    parking.released(CALL_2)
    await parking.tick()
    assert await stored(redis) == {}


async def test_parked_at_shutdown_then_picked_up_again_at_start(
        redis: Redis, basic: list[Message], caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM with a caller in the queue: the call is parked (one log line), the
    tracker posts nothing for it; the next run reads it before AMI, the resync picks it
    up, the start line says so, and the call's one record is the real one; once stored,
    its state goes."""
    cut = cut_at(basic, "QueueCallerJoin", CALL_2)
    before: list[CallRecord] = []
    first = tracker_into(before)
    parking = parking_of(redis, first)
    assert await parking.load()
    first.handle_all(basic[:cut])
    with caplog.at_level(logging.INFO, logger="ami.parking"):
        parked = await parking.park()
    assert parked == {CALL_2}
    assert "shutdown: 1 call(s) in progress parked" in caplog.text
    first.close(parked)
    assert CALL_2 not in [r.linkedid for r in before]
    assert parking.open(CALL_2, (await stored(redis))[CALL_2])["parked"] is True

    after: list[CallRecord] = []
    second = tracker_into(after)
    restarted = parking_of(redis, second)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ami.parking"):
        assert await restarted.load()
        second.resync(channels_up(basic[:cut]))
        restarted.on_resync()
    assert "1 found, 1 still up (picked up again: their records follow), 0 ended" \
        in caplog.text
    second.handle_all(basic[cut:])
    second.flush()
    record = record_of(after, CALL_2)
    assert (record.outcome, record.answered_by, record.route_target) == (
        "answered", "Local/7101@agents", "Local/7009@agents")
    restarted.released(CALL_2)
    await restarted.tick()
    assert await stored(redis) == {}


async def killed_mid_call(redis: Redis, basic: list[Message], cut: int) -> Clock:
    """A first run follows the events before ``cut``, checkpoints them at t=5000, is alive
    at 5020 (nothing changed: only the alive mark moves on) and is killed; its clock."""
    first = tracker_into([])
    clock = Clock(5_000.0)
    parking = parking_of(redis, first, clock)
    assert await parking.load()
    first.handle_all(basic[:cut])
    await parking.tick()
    clock.now = 5_020.0
    await parking.tick()
    return clock


async def test_a_parked_call_that_ended_meanwhile_is_posted_once_after_the_settle_time(
        redis: Redis, basic: list[Message], caplog: pytest.LogCaptureFixture) -> None:
    """Killed mid-call (its last checkpoint in Redis), the call ended while callroute was
    down: the restarted run posts nothing before ``settle_s``, then one incomplete record
    from the state, ending when the killed run was last alive; the start line counts it.
    Posted again by a third run (a kill before the removal), it is the same record_key:
    the outbox keeps one."""
    cut = cut_at(basic, "AgentConnect", CALL_2)
    clock = await killed_mid_call(redis, basic, cut)

    records: list[CallRecord] = []
    second = tracker_into(records)
    clock.now = 6_000.0
    restarted = parking_of(redis, second, clock)
    with caplog.at_level(logging.INFO, logger="ami.parking"):
        assert await restarted.load()
        second.resync([])
        restarted.on_resync()
        await restarted.tick()
        assert records == []
        clock.now = 6_003.0
        await restarted.tick()
    record = record_of(records, CALL_2)
    assert record.incomplete
    assert record.record_key == f"call:{CALL_2}"
    assert record.end is not None
    assert record.start is not None
    # first seen at 1000 (the replay's clock), up until 5020 when the killed run was
    # last alive
    assert (record.end - record.start).total_seconds() == pytest.approx(4_020.0, abs=1.0)
    assert "1 found, 0 still up (picked up again: their records follow), 1 ended " \
        "meanwhile (posted as incomplete)" in caplog.text
    await restarted.tick()
    assert len(records) == 1
    restarted.released(CALL_2)
    await restarted.tick()
    assert await stored(redis) == {}


async def test_a_state_removed_by_another_instance_meanwhile_is_not_posted(
        redis: Redis, basic: list[Message]) -> None:
    """Another instance following the same Asterisk stored the call's real record while
    this one waited ``settle_s``, and removed its state: nothing is posted here."""
    cut = cut_at(basic, "AgentConnect", CALL_2)
    first = tracker_into([])
    parking = parking_of(redis, first)
    assert await parking.load()
    first.handle_all(basic[:cut])
    await parking.tick()

    records: list[CallRecord] = []
    second = tracker_into(records)
    clock = Clock(6_000.0)
    restarted = parking_of(redis, second, clock)
    assert await restarted.load()
    second.resync([])
    restarted.on_resync()
    parking.released(CALL_2)  # the other instance's record is stored
    await parking.tick()
    clock.now = 6_010.0
    await restarted.tick()
    assert records == []


async def test_states_of_another_asterisk_are_left_to_its_instances(
        redis: Redis, basic: list[Message]) -> None:
    """A run following another Asterisk (another AMI address) never sees, posts or
    removes this one's states."""
    first = tracker_into([])
    parking = parking_of(redis, first)
    assert await parking.load()
    first.handle_all(basic[:cut_at(basic, "AgentConnect", CALL_2)])
    await parking.tick()
    records: list[CallRecord] = []
    other = tracker_into(records)
    clock = Clock()
    elsewhere = parking_of(redis, other, clock, scope="10.0.0.6:5038")
    assert await elsewhere.load()
    other.resync([])
    elsewhere.on_resync()
    clock.now += 10
    await elsewhere.tick()
    assert records == []
    assert list(await stored(redis)) == [CALL_2]


async def test_a_state_that_does_not_open_is_left_in_redis(
        redis: Redis, basic: list[Message], caplog: pytest.LogCaptureFixture) -> None:
    """A state sealed with a key no longer configured: logged (Linkedid only) and left
    where it is, for when the key is back; nothing is posted for it."""
    first = tracker_into([])
    parking = parking_of(redis, first)
    assert await parking.load()
    first.handle_all(basic[:cut_at(basic, "AgentConnect", CALL_2)])
    await parking.tick()
    records: list[CallRecord] = []
    second = tracker_into(records)
    other_key = KeyRing({"k2": b"z" * 32})
    restarted = parking_of(redis, second, crypto=other_key)
    with caplog.at_level(logging.ERROR, logger="ami.parking"):
        assert await restarted.load()
    assert f"the parked state of call {CALL_2} does not decrypt" in caplog.text
    second.resync([])
    restarted.on_resync()
    assert records == []
    assert list(await stored(redis)) == [CALL_2]


async def test_redis_down_at_shutdown_posts_the_calls_as_incomplete(
        own_redis: RedisServer, basic: list[Message], caplog: pytest.LogCaptureFixture
) -> None:
    """Parking fails (Redis down): a warning, nothing parked, and the tracker posts the
    calls still up as incomplete, as before parking existed: no record is lost."""
    client: Redis = Redis.from_url(own_redis.url, decode_responses=True,
                                   socket_connect_timeout=0.2, socket_timeout=0.5)
    records: list[CallRecord] = []
    tracker = tracker_into(records)
    parking = parking_of(client, tracker)
    try:
        assert await parking.load()
        tracker.handle_all(basic[:cut_at(basic, "QueueCallerJoin", CALL_2)])
        own_redis.stop()
        with caplog.at_level(logging.WARNING, logger="ami.parking"):
            parked = await parking.park()
        assert parked == set()
        assert "1 call(s) in progress could not be parked" in caplog.text
        tracker.close(parked)
        assert record_of(records, CALL_2).incomplete
    finally:
        await client.aclose()


async def test_parking_that_fails_unforeseen_posts_the_calls_as_incomplete(
        redis: Redis, basic: list[Message], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An unforeseen error while parking (here: the tracker's states cannot be taken) is
    logged with its traceback and nothing is parked, so the tracker posts the calls still
    up as incomplete: shutdown goes on and no record is lost."""
    records: list[CallRecord] = []
    tracker = tracker_into(records)
    parking = parking_of(redis, tracker)
    assert await parking.load()
    tracker.handle_all(basic[:cut_at(basic, "QueueCallerJoin", CALL_2)])

    def broken() -> dict[str, Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(tracker, "open_states", broken)
    with caplog.at_level(logging.ERROR, logger="ami.parking"):
        parked = await parking.park()
    assert parked == set()
    assert "parking the calls in progress failed" in caplog.text
    tracker.close(parked)
    assert record_of(records, CALL_2).incomplete

async def test_redis_down_at_start_decides_the_parked_calls_once_it_is_back(
        own_redis: RedisServer, basic: list[Message]) -> None:
    """The states cannot be read at start: nothing is written over them meanwhile (a
    call picked up without its state would overwrite it); once Redis is back the next
    tick reads them and gives the picked-up call its route."""
    client: Redis = Redis.from_url(own_redis.url, decode_responses=True,
                                   socket_connect_timeout=0.2, socket_timeout=0.5)
    try:
        cut = cut_at(basic, "QueueCallerJoin", CALL_2)
        first = tracker_into([])
        parking = parking_of(client, first)
        assert await parking.load()
        first.handle_all(basic[:cut])
        assert await parking.park() == {CALL_2}
        kept = await stored(client)
        own_redis.stop()  # (this test Redis keeps no data: put back below)

        records: list[CallRecord] = []
        second = tracker_into(records)
        restarted = parking_of(client, second)
        assert not await restarted.load()
        second.resync(channels_up(basic[:cut]))
        restarted.on_resync()
        await restarted.tick()
        assert not restarted.loaded
        own_redis.start()
        await client.hset(KEYS.parked_calls(SCOPE), mapping=kept)
        await restarted.tick()
        assert restarted.loaded
        second.handle_all(basic[cut:])
        second.flush()
        assert record_of(records, CALL_2).route_target == "Local/7009@agents"
    finally:
        await client.aclose()


# --- bad stored data, bounded rounds -------------------------------------------------------

async def test_states_that_do_not_decode_or_have_wrong_types_are_logged_never_a_crash(
        redis: Redis, redis_url: str, basic: list[Message],
        caplog: pytest.LogCaptureFixture) -> None:
    """Bytes that are no UTF-8, JSON nested too deeply and a state whose times and
    caller are of the wrong types: load and the decision after the resync log them
    (naming the call, never the caller's number) and go on; the undecodable ones are left
    in Redis, the wrong-typed one is posted with what is known, and checkpoints go on."""
    raw: Redis = Redis.from_url(redis_url)  # no decoding: to write bytes that are no text
    try:
        await raw.hset(KEYS.parked_calls(SCOPE), "1.1", b"\xff\xfe not text")
        await raw.hset(KEYS.parked_calls(SCOPE), "2.2", "[" * 100_000 + "]" * 100_000)
    finally:
        await raw.aclose()
    tracker = tracker_into([])
    tracker.handle_all(basic[:cut_at(basic, "AgentConnect", CALL_2)])
    state = {**tracker.open_states()[CALL_2], "caller_num": 13900139000,
             "saved_at": "yesterday"}
    records: list[CallRecord] = []
    second = tracker_into(records)
    clock = Clock()
    parking = parking_of(redis, second, clock)
    await redis.hset(KEYS.parked_calls(SCOPE), CALL_2, parking.seal(CALL_2, state))
    with caplog.at_level(logging.ERROR):
        assert await parking.load()
        second.resync([])
        parking.on_resync()
        clock.now += 10
        await parking.tick()
    assert "the parked state of call 1.1" in caplog.text
    assert "the parked state of call 2.2" in caplog.text
    assert f"the saved state of call {CALL_2} is unreadable" in caplog.text
    assert "13900139000" not in caplog.text
    record = record_of(records, CALL_2)
    assert (record.incomplete, record.did) == (True, "4008001000")
    assert sorted(await redis.hkeys(KEYS.parked_calls(SCOPE))) == ["1.1", CALL_2, "2.2"]
    parking.released(CALL_2)
    second.handle(Message({"Event": "Newchannel", "Uniqueid": "9.9", "Linkedid": "9.9",
                           "Channel": "PJSIP/t-9"}))
    await parking.tick()
    assert sorted(await redis.hkeys(KEYS.parked_calls(SCOPE))) == ["1.1", "2.2", "9.9"]


async def test_the_earlier_run_s_calls_are_read_and_posted_a_bounded_number_at_a_time(
        redis: Redis, basic: list[Message], monkeypatch: pytest.MonkeyPatch) -> None:
    """Many calls of the earlier run: they are read in chunks (other tasks run between
    them) and those that ended meanwhile are posted at most MAX_POSTED_PER_TICK a round, so
    neither the start nor a round holds the event loop for all of them at once."""
    monkeypatch.setattr("ami.parking.MAX_POSTED_PER_TICK", 2)
    state = first_of(basic, "1795338393.10")
    writer = parking_of(redis, tracker_into([]))
    lids = [f"1795338393.{n}" for n in range(600)]
    await redis.hset(KEYS.parked_calls(SCOPE), mapping={
        lid: writer.seal(lid, {**state, "linkedid": lid, "first_uid": lid}) for lid in lids})
    records: list[CallRecord] = []
    tracker = tracker_into(records)
    clock = Clock()
    parking = parking_of(redis, tracker, clock)
    turns = 0
    done = False

    async def other_task() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    opened_at: list[int] = []
    real_open = parking.open

    def open_counting(lid: str, raw: str | bytes) -> dict[str, Any]:
        opened_at.append(turns)
        return real_open(lid, raw)

    parking.open = open_counting  # type: ignore[method-assign]
    task = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    try:
        assert await parking.load()
    finally:
        done = True
        await task
    assert len(opened_at) == 600
    # the load let the loop run other tasks between its chunks of states (about
    # MAX_PER_TICK each: HSCAN's COUNT is a hint)
    assert max(Counter(opened_at).values()) < 300
    tracker.resync([])
    parking.on_resync()
    clock.now += 10
    await parking.tick()
    assert len(records) == 2
    await parking.tick()
    assert len(records) == 4
    for _ in range(298):
        await parking.tick()
    assert sorted(r.linkedid for r in records) == sorted(lids)


async def test_a_failing_round_does_not_stop_the_checkpoints(
        redis: Redis, basic: list[Message], caplog: pytest.LogCaptureFixture) -> None:
    """A round that fails unexpectedly is logged, and the loop goes on: the next round
    saves the calls."""
    tracker = tracker_into([])
    parking = parking_of(redis, tracker)
    parking.interval_s = 0.01
    tracker.handle_all(basic[:cut_at(basic, "QueueCallerJoin", CALL_2)])
    real = tracker.checkpoints
    calls = 0

    def failing_once(limit: int | None = None) -> dict[str, dict[str, Any]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug")
        return real(limit)

    tracker.checkpoints = failing_once  # type: ignore[method-assign]
    stop = asyncio.Event()
    with caplog.at_level(logging.ERROR, logger="ami.parking"):
        task = asyncio.create_task(parking.run(stop))
        for _ in range(200):
            if await stored(redis):
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task
    assert list(await stored(redis)) == [CALL_2]
    assert "call checkpoint round failed" in caplog.text


async def test_a_restart_while_ended_calls_wait_to_be_posted_keeps_their_end(
        redis: Redis, basic: list[Message]) -> None:
    """Killed mid-call; the next run is stopped while the call that ended meanwhile waits
    ``settle_s`` to be posted: the run after posts it ending when the killed run was last
    alive, not when the stopped run was (it never saw the call up)."""
    cut = cut_at(basic, "AgentConnect", CALL_2)
    clock = await killed_mid_call(redis, basic, cut)

    second = tracker_into([])
    clock.now = 6_000.0
    stopped = parking_of(redis, second, clock)
    assert await stopped.load()
    second.resync([])
    stopped.on_resync()
    for now in (6_001.0, 6_002.0):
        clock.now = now
        await stopped.tick()
    assert await stopped.park() == set()  # SIGTERM before settle_s

    records: list[CallRecord] = []
    third = tracker_into(records)
    clock.now = 7_000.0
    restarted = parking_of(redis, third, clock)
    assert await restarted.load()
    third.resync([])
    restarted.on_resync()
    clock.now = 7_010.0
    await restarted.tick()
    record = record_of(records, CALL_2)
    assert record.end is not None
    assert record.start is not None
    assert (record.end - record.start).total_seconds() == pytest.approx(4_020.0, abs=1.0)
