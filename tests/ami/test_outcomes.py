"""How the tracker tells outcomes apart, event by event (the real-Asterisk suite places
the same calls on a real Asterisk; these are the branches one call each would be slow
to reach there: busy, failed, a caller hanging up while an agent rings)."""

from __future__ import annotations

import pytest

from ami.protocol import Message
from ami.records import CallRecord
from ami.tracker import CallTracker

LID = "1796122613.2"
CALLER = "Local/4008001000@from-trunk-00000001;2"


def ev(name: str, uid: str = LID, **headers: str) -> Message:
    return Message({"Event": name, "Uniqueid": uid, "Linkedid": LID,
                    "Channel": headers.pop("Channel", CALLER), **headers})


def varset(name: str, value: str) -> Message:
    return ev("VarSet", Variable=name, Value=value)


def dial(status: str, dest: str = "1796122613.4") -> list[Message]:
    return [ev("DialBegin", DestUniqueid=dest, DestChannel="Local/7003@agents-00000002;1"),
            ev("DialEnd", DestUniqueid=dest, DestChannel="Local/7003@agents-00000002;1",
               DialStatus=status)]


def finish(middle: list[Message], cause: str = "16") -> CallRecord:
    """One call: created, the middle events, hung up; its record (no Cdrs: flushed)."""
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: 1796122613.5)
    events = [ev("Newchannel", CallerIDNum="+8613800138000", CallerIDName="Li Lei",
                 Exten="4008001000"), *middle, ev("Hangup", Cause=cause)]
    tracker.handle_all(events)
    tracker.flush()
    (record,) = records
    return record


@pytest.mark.parametrize(("middle", "cause", "outcome"), [
    (dial("BUSY"), "17", "busy"),
    (dial("CHANUNAVAIL"), "16", "failed"),
    (dial("CONGESTION"), "16", "failed"),
    (dial("NOANSWER"), "16", "missed"),
    (dial("CANCEL"), "16", "abandoned"),
    ([varset("DIALSTATUS", "CHANUNAVAIL")], "16", "failed"),  # Dial created no channel
    ([*dial("BUSY"), varset("DIALSTATUS", "BUSY")], "16", "busy"),
    ([], "34", "failed"),                 # no circuit: nothing was put through
    ([], "16", "abandoned"),              # the caller hung up before any routing
    ([varset("ROUTE_ACTION", "reject"), varset("ROUTE_REJECT", "busy")], "17", "rejected"),
    ([ev("QueueCallerJoin", Queue="support"), ev("QueueCallerAbandon", Queue="support",
                                                 HoldTime="9")], "16", "abandoned"),
    ([ev("QueueCallerJoin", Queue="support"), ev("QueueCallerAbandon", Queue="support"),
      varset("QUEUESTATUS", "TIMEOUT")], "16", "missed"),
    ([ev("Newexten", Application="VoiceMail", AppData="8000@default,u"),
      varset("VM_MESSAGEFILE", "/v/default/8000/INBOX/msg0001"),
      varset("CALLROUTE_VM_SECONDS", "5")], "16", "voicemail"),
])
def test_outcome(middle: list[Message], cause: str, outcome: str) -> None:
    """Each way a call can end gets its own outcome."""
    assert finish(middle, cause).outcome == outcome


def test_voicemail_fields() -> None:
    """A voicemail names the mailbox and the message length; one reached but left empty
    says 0 s; a message whose length is not known says None."""
    vm = [ev("Newexten", Application="VoiceMail", AppData="8000@default,u")]
    left = finish([*vm, varset("VM_MESSAGEFILE", "/v/msg0001"),
                   varset("CALLROUTE_VM_SECONDS", "5")])
    assert (left.voicemail, left.voicemail_s) == ("8000@default", 5.0)
    assert finish(vm).voicemail_s == 0.0
    assert finish([*vm, varset("VM_MESSAGEFILE", "/v/msg0001")]).voicemail_s is None


def test_anonymous_and_degraded() -> None:
    """A withheld number is anonymous (no caller); a route with reason deadline is
    degraded, one decided by a rule is not, and a call callroute set nothing for (the
    dialplan's fallback) is degraded."""
    records: list[CallRecord] = []
    tracker = CallTracker(records.append, clock=lambda: 1796122613.5)
    tracker.handle_all([ev("Newchannel", CallerIDNum="anonymous", CallerIDName="Anonymous"),
                        varset("ROUTE_ACTION", "queue"), varset("ROUTE_REASON", "deadline"),
                        ev("Hangup", Cause="16")])
    tracker.flush()
    assert (records[0].caller, records[0].anonymous, records[0].degraded) == (None, True, True)
    assert finish([varset("ROUTE_ACTION", "dial"), varset("ROUTE_REASON", "rule")]
                  ).degraded is False
    assert finish([]).degraded is True


