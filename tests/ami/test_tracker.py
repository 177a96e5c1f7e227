"""The call tracker replaying the recorded Asterisk 22 sessions, field by field."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ami.protocol import AmiParser, Message
from ami.records import CallRecord
from ami.tracker import CallTracker, device_of_channel, extension_agent
from router.metrics import REGISTRY
from router.rules.presence import Presence
from tests.ami.helpers import dumps, parse, replay

MONITOR = "/opt/asterisk/var/spool/asterisk/monitor/"

#: What ami-basic.raw shows, read off the recording (see the event numbers in comments).
BASIC = [
    {  # call 1: Dial(Local/7001@agents) answered, recorded, agent hung up
        "record_key": "call:1795338333.0", "linkedid": "1795338333.0",
        "caller": "+8613800138000", "caller_raw": "+8613800138000", "caller_name": "Li Lei",
        "anonymous": False, "degraded": False, "recording_url": None,
        "did": "4008001000", "customer_id": "C-1001", "customer_tier": "gold",
        "customer_owner": None, "customer_kind": None,
        "routing_rule": None, "route_reason": None,
        "route_target": "Local/7001@agents", "route_queue": "vip", "queue": None,
        "agents_rung": ["Local/7001@agents"],
        "answered_by": "Local/7001@agents", "answered_by_agent": "7001",
        "start": "2026-11-22T09:05:33Z", "answer": "2026-11-22T09:05:33Z",
        "end": "2026-11-22T09:05:35Z",
        "wait_s": 0.0,  # Cdr StartTime to AnswerTime (the replay's clock is not Asterisk's)
        "talk_s": 1.503,  # ANSWEREDTIME_MS
        "queue_wait_s": None, "voicemail": None, "voicemail_s": None,
        "outcome": "answered", "hangup_cause": {"code": 16, "text": "Normal Clearing"},
        "recording": MONITOR + "1795338333.1.wav", "incomplete": False,
    },
    {  # call 2: owner 7009 busy, then queue vip, agent 7101 (AgentConnect/AgentComplete)
        "record_key": "call:1795338363.4", "linkedid": "1795338363.4",
        "caller": "+8613900139000", "caller_raw": "13900139000", "caller_name": "Han Meimei",
        "anonymous": False, "degraded": False, "recording_url": None,
        "did": "4008001000", "customer_id": None, "customer_tier": None,
        "customer_owner": None, "customer_kind": None,
        "routing_rule": None, "route_reason": None,
        "route_target": "Local/7009@agents", "route_queue": "vip", "queue": "vip",
        "agents_rung": ["Local/7009@agents", "Local/7101@agents"],
        "answered_by": "Local/7101@agents", "answered_by_agent": "7101",
        "start": "2026-11-22T09:06:03Z", "answer": "2026-11-22T09:06:03Z",
        "end": "2026-11-22T09:06:05Z",
        "wait_s": 0.0,
        "talk_s": 1.504,
        "queue_wait_s": 0.0, "voicemail": None, "voicemail_s": None,  # QUEUEWAIT_MS 0
        "outcome": "answered", "hangup_cause": {"code": 16, "text": "Normal Clearing"},
        "recording": MONITOR + "1795338363.5.wav", "incomplete": False,
    },
    {  # call 3: Dial(7008) NOANSWER after 8 s, queue support rings 7002+7001, 7002 answers
        "record_key": "call:1795338393.10", "linkedid": "1795338393.10",
        "caller": "+862150501234", "caller_raw": "02150501234", "caller_name": None,
        "anonymous": False, "degraded": False, "recording_url": None,
        "did": "4008002000", "customer_id": None, "customer_tier": None,
        "customer_owner": None, "customer_kind": None,
        "routing_rule": None, "route_reason": None,
        "route_target": "Local/7008@agents", "route_queue": "support", "queue": "support",
        "agents_rung": ["Local/7008@agents", "Local/7002@agents", "Local/7001@agents"],
        "answered_by": "Local/7002@agents", "answered_by_agent": "7002",
        "start": "2026-11-22T09:06:33Z", "answer": "2026-11-22T09:06:41Z",
        "end": "2026-11-22T09:06:43Z",
        "wait_s": 8.0,  # 8 s ringing 7008, then the queue
        "talk_s": 1.503,
        "queue_wait_s": 0.0, "voicemail": None, "voicemail_s": None,
        "outcome": "answered", "hangup_cause": {"code": 16, "text": "Normal Clearing"},
        "recording": MONITOR + "1795338393.11.wav", "incomplete": False,
    },
    {  # call 4: caller gave up after 5 s while the AGI was still thinking; ROUTE_TARGET
        # arrived after the caller's leg was gone; no Dial, no queue, no recording
        "record_key": "call:1795338423.18", "linkedid": "1795338423.18",
        "caller": "+8613700137000", "caller_raw": "13700137000", "caller_name": "Slow Case",
        "anonymous": False, "degraded": False, "recording_url": None,
        "did": "4008001000", "customer_id": None, "customer_tier": None,
        "customer_owner": None, "customer_kind": None,
        "routing_rule": None, "route_reason": None,
        "route_target": "Local/7001@agents", "route_queue": None, "queue": None,
        "agents_rung": [], "answered_by": None, "answered_by_agent": None,
        "start": "2026-11-22T09:07:03Z", "answer": None, "end": "2026-11-22T09:07:08Z",
        "wait_s": 5.0, "talk_s": 0.0,
        "queue_wait_s": None, "voicemail": None, "voicemail_s": None,
        "outcome": "abandoned",
        "hangup_cause": {"code": 19, "text": "User alerting, no answer"},
        "recording": None, "incomplete": False,
    },
]
BASIC_CDR_UIDS = [
    ["1795338333.3", "1795338333.0", "1795338333.1"],
    ["1795338363.7", "1795338363.9", "1795338363.4", "1795338363.5", "1795338363.5"],
    ["1795338393.13", "1795338401.17", "1795338401.15", "1795338393.10", "1795338393.11",
     "1795338393.11", "1795338393.11"],
    ["1795338423.18", "1795338423.19"],
]

ABANDON = {
    "record_key": "call:1795338618.96", "linkedid": "1795338618.96",
    "caller": "+8613600136000", "caller_raw": "13600136000", "caller_name": "Impatient",
    "anonymous": False, "degraded": False, "recording_url": None,
    "did": "4008001000", "customer_id": None, "customer_tier": None,
    "customer_owner": None, "customer_kind": None,
    "routing_rule": None, "route_reason": None,
    "route_target": None,  # VarSet ROUTE_TARGET= (empty)
    "route_queue": "empty", "queue": "empty",
    "agents_rung": [], "answered_by": None, "answered_by_agent": None,
    "start": "2026-11-22T09:10:18Z", "answer": None, "end": "2026-11-22T09:10:25Z",
    "wait_s": 7.0,  # Cdr StartTime to EndTime
    "talk_s": 0.0, "outcome": "abandoned",
    "queue_wait_s": 7.0, "voicemail": None, "voicemail_s": None,  # QUEUEWAIT_MS 7000
    "hangup_cause": {"code": 19, "text": "User alerting, no answer"},
    "recording": MONITOR + "1795338618.97.wav", "incomplete": False,
}


@pytest.fixture
def basic(fixtures_dir: Path) -> list[Message]:
    return parse((fixtures_dir / "ami-basic.raw").read_bytes())


@pytest.fixture
def abandon(fixtures_dir: Path) -> list[Message]:
    return parse((fixtures_dir / "ami-abandon.raw").read_bytes())


def without_cdrs(record: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in record.items() if k != "cdrs"}


def test_basic_recording_gives_four_records(basic: list[Message]) -> None:
    """ami-basic.raw yields exactly the four calls, each field as the recording shows it,
    each with the Cdr rows of its own channels."""
    records = dumps(replay(basic))
    assert [without_cdrs(r) for r in records] == BASIC
    for record, uids in zip(records, BASIC_CDR_UIDS, strict=True):
        assert [c["UniqueID"] for c in record["cdrs"]] == uids  # type: ignore[index]
    assert records[0]["cdrs"][0]["Disposition"] == "ANSWERED"  # type: ignore[index]
    json.dumps(records)  # JSON-serialisable as is


def test_abandon_recording(abandon: list[Message]) -> None:
    """ami-abandon.raw: abandoned in the memberless queue `empty` after about 7 s."""
    (record,) = dumps(replay(abandon))
    assert without_cdrs(record) == ABANDON
    assert [c["LastApplication"] for c in record["cdrs"]] == ["Queue", "AppDial2"]  # type: ignore[index]


def test_records_are_emitted_without_flush_once_cdrs_are_in(basic: list[Message]) -> None:
    """A call whose channels are gone and whose Cdrs are all in is finalised by the next
    event: the four calls of ami-basic come out without any flush."""
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: 0.0)
    tracker.handle_all(basic)
    assert [r.linkedid for r in records] == [c["linkedid"] for c in BASIC]
    assert tracker.open_calls == []


def test_cdr_after_hangup_is_awaited(abandon: list[Message]) -> None:
    """The abandon call's Cdrs come after both Hangups: no record at the last Hangup, the
    record (with both Cdrs) once they are in and another event arrives."""
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: 0.0)
    last_hangup = max(i for i, m in enumerate(abandon) if m.event == "Hangup")
    tracker.handle_all(abandon[: last_hangup + 1])
    assert records == []
    cdrs = [i for i, m in enumerate(abandon) if m.event == "Cdr"]
    assert min(cdrs) > last_hangup
    tracker.handle_all(abandon[last_hangup + 1 : max(cdrs) + 1])
    assert records == []  # the last Cdr could still be followed by more for the call
    tracker.handle(abandon[max(cdrs) + 1])
    assert len(records) == 1
    assert len(records[0].cdrs) == 2


def test_without_cdrs_the_grace_period_finalises(abandon: list[Message]) -> None:
    """With Cdr events off, a closed call waits cdr_grace_s and is then finalised by flush."""
    now = [100.0]
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: now[0], cdr_grace_s=2.0)
    tracker.handle_all(m for m in abandon if m.event != "Cdr")
    assert tracker.flush(101.0) == 0
    assert records == []
    assert tracker.flush(102.5) == 1
    assert records[0].outcome == "abandoned"
    assert records[0].cdrs == []
    # without Cdrs the times come from the events, put on Asterisk's clock by the
    # Linkedid's epoch (this test's clock, 100.0, is not Asterisk's)
    assert records[0].start is not None
    assert int(records[0].start.timestamp()) == 1795338618
    assert records[0].queue_wait_s == 7.0  # QUEUEWAIT_MS: Asterisk's own measure


def test_garbage_between_events_changes_nothing(fixtures_dir: Path) -> None:
    """Garbage blocks and unknown events between the real ones are counted and skipped;
    the records are identical to the clean replay."""
    data = (fixtures_dir / "ami-basic.raw").read_bytes()
    banner, _, rest = data.partition(b"\r\n")
    blocks = rest.split(b"\r\n\r\n")
    junk = [
        b"\x00\xff\xfe not a header line",
        b"NoColonHere",
        b"Key: value without type",
        b"Event: TotallyUnknownEvent\r\nUniqueid: 42.42\r\nLinkedid: 1795338333.0",
        b"Event: Hangup\r\nX: " + b"z" * 20_000,
    ]
    rng = random.Random(3)
    mixed: list[bytes] = []
    for block in blocks:
        mixed.append(block)
        if rng.random() < 0.2:
            mixed.append(rng.choice(junk[:3] + junk[4:]))
    dirty = banner + b"\r\n" + b"\r\n\r\n".join(mixed)
    parser = AmiParser(max_line_bytes=8192)
    messages = parser.feed(dirty)
    parser.feed_eof()
    assert parser.bad_messages == sum(1 for b in mixed if b in junk)
    assert parser.bad_messages > 10
    assert dumps(replay(messages)) == dumps(replay(parse(data)))
    # an unknown event naming an unknown channel of a live call: ignored by the handlers
    unknown = parse(banner + b"\r\n" + junk[3] + b"\r\n\r\n")
    assert unknown[0].event == "TotallyUnknownEvent"


def test_an_event_naming_no_channel_cannot_hold_a_call_open(basic: list[Message]) -> None:
    """A malformed event with the Uniqueid of a channel never seen and a live call's
    Linkedid, but no channel (no Channel header, as no real channel event lacks), is not
    taken for a channel of that call: the call still ends with its last hangup and gives
    the same record as without it."""
    ghost = Message({"Event": "TotallyUnknownEvent", "Uniqueid": "42.42",
                     "Linkedid": "1795338333.0"})
    at = next(i for i, m in enumerate(basic) if m.event == "DialBegin")
    assert dumps(replay([*basic[:at], ghost, *basic[at:]])) == dumps(replay(basic))


def test_random_chunks_give_the_same_records(fixtures_dir: Path) -> None:
    """Parsing the recording fed in random chunk sizes gives the same records."""
    data = (fixtures_dir / "ami-basic.raw").read_bytes()
    expected = dumps(replay(parse(data)))
    rng = random.Random(11)
    parser = AmiParser()
    messages: list[Message] = []
    i = 0
    while i < len(data):
        n = rng.choice((1, 2, 3, 7, 64, 1000, 4096))
        messages += parser.feed(data[i : i + n])
        i += n
    assert dumps(replay(messages)) == expected


def test_one_record_per_linkedid_even_if_replayed_twice(basic: list[Message]) -> None:
    """Replaying the same events again (same Linkedids) never emits a second record."""
    assert len(replay(basic + basic)) == 4


def test_presence_is_fed(basic: list[Message]) -> None:
    """DeviceStateChange and QueueMemberStatus update presence: INUSE while 7001 talks,
    NOT_INUSE at the end; Queue: pseudo-devices are not devices."""
    presence = Presence()
    connect = next(i for i, m in enumerate(basic) if m.event == "BridgeEnter")
    replay(basic[:connect], presence=presence)
    assert presence.state("Local/7001@agents") == "INUSE"
    assert not presence.available("Local/7001@agents/n")
    presence = Presence()
    replay(basic, presence=presence)
    assert presence.state("Local/7001@agents") == "NOT_INUSE"
    assert presence.state("Local/7101@agents/n") == "NOT_INUSE"
    assert not any(d.startswith("Queue:") for d in presence.snapshot())


def test_resync_finalises_vanished_calls_and_adopts_unknown(basic: list[Message]) -> None:
    """After a disconnection, an open call absent from CoreShowChannels is finalised as
    incomplete at once; a channel of an unknown call is adopted (incomplete)."""
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: 5.0)
    mid_call_2 = next(i for i, m in enumerate(basic) if m.event == "AgentConnect")
    tracker.handle_all(basic[:mid_call_2])
    assert tracker.open_calls == ["1795338363.4"]
    assert tracker.mark_disconnected() == ["1795338363.4"]
    stranger = Message({
        "Event": "CoreShowChannel", "Channel": "PJSIP/trunk-00000001", "Uniqueid": "9.1",
        "Linkedid": "9.1", "CallerIDNum": "13800138000", "CallerIDName": "<unknown>",
        "Exten": "4008001000",
    })
    affected = tracker.resync([stranger], [])
    assert affected == ["1795338363.4", "9.1"]
    assert [r.linkedid for r in records][-1] == "1795338363.4"
    assert records[-1].incomplete
    assert tracker.open_calls == ["9.1"]
    tracker.handle(Message({"Event": "Hangup", "Uniqueid": "9.1", "Linkedid": "9.1",
                            "Channel": "PJSIP/trunk-00000001", "Cause": "16",
                            "Cause-txt": "Normal Clearing"}))
    tracker.flush()
    adopted = records[-1]
    assert (adopted.linkedid, adopted.incomplete, adopted.caller, adopted.did) == (
        "9.1", True, "+8613800138000", "4008001000")
    assert adopted.outcome == "abandoned"


def test_open_calls_are_bounded() -> None:
    """Past max_open_calls the oldest call is finalised as incomplete (never dropped)."""
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: 0.0, max_open_calls=2)
    for n in range(3):
        tracker.handle(Message({"Event": "Newchannel", "Uniqueid": f"{n}.0",
                                "Linkedid": f"{n}.0", "Channel": f"PJSIP/a-{n}"}))
    assert tracker.open_calls == ["1.0", "2.0"]
    assert [(r.linkedid, r.incomplete) for r in records] == [("0.0", True)]
    assert tracker.close() == 2
    assert [r.linkedid for r in records] == ["0.0", "1.0", "2.0"]


def test_linkedid_change_is_followed() -> None:
    """A channel whose Linkedid changes (transfer) moves to the new call; the old call
    closes when its last channel leaves."""
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: 0.0, cdr_grace_s=0)
    ev = [
        {"Event": "Newchannel", "Uniqueid": "1.0", "Linkedid": "1.0", "Channel": "PJSIP/a-1",
         "CallerIDNum": "13800138000"},
        {"Event": "Newchannel", "Uniqueid": "2.0", "Linkedid": "2.0", "Channel": "PJSIP/b-2",
         "CallerIDNum": "13900139000"},
        {"Event": "Newstate", "Uniqueid": "1.0", "Linkedid": "2.0", "Channel": "PJSIP/a-1"},
        {"Event": "Hangup", "Uniqueid": "1.0", "Linkedid": "2.0", "Channel": "PJSIP/a-1",
         "Cause": "16", "Cause-txt": "Normal Clearing"},
        {"Event": "Hangup", "Uniqueid": "2.0", "Linkedid": "2.0", "Channel": "PJSIP/b-2",
         "Cause": "16", "Cause-txt": "Normal Clearing"},
    ]
    for h in ev[:3]:
        tracker.handle(Message(h))
    tracker.flush(10.0)
    assert [r.linkedid for r in records] == ["1.0"]  # its only channel moved away
    for h in ev[3:]:
        tracker.handle(Message(h))
    tracker.flush(10.0)
    assert [r.linkedid for r in records] == ["1.0", "2.0"]
    assert records[1].caller == "+8613900139000"


def test_device_names() -> None:
    """Channel names map to devices; the extension resolver gives agent ids."""
    assert device_of_channel("Local/7001@agents-00000001;1") == "Local/7001@agents"
    assert device_of_channel("PJSIP/7001-0000002a") == "PJSIP/7001"
    assert device_of_channel(None) is None
    assert extension_agent("Local/7101@agents") == "7101"
    assert extension_agent("PJSIP/7002") == "7002"


def test_consumer_failure_does_not_break_tracking(basic: list[Message]) -> None:
    """A record consumer that raises is logged; later calls are still tracked."""
    seen: list[str] = []

    def flaky(record: CallRecord) -> None:
        seen.append(record.linkedid)
        if len(seen) == 1:
            raise RuntimeError("boom")

    tracker = CallTracker(flaky, clock=lambda: 0.0)
    tracker.handle_all(basic)
    tracker.flush()
    assert len(seen) == 4
    assert REGISTRY.get_sample_value("callroute_ami_events_total") is not None


def test_the_routers_crm_kind_and_owner_go_on_the_record(basic: list[Message]) -> None:
    """CRM_KIND and CRM_OWNER set by the router (VarSet on the caller's channel, beside
    CRM_CUSTOMER_ID) become the record's customer_kind and customer_owner: a lead's
    record says so and is posted on the lead object."""
    index = next(i for i, m in enumerate(basic)
                 if m.event == "VarSet" and m.get("Variable") == "CRM_CUSTOMER_ID")
    found = basic[index]
    extra = [Message({**found.headers, "Variable": name, "Value": value})
             for name, value in (("CRM_KIND", "lead"), ("CRM_OWNER", "31000002"))]
    records = dumps(replay(basic[: index + 1] + extra + basic[index + 1:]))
    assert (records[0]["customer_id"], records[0]["customer_kind"],
            records[0]["customer_owner"]) == ("C-1001", "lead", "31000002")
    assert [r["customer_kind"] for r in records[1:]] == [None] * (len(records) - 1)


def test_calls_whose_uniqueids_carry_no_epoch_still_get_their_records(
        fixtures_dir: Path) -> None:
    """ami-basic.raw with every Uniqueid and Linkedid rewritten to numbers that are no
    epoch (as bench_ami's copies are): the same four calls, outcomes and customers, none
    lost to the time dating."""
    data = (fixtures_dir / "ami-basic.raw").read_bytes().replace(b"179533", b"000000")
    records = replay(parse(data))
    original = replay(parse((fixtures_dir / "ami-basic.raw").read_bytes()))
    assert len(records) == len(original) == 4
    assert [(r.outcome, r.customer_id, r.incomplete) for r in records] == [
        (r.outcome, r.customer_id, r.incomplete) for r in original]


def test_a_record_that_cannot_be_built_is_still_posted(
        fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should building a record fail (a bug, input nobody foresaw), the call is posted
    all the same from what needs no interpretation, marked incomplete: one record per
    call, never none."""
    def broken(self: CallTracker, call: object) -> CallRecord:
        raise ValueError("unforeseen")

    monkeypatch.setattr(CallTracker, "build_record", broken)
    records = replay(parse((fixtures_dir / "ami-basic.raw").read_bytes()))
    assert len(records) == 4
    assert all(r.incomplete for r in records)
    assert records[0].linkedid == "1795338333.0"
    assert records[0].record_key == "call:1795338333.0"
    assert records[0].caller_raw == "+8613800138000"
    assert records[0].outcome == "answered"


def test_a_call_seen_first_by_a_hangup_is_reopened_by_its_live_channels() -> None:
    """Just after callroute starts (before CoreShowChannels is in), the first event of a
    call waiting in a queue can be the hangup of an agent leg that rang out: the call,
    whose only known channels are gone, closes. When the queue rings the next agent and
    CoreShowChannels shows the caller, the call is open again: it is not finalised while
    they are up (the grace passing), and its one record comes when they hang up."""
    now = [100.0]
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: now[0])

    def channel(event: str, uid: str, name: str, **extra: str) -> Message:
        return Message({"Event": event, "Uniqueid": uid, "Linkedid": "1795338600.10",
                        "Channel": name, **extra})

    caller = ("1795338600.10", "Local/4008001000@inbound-0000000a;1")
    inbound = ("1795338600.11", "Local/4008001000@inbound-0000000a;2")
    ring_out = [("1795338601.12", "Local/7001@agents-0000000b;1"),
                ("1795338601.13", "Local/7001@agents-0000000b;2")]
    second = ("1795338616.14", "Local/7002@agents-0000000c;1")
    for uid, name in ring_out:
        tracker.handle(channel("Hangup", uid, name, Cause="16"))
    tracker.handle(channel("Newchannel", *second))
    tracker.resync([channel("CoreShowChannel", *caller, CallerIDNum="13800138000",
                            Exten="4008001000"),
                    channel("CoreShowChannel", *inbound), channel("CoreShowChannel", *second)])
    now[0] += 30.0
    tracker.flush(now[0])
    assert records == []
    assert tracker.open_calls == ["1795338600.10"]
    for uid, name in (second, inbound, caller):
        tracker.handle(channel("Hangup", uid, name, Cause="16"))
    now[0] += 30.0
    tracker.flush(now[0])
    assert [(r.linkedid, r.incomplete, r.caller) for r in records] == [
        ("1795338600.10", True, "+8613800138000")]