def settling(records: list[CallRecord]) -> CallTracker:
    """A tracker that waits up to 2 s for Cdrs, 0.2 s of quiet when only Cdr-less Local
    halves are missing; its clock stands at 100 (``flush(now)`` moves it)."""
    return CallTracker(records.append, clock=lambda: 100.0, cdr_grace_s=2.0,
                       cdr_settle_s=0.2)


def test_cdr_less_local_half_settles_quickly() -> None:
    """Asterisk writes no Cdr for the ;2 half of a busy Local agent channel: once the
    caller's Cdr and the leg's are in, the call is finalised after cdr_settle_s of quiet,
    not after the whole cdr_grace_s."""
    records: list[CallRecord] = []
    tracker = settling(records)
    agent1, agent2 = "Local/7019@agents-00000001;1", "Local/7019@agents-00000001;2"
    tracker.handle_all([
        ev("Newchannel", CallerIDNum="+8613800138000"),
        ev("Newchannel", "1796122613.4", Channel=agent1),
        ev("Newchannel", "1796122613.5", Channel=agent2),
        Message({"Event": "LocalBridge", "LocalOneUniqueid": "1796122613.4",
                 "LocalTwoUniqueid": "1796122613.5", "LocalOneLinkedid": LID}),
        *dial("BUSY"),
        ev("Hangup", "1796122613.4", Channel=agent1, Cause="17"),
        ev("Hangup", "1796122613.5", Channel=agent2, Cause="17"),
        ev("Hangup", Cause="17"),
        Message({"Event": "Cdr", "UniqueID": LID, "Channel": CALLER,
                 "DestinationChannel": agent1, "StartTime": "2026-12-01 11:12:14",
                 "EndTime": "2026-12-01 11:12:14", "Disposition": "BUSY"}),
    ])
    assert tracker.flush(100.1) == 0
    assert tracker.flush(100.25) == 1
    assert records[0].outcome == "busy"


def test_never_called_local_channel_settles_quickly() -> None:
    """A Dial to a Local channel whose context does not exist creates both halves, calls
    neither (no DialBegin, no LocalBridge) and Asterisk writes no Cdr for them: once the
    caller's Cdr is in, the call is finalised after cdr_settle_s of quiet, as failed (the
    Dial's CHANUNAVAIL), not after the whole cdr_grace_s."""
    records: list[CallRecord] = []
    tracker = settling(records)
    half1, half2 = "Local/7404@no-such-context-00000011;1", "Local/7404@no-such-context-00000011;2"
    tracker.handle_all([
        ev("Newchannel", CallerIDNum="+8613800138000"),
        varset("DIALSTATUS", ""),
        ev("Newchannel", "1796122613.4", Channel=half1),
        ev("Newchannel", "1796122613.5", Channel=half2),
        ev("Hangup", "1796122613.5", Channel=half2, Cause="0"),
        ev("Hangup", "1796122613.4", Channel=half1, Cause="16"),
        varset("DIALSTATUS", "CHANUNAVAIL"),
        ev("Hangup", Cause="16"),
        Message({"Event": "Cdr", "UniqueID": LID, "Channel": CALLER,
                 "DestinationChannel": "", "LastApplication": "Dial",
                 "StartTime": "2026-12-01 11:12:14", "EndTime": "2026-12-01 11:12:14",
                 "Disposition": "NO ANSWER"}),
    ])
    assert tracker.flush(100.1) == 0
    assert tracker.flush(100.25) == 1
    assert records[0].outcome == "failed"


def test_called_local_channel_still_waits_for_its_cdr() -> None:
    """A Local agent channel that was called (a DialBegin names it) is not taken for a
    never-called one: without its Cdr the call waits the whole cdr_grace_s."""
    records: list[CallRecord] = []
    tracker = settling(records)
    agent1 = "Local/7003@agents-00000002;1"
    tracker.handle_all([
        ev("Newchannel", CallerIDNum="+8613800138000"),
        ev("Newchannel", "1796122613.4", Channel=agent1),
        *dial("NOANSWER"),
        ev("Hangup", "1796122613.4", Channel=agent1, Cause="16"),
        ev("Hangup", Cause="16"),
        Message({"Event": "Cdr", "UniqueID": LID, "Channel": CALLER,
                 "DestinationChannel": "", "StartTime": "2026-12-01 11:12:14",
                 "EndTime": "2026-12-01 11:12:14", "Disposition": "NO ANSWER"}),
    ])
    assert tracker.flush(100.25) == 0
    assert tracker.flush(102.1) == 1


def cdr(uid: str, channel: str, dest: str = "") -> Message:
    return Message({"Event": "Cdr", "UniqueID": uid, "Channel": channel,
                    "DestinationChannel": dest, "StartTime": "2026-12-01 11:12:14",
                    "EndTime": "2026-12-01 11:12:20", "Disposition": "ANSWERED"})


def test_a_local_channel_dialled_by_an_agent_leg_waits_for_its_cdrs() -> None:
    """A user's dialplan behind the agent's Local channel dials another Local channel
    (its DialBegin comes from the agent's leg, not the caller's): that channel was
    called (its LocalBridge says so) and gets Cdrs, so the caller's Cdr alone does not
    finalise the call; it is finalised with every leg's Cdr once they are in."""
    records: list[CallRecord] = []
    tracker = settling(records)
    a1, a2 = "Local/7001@agents-00000001;1", "Local/7001@agents-00000001;2"
    b1, b2 = "Local/7001@devices-00000002;1", "Local/7001@devices-00000002;2"
    tracker.handle_all([
        ev("Newchannel", CallerIDNum="+8613800138000"),
        ev("Newchannel", "1796122613.4", Channel=a1),
        ev("Newchannel", "1796122613.5", Channel=a2),
        Message({"Event": "LocalBridge", "LocalOneUniqueid": "1796122613.4",
                 "LocalTwoUniqueid": "1796122613.5", "LocalOneLinkedid": LID}),
        ev("DialBegin", DestUniqueid="1796122613.4", DestChannel=a1),
        ev("Newchannel", "1796122613.6", Channel=b1),
        ev("Newchannel", "1796122613.7", Channel=b2),
        Message({"Event": "LocalBridge", "LocalOneUniqueid": "1796122613.6",
                 "LocalTwoUniqueid": "1796122613.7", "LocalOneLinkedid": LID}),
        ev("DialBegin", "1796122613.5", Channel=a2, DestUniqueid="1796122613.6",
           DestChannel=b1),
        ev("DialEnd", "1796122613.5", Channel=a2, DestUniqueid="1796122613.6",
           DestChannel=b1, DialStatus="ANSWER"),
        ev("DialEnd", DestUniqueid="1796122613.4", DestChannel=a1, DialStatus="ANSWER"),
        ev("Hangup", "1796122613.7", Channel=b2, Cause="16"),
        ev("Hangup", "1796122613.6", Channel=b1, Cause="16"),
        ev("Hangup", "1796122613.5", Channel=a2, Cause="16"),
        ev("Hangup", "1796122613.4", Channel=a1, Cause="16"),
        ev("Hangup", Cause="16"),
        cdr(LID, CALLER, a1),
    ])
    assert tracker.flush(100.25) == 0
    tracker.handle_all([cdr("1796122613.5", a2, b1), cdr("1796122613.7", b2)])
    assert tracker.flush(100.3) == 1
    assert [c["UniqueID"] for c in records[0].cdrs] == [LID, "1796122613.5", "1796122613.7"]


def test_a_local_channel_learnt_after_a_reconnect_waits_for_its_cdrs() -> None:
    """The AMI link dropped while a Local agent channel was dialled (its DialBegin and
    LocalBridge missed); the resync finds it up: it was called, and its Cdr is waited
    for, not taken for a never-called channel's."""
    records: list[CallRecord] = []
    tracker = settling(records)
    l1, l2 = "Local/7101@agents-00000003;1", "Local/7101@agents-00000003;2"
    tracker.handle(ev("Newchannel", CallerIDNum="+8613800138000"))
    tracker.mark_disconnected()
    tracker.resync([Message({"Event": "CoreShowChannel", "Uniqueid": uid, "Linkedid": LID,
                             "Channel": name})
                    for uid, name in ((LID, CALLER), ("1796122613.4", l1),
                                      ("1796122613.5", l2))])
    tracker.handle_all([
        ev("Hangup", "1796122613.5", Channel=l2, Cause="16"),
        ev("Hangup", "1796122613.4", Channel=l1, Cause="16"),
        ev("Hangup", Cause="16"),
        cdr(LID, CALLER),
    ])
    assert tracker.flush(100.25) == 0
    tracker.handle(cdr("1796122613.5", l2, "PJSIP/7101-00000004"))
    tracker.handle(cdr(LID, CALLER, l1))
    assert tracker.flush(100.3) == 1
    assert len(records[0].cdrs) == 3
