"""The call tracker: AMI events in, one :class:`~ami.records.CallRecord` per customer call out.

Every channel of a customer call shares its ``Linkedid`` (the Local ``;1``/``;2``
halves, the Dial to an owner, the queue's attempts). The tracker groups channels
by Linkedid, follows a channel whose Linkedid changes (transfers), and keeps a
Uniqueid→Linkedid map to tie ``Cdr`` events (which carry ``UniqueID`` only) to
their call.

Cdr events can arrive after the channels' ``Hangup``, so a call whose channels are
all gone is finalised when its Cdrs are in (every channel has its own Cdr or is the
``DestinationChannel`` of one) at the next unrelated event, or else when
:meth:`CallTracker.flush` runs after ``cdr_grace_s``. The AMI client calls
``flush(now)`` on a timer; replay tests call ``flush()`` at the end, so results are
deterministic. Exactly one record is emitted per Linkedid.

The customer-facing leg is the call's first channel (Uniqueid == Linkedid): its
caller id is the caller, its hangup cause the call's. The routing decision reaches
the tracker as ``VarSet`` events of the variables the FastAGI side sets (``ROUTE_ACTION``
tells rejected calls); ``Newexten`` of ``VoiceMail`` and the ``CALLROUTE_VM_SECONDS`` the
dialplan sets after it tell a voicemail and the message's length.

Calls in progress across a restart (:mod:`ami.parking` keeps them in Redis): a call's
state (:meth:`_Call.state`, what its record would be built from) is saved when an event
that its record shows (routed, rung, answered, queue join/leave, hangup) marked it for
:meth:`CallTracker.checkpoints`, and for every call still up at shutdown, when
:meth:`CallTracker.close` drops those parked instead of posting a guess (their real
records would be dropped by the outbox as duplicates). A later tracker is given the
states (:meth:`CallTracker.expect_parked`) before its first resync: a call Asterisk still
shows is picked up with what its state knew (:meth:`_Call.merge`: the routing decision,
the customer, the start, who answered; still flagged incomplete, as any adopted call),
and one it no longer shows ended while nobody followed it: its record is built from the
state (:meth:`CallTracker.post_parked`), incomplete.

Times: event times (the ``Timestamp`` header, else this process's clock when the event
arrived) are used when the call's first channel was seen being created within a couple
of seconds of its Uniqueid's epoch (the two clocks agree); otherwise the Cdr times, dated
by :class:`ami.clock.CdrClock` (Asterisk writes them in its local time, with no zone).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime, tzinfo
from typing import Any, NamedTuple

from ami.clock import CdrClock, uid_epoch
from ami.protocol import Message
from ami.records import CallRecord, HangupCause, Outcome, record_key_for
from router.log import bind_call, mask_record
from router.models import NumberKind
from router.phone import normalize
from router.rules.presence import Presence, device_of, member_state

log = logging.getLogger(__name__)

#: Channel variables set by the router (the AGI) that the record reports.
ROUTE_VARS = frozenset(
    {"CRM_CUSTOMER_ID", "CRM_TIER", "CRM_OWNER", "CRM_KIND", "ROUTE_RULE", "ROUTE_REASON",
     "ROUTE_TARGET", "ROUTE_QUEUE", "ROUTE_ACTION", "ROUTE_REJECT", "ROUTE_VOICEMAIL",
     "CALL_DID"}
)
#: Dial/Queue timing variables (milliseconds), read from the channel that dialled.
TIMING_VARS = frozenset({"DIALEDTIME_MS", "ANSWEREDTIME_MS"})
#: Variables of the voicemail and queue steps (set by app_voicemail, app_queue and the
#: dialplan's ``h`` extension), read from any channel of the call.
STEP_VARS = frozenset({"VM_MESSAGEFILE", "CALLROUTE_VM_SECONDS", "QUEUESTATUS", "QUEUEWAIT_MS"})
#: Variables that show callroute (or another router) decided the route.
DECISION_VARS = ("ROUTE_ACTION", "ROUTE_TARGET", "ROUTE_QUEUE", "ROUTE_VOICEMAIL",
                 "ROUTE_REJECT")
#: ROUTE_REASON values of a complete decision (anything else: the route was degraded).
COMPLETE_REASONS = frozenset({"rule", "default"})
#: Dial statuses meaning the call could not be put through.
FAILED_DIALS = frozenset({"CHANUNAVAIL", "CONGESTION", "INVALIDARGS"})
#: How far (s) the first event of a call may lag its Uniqueid's epoch for the event clock
#: to be trusted (the epoch is truncated to the second; events take a moment to arrive).
EVENT_CLOCK_SLACK_S = 2.0
#: Caller id values that mean "no number/name".
UNKNOWN_IDS = frozenset({"", "<unknown>", "unknown"})
#: Q.850 causes that mean the call failed rather than that somebody hung up.
FAILURE_CAUSES = frozenset({1, 2, 3, 21, 22, 27, 28, 34, 38, 41, 42, 44, 47, 58, 66, 88, 102,
                            111, 127})
#: Events that change what a call's record would say (routed, rung, answered, queue join
#: or leave, hangup): each marks the call for the next checkpoint (:meth:`CallTracker.
#: checkpoints`). VarSet of a reported variable and Newexten of VoiceMail mark it too.
CHECKPOINT_EVENTS = frozenset({"Newchannel", "DialBegin", "DialEnd", "AgentCalled",
                               "AgentConnect", "AgentComplete", "QueueCallerJoin",
                               "QueueCallerAbandon", "Hangup"})
#: Version of a call's saved state (:meth:`_Call.state`).
STATE_VERSION = 1
#: Headers not worth keeping in a record's Cdr rows.
_CDR_DROP = frozenset({"Event", "Privilege"})
_DONE_MEMORY = 100_000

AgentResolver = Callable[[str], str | None]


def device_of_channel(channel: str | None) -> str | None:
    """``Local/7001@agents`` from ``Local/7001@agents-00000001;1``; ``PJSIP/7001`` from
    ``PJSIP/7001-0000002a``."""
    if not channel:
        return None
    name = channel.split(";", 1)[0]
    base, sep, suffix = name.rpartition("-")
    return base if sep and suffix and "/" in base else name


def extension_agent(device: str) -> str | None:
    """A simple resolver: the extension of ``Local/7101@agents`` or ``PJSIP/7101`` is the agent."""
    tail = device.split("/", 1)[-1]
    ext = tail.split("@", 1)[0]
    return ext or None


class _Call:
    """What the tracker knows about one open call."""

    __slots__ = (
        "abandon_hold", "abandoned", "answer_dest", "answer_time", "answered_by", "caller_name",
        "caller_num", "cdr_dests", "cdr_uids", "cdrs", "closed_at", "created", "dest_uids",
        "dial_statuses", "dialers", "end_time", "exten", "first_seen", "first_uid",
        "hangup_code", "hangup_text", "hold_time", "incomplete", "joined_queue", "linkedid",
        "live", "local_pairs", "names", "queue", "quiet_since", "recording", "rung",
        "start_time", "steps", "suspect", "talk_time", "timing", "unseen_end", "vars",
        "voicemail", "voicemail_time",
    )

    def __init__(self, linkedid: str, now: float) -> None:
        self.linkedid = linkedid
        self.created = now
        self.start_time = now
        self.first_uid: str | None = None
        self.first_seen: float | None = None
        self.live: set[str] = set()
        self.names: dict[str, str] = {}
        self.vars: dict[str, str] = {}
        self.steps: dict[str, str] = {}
        self.timing: dict[str, str] = {}
        self.caller_num: str | None = None
        self.caller_name: str | None = None
        self.exten: str | None = None
        self.rung: list[str] = []
        self.dialers: set[str] = set()
        self.dest_uids: set[str] = set()
        self.local_pairs: dict[str, str] = {}
        self.dial_statuses: list[str] = []
        self.answered_by: str | None = None
        self.answer_dest: str | None = None
        self.answer_time: float | None = None
        self.end_time: float | None = None
        self.talk_time: str | None = None
        self.queue: str | None = None
        self.joined_queue = False
        self.abandoned = False
        self.abandon_hold: str | None = None
        self.hold_time: str | None = None
        self.voicemail: str | None = None
        self.voicemail_time: float | None = None
        self.hangup_code: str | None = None
        self.hangup_text: str | None = None
        self.recording: str | None = None
        self.cdrs: list[dict[str, str]] = []
        self.cdr_uids: set[str] = set()
        self.cdr_dests: set[str] = set()
        self.closed_at: float | None = None
        self.quiet_since = 0.0
        self.incomplete = False
        self.suspect = False
        #: the end was not seen (a parked call that ended while nobody followed it): the
        #: end is the last moment it was known to be up, whatever its Cdrs say
        self.unseen_end = False

    def state(self) -> dict[str, Any]:
        """What this call's record would be built from, as JSON-able data (its checkpoint:
        :meth:`CallTracker.checkpoints`). The channels up now are left out: a process that
        reads it back learns them from Asterisk."""
        data: dict[str, Any] = {name: getattr(self, name) for name in _STATE_SCALARS}
        data.update({name: dict(getattr(self, name)) for name in _STATE_DICTS})
        data.update({name: list(getattr(self, name)) for name in _STATE_LISTS})
        data.update({name: sorted(getattr(self, name)) for name in _STATE_SETS})
        data["cdrs"] = [dict(c) for c in self.cdrs]
        data["v"] = STATE_VERSION
        return data

    def merge(self, state: Mapping[str, Any], *, ended: bool = False) -> None:
        """Take what a saved :meth:`state` of this call knew and this one does not (a call
        picked up again after a restart: its routing, customer, start, who answered...).
        What this one learnt itself wins; lists and sets are joined. With ``ended``, also
        the end and hangup cause (a call that ended while nobody followed it). Raises
        ValueError for a state that is not one of this version."""
        if state.get("v") != STATE_VERSION or state.get("linkedid") != self.linkedid:
            raise ValueError("not a saved state of this call")
        old = {k: v for k, v in state.items() if v is not None}
        for name in ("vars", "steps", "timing", "local_pairs"):
            setattr(self, name, {**_str_dict(old.get(name, {})), **getattr(self, name)})
        self.rung = _join_lists(_str_list(old.get("rung", [])), self.rung)
        self.dial_statuses = _str_list(old.get("dial_statuses", [])) + self.dial_statuses
        cdrs = old.get("cdrs", [])
        if not isinstance(cdrs, list):
            raise ValueError("cdrs is not a list")
        self.cdrs = [_str_dict(c) for c in cdrs] + self.cdrs
        for name in _STATE_SETS:
            getattr(self, name).update(_str_list(old.get(name, [])))
        for name in ("abandoned", "joined_queue", "incomplete"):
            setattr(self, name, bool(getattr(self, name) or old.get(name)))
        if self.answered_by is None and old.get("answered_by"):
            self.answered_by = _opt_str(old.get("answered_by"))
            self.answer_dest = _opt_str(old.get("answer_dest"))
            self.answer_time = _opt_float(old.get("answer_time"))
        for name in ("abandon_hold", "caller_name", "caller_num", "exten", "first_uid",
                     "hold_time", "queue", "recording", "talk_time", "hangup_code",
                     "hangup_text"):
            if getattr(self, name) is None:
                setattr(self, name, _opt_str(old.get(name)))
        if self.voicemail is None and old.get("voicemail"):
            self.voicemail = _opt_str(old.get("voicemail"))
            self.voicemail_time = _opt_float(old.get("voicemail_time"))
        if self.first_seen is None:
            self.first_seen = _opt_float(old.get("first_seen"))
        start = _opt_float(old.get("start_time"))
        if start is not None:
            self.start_time = min(self.start_time, start)
        if ended and self.end_time is None:
            self.end_time = _opt_float(old.get("end_time"))

    def cdrs_in(self, partners: bool = False) -> bool:
        """True when every channel has a Cdr of its own or is the destination of one; with
        ``partners``, also when it is the other half of such a Local channel (Asterisk
        writes no Cdr for the ``;2`` half of a Local channel that was busy) or a Local
        channel that was never called, as long as the caller's own Cdr is in."""
        uids, dests = self.cdr_uids, self.cdr_dests
        covered = {uid for uid, name in self.names.items() if uid in uids or name in dests}
        if partners:
            if self.first_uid not in uids:
                return False
            for one, two in self.local_pairs.items():
                if one in covered or two in covered:
                    covered.update((one, two))
            # never said of a call that may have missed events (a reconnect, a call
            # picked up mid-way): its channels may have been called unseen
            if not (self.incomplete or self.suspect):
                called = self.dest_uids.union(self.local_pairs, self.local_pairs.values())
                covered.update(uid for uid, name in self.names.items() if uid not in covered
                               and self._never_called(uid, name, called))
        return bool(uids) and covered.issuperset(self.names)

    def _never_called(self, uid: str, name: str, called: set[str]) -> bool:
        """A Local channel no Dial or Queue ever called (neither half in ``called``: a
        dial destination, or named by a LocalBridge, which Asterisk sends for every Local
        channel it calls): made for a Dial that could not call it (no such extension or
        context), it gets no Cdr from Asterisk."""
        if not name.startswith("Local/") or uid == self.first_uid:
            return False
        partner = name[:-1] + ("2" if name.endswith(";1") else "1")
        halves = {uid} | {u for u, n in self.names.items() if n == partner}
        return not halves & called


_STATE_SCALARS = (
    "linkedid", "abandon_hold", "abandoned", "answer_dest", "answer_time", "answered_by",
    "caller_name", "caller_num", "end_time", "exten", "first_seen", "first_uid",
    "hangup_code", "hangup_text", "hold_time", "incomplete", "joined_queue", "queue",
    "recording", "start_time", "talk_time", "voicemail", "voicemail_time",
)
_STATE_DICTS = ("vars", "steps", "timing", "local_pairs")
_STATE_LISTS = ("rung", "dial_statuses")
_STATE_SETS = ("dialers", "dest_uids", "cdr_uids", "cdr_dests")


def _opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # the value is not named: it may be a caller's number or name (logged)
    raise ValueError(f"a value of type {type(value).__name__} where a string was expected")


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"a value of type {type(value).__name__} where a number was expected")


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("not a list of strings")
    return list(value)


def _str_dict(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("not a mapping of strings")
    return dict(value)


def _join_lists(first: list[str], then: list[str]) -> list[str]:
    return first + [x for x in then if x not in first]


class CallTracker:
    """Groups AMI events into calls and emits one :class:`CallRecord` per call.

    Feed every event to :meth:`handle`; call :meth:`flush` periodically (and at the
    end of a replay); after a reconnect call :meth:`mark_disconnected` (when the link
    drops) and :meth:`resync` (with ``CoreShowChannels``/``QueueStatus`` results).
    Across a restart: :meth:`checkpoints`/:meth:`open_states` and :meth:`close` with the
    parked calls on the way out, :meth:`expect_parked`, :meth:`take_parked_gone` and
    :meth:`post_parked` at the next start (driven by :class:`ami.parking.CallParking`).
    """

    def __init__(
        self,
        on_record: Callable[[CallRecord], None],
        region: str = "CN",
        presence: Presence | None = None,
        agent_for_device: AgentResolver | None = None,
        clock: Callable[[], float] = time.time,
        *,
        cdr_grace_s: float = 2.0,
        cdr_settle_s: float = 0.2,
        max_open_calls: int = 10_000,
        cdr_tz: tzinfo | None = None,
    ) -> None:
        self.on_record = on_record
        self.region = region
        self.presence = presence
        self.agent_for_device = agent_for_device
        self.clock = clock
        self.cdr_grace_s = cdr_grace_s
        self.cdr_settle_s = cdr_settle_s
        self.max_open_calls = max_open_calls
        self.cdr_clock = CdrClock(cdr_tz)
        self._calls: dict[str, _Call] = {}
        self._uid_lid: dict[str, str] = {}
        self._closed: dict[str, _Call] = {}
        self._ready: dict[str, _Call] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._adopted: list[str] = []
        #: calls changed since the last checkpoint (see :meth:`checkpoints`)
        self._dirty: set[str] = set()
        #: saved states of an earlier run's calls, waiting for the AMI view (resync)
        self._parked: dict[str, dict[str, Any]] = {}
        #: ... and those of them Asterisk no longer shows (ended while nobody followed)
        self._parked_gone: dict[str, dict[str, Any]] = {}
        #: earlier runs' calls picked up again (adopted with what they knew)
        self.parked_adopted = 0
        self.resyncs = 0
        self.records_emitted = 0
        self._skew_warned = False
        self._last_skew = 0.0
        self.late_cdrs = 0
        self.evicted = 0
        self._chan_handlers: dict[str, Callable[[_Call, dict[str, str], str], None]] = {
            "Newchannel": self._on_newchannel,
            "VarSet": self._on_varset,
            "DialBegin": self._on_dial_begin,
            "DialEnd": self._on_dial_end,
            "AgentCalled": self._on_agent_called,
            "AgentConnect": self._on_agent_connect,
            "AgentComplete": self._on_agent_complete,
            "QueueCallerJoin": self._on_queue_join,
            "QueueCallerAbandon": self._on_queue_abandon,
            "Hangup": self._on_hangup,
            "Rename": self._on_rename,
            "NewCallerid": self._on_callerid,
            "Newexten": self._on_newexten,
        }
        self._other_handlers: dict[str, Callable[[dict[str, str]], None]] = {
            "Cdr": self._on_cdr,
            "LocalBridge": self._on_local_bridge,
            "DeviceStateChange": self._on_device_state,
            "QueueMemberStatus": self._on_member_status,
            "QueueMember": self._on_member_status,
        }

    # --- public API -----------------------------------------------------------------------
    @property
    def open_calls(self) -> list[str]:
        """Linkedids of calls not yet finalised."""
        return list(self._calls)

    def handle(self, msg: Message) -> None:
        """Process one AMI message (non-events are ignored)."""
        name = msg.event
        if name is None:
            return
        h = msg.headers
        if self._ready and not (
            name == "Cdr" and self._uid_lid.get(h.get("UniqueID", "")) in self._ready
        ):
            self._finalise_ready()
        uid = h.get("Uniqueid")
        if uid is not None and uid != "<unknown>":
            handler = self._chan_handlers.get(name)
            call = self._channel(uid, h.get("Linkedid"), h)
            if call is None:
                return
            if uid == call.first_uid and "CallerIDNum" in h:
                self._caller(call, h)
            if handler is not None:
                handler(call, h, uid)
            if name in CHECKPOINT_EVENTS:
                self._dirty.add(call.linkedid)
            return
        other = self._other_handlers.get(name)
        if other is not None:
            other(h)

    def set_server_offset(self, offset_s: int | None) -> None:
        """The UTC offset (s) Asterisk reported over AMI: the fallback for dating Cdrs."""
        self.cdr_clock.server_offset = offset_s

    def handle_all(self, messages: Iterable[Message]) -> None:
        """:meth:`handle` each message in turn."""
        for msg in messages:
            self.handle(msg)

    def flush(self, now: float | None = None) -> int:
        """Finalise closed calls whose Cdrs are in or whose grace has passed by ``now``.

        A call whose channels are all covered but for the Cdr-less half of a Local channel
        is finalised once no Cdr came for ``cdr_settle_s``. ``now=None`` finalises every
        closed call (end of a replay, shutdown). Returns the number of records emitted.
        """
        before = self.records_emitted
        self._finalise_ready()
        for lid, call in list(self._closed.items()):
            closed = call.closed_at if call.closed_at is not None else 0.0
            if now is None or closed + self.cdr_grace_s <= now or (
                    call.quiet_since + self.cdr_settle_s <= now and call.cdrs_in(partners=True)):
                self._finalise(lid)
        return self.records_emitted - before

    def close(self, parked: Collection[str] = ()) -> int:
        """Shutdown: finalise every call but those in ``parked`` (saved for the next run,
        :mod:`ami.parking`), which are dropped without a record; calls still up and not
        parked are finalised as incomplete (no record is lost). Returns the records
        emitted."""
        for lid in parked:
            call = self._calls.get(lid)
            if call is not None and call.live:
                self._forget(lid)
        for call in self._calls.values():
            if call.live:
                call.incomplete = True
        count = self.flush()
        for lid in list(self._calls):
            self._finalise(lid)
            count += 1
        return count

    # --- checkpoints and parked calls (ami.parking) ---------------------------------------
    def checkpoints(self, limit: int | None = None) -> dict[str, dict[str, Any]]:
        """The state (:meth:`_Call.state`) of every open call changed in a way its record
        would show (routed, rung, answered, queue join/leave, hangup) since the last
        call, at most ``limit`` of them (the others stay marked for the next); cheap on
        the event path: an event only marks its call."""
        if limit is None or len(self._dirty) <= limit:
            dirty, self._dirty = self._dirty, set()
        else:
            dirty = set(itertools.islice(self._dirty, limit))
            self._dirty -= dirty
        return {lid: call.state() for lid in dirty if (call := self._calls.get(lid))}

    def touch(self, linkedids: Iterable[str]) -> None:
        """Mark calls for the next :meth:`checkpoints` again (their last one was not saved)."""
        self._dirty.update(lid for lid in linkedids if lid in self._calls)

    def open_states(self) -> dict[str, dict[str, Any]]:
        """The state of every call still up (shutdown: what is parked)."""
        return {lid: call.state() for lid, call in self._calls.items() if call.live}

    def expect_parked(self, states: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """Take the saved states of an earlier run's calls. A call already followed again
        is given what its state knew at once; the others wait for the AMI view: a call
        Asterisk shows is picked up with its state, one it no longer shows ended while
        nobody followed it (:meth:`take_parked_gone`). Returns the Linkedids of calls
        whose records this run has already emitted (their states are spent)."""
        spent: list[str] = []
        for lid, state in states.items():
            call = self._calls.get(lid)
            if call is not None:
                self._restore(call, state)
                self._dirty.add(lid)
            elif lid in self._done:
                self.parked_adopted += 1
                spent.append(lid)
            elif self.resyncs:
                self._parked_gone[lid] = dict(state)
            else:
                self._parked[lid] = dict(state)
        return spent

    @property
    def parked_waiting(self) -> int:
        """Saved states of an earlier run's calls not yet known to be up or gone (before
        the first resync) or not yet taken as gone (:meth:`take_parked_gone`)."""
        return len(self._parked) + len(self._parked_gone)

    def take_parked_gone(self) -> dict[str, dict[str, Any]]:
        """The saved states of earlier calls that the last resync did not find up."""
        gone, self._parked_gone = self._parked_gone, {}
        return gone

    def post_parked(self, linkedid: str, state: Mapping[str, Any],
                    last_seen: float | None = None) -> bool:
        """Emit the record of an earlier run's call that ended while nobody followed it,
        from its saved state, flagged incomplete; its end is the one saved (it had hung
        up) or else the last moment it was known to be up (``last_seen``, or the
        checkpoint's own time). False when this run follows or already emitted it."""
        if linkedid in self._calls or linkedid in self._done:
            return False
        call = _Call(linkedid, self.clock())
        try:
            call.merge(state, ended=True)
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("the saved state of call %s is unreadable (%s): posting what is known",
                      linkedid, exc)
        call.incomplete = True
        if call.end_time is None:
            try:
                saved = _opt_float(state.get("saved_at"))
            except ValueError:
                saved = None
            seen = max((t for t in (saved, last_seen) if t is not None), default=None)
            call.end_time = seen if seen is None else max(seen, call.start_time)
            call.unseen_end = True
        self._calls[linkedid] = call
        self._finalise(linkedid)
        return True

    def _restore(self, call: _Call, state: Mapping[str, Any]) -> None:
        """``call`` (picked up again) given what its saved ``state`` knew; a state that
        cannot be read changes nothing (logged)."""
        scratch = _Call(call.linkedid, call.start_time)
        try:
            scratch.merge(state)
        except (ValueError, TypeError, AttributeError) as exc:
            log.error("the saved state of call %s is unreadable (%s): it is followed "
                      "without it", call.linkedid, exc)
            return
        call.merge(scratch.state())
        self.parked_adopted += 1

    def _forget(self, lid: str) -> None:
        """Drop an open call without a record (it is parked for the next run)."""
        call = self._calls.pop(lid, None)
        self._ready.pop(lid, None)
        self._closed.pop(lid, None)
        self._dirty.discard(lid)
        if call is not None:
            for uid in call.names:
                self._uid_lid.pop(uid, None)

    def mark_disconnected(self) -> list[str]:
        """The AMI link dropped: every open call may miss events. Returns their Linkedids."""
        for call in self._calls.values():
            call.suspect = True
        return list(self._calls)

    def resync(
        self, channels: Iterable[Message], queue_status: Iterable[Message] = ()
    ) -> list[str]:
        """Reconcile with a fresh ``CoreShowChannels`` (and ``QueueStatus``) after a reconnect.

        Calls open across the disconnection are marked incomplete; those no longer
        present are finalised at once. Channels of unknown calls are adopted (the call
        is incomplete). Returns the Linkedids of every call marked incomplete.
        """
        now = self.clock()
        present: dict[str, dict[str, str]] = {}
        for msg in channels:
            uid = msg.get("Uniqueid")
            if uid:
                present[uid] = msg.headers
        affected: list[str] = []
        for lid, call in list(self._calls.items()):
            if not call.suspect:
                continue
            call.suspect = False
            call.incomplete = True
            affected.append(lid)
            for uid in list(call.live):
                if uid not in present:
                    call.live.discard(uid)
            if not call.live:
                if call.end_time is None:
                    call.end_time = now
                self._finalise(lid)
        for uid, h in present.items():
            if uid in self._uid_lid:
                continue
            lid = h.get("Linkedid") or uid
            if lid in self._done:
                continue
            new = lid not in self._calls
            adopted = self._channel(uid, lid, h)
            if adopted is None:
                continue
            if new:
                affected.append(lid)
            if uid == adopted.first_uid:
                self._caller(adopted, h)
                adopted.exten = adopted.exten or h.get("Exten")
        self._apply_queue_status(queue_status)
        affected += self._adopted
        self._adopted.clear()
        # an earlier run's call that Asterisk no longer shows ended while nobody followed it
        self._parked_gone.update(self._parked)
        self._parked.clear()
        self.resyncs += 1
        return sorted(set(affected))

    # --- channels -------------------------------------------------------------------------
    def _event_time(self, h: dict[str, str]) -> float:
        ts = h.get("Timestamp")
        if ts:
            try:
                return float(ts)
            except ValueError:
                pass
        return self.clock()

    def _channel(self, uid: str, lid: str | None, h: dict[str, str]) -> _Call | None:
        known = self._uid_lid.get(uid)
        if known is None:
            # a channel is learnt only from what Asterisk sends about one (its snapshot
            # always names it): a malformed event naming no channel must not add one
            # that no Hangup will ever end, holding its call's record back for good
            if not lid or lid in self._done or not h.get("Channel"):
                return None
            call = self._calls.get(lid)
            if call is None:
                call = self._new_call(lid, self._event_time(h))
            if h.get("Event") != "Newchannel" and not call.incomplete:
                # a channel first seen mid-life: its earlier events were missed
                call.incomplete = True
                self._adopted.append(lid)
            self._dirty.add(lid)
            self._join(call, uid, h)
            if call.first_uid is None or uid == lid:
                call.first_uid = uid
            return call
        if lid and known != lid and lid not in self._done:
            return self._move(uid, known, lid, h)
        return self._calls.get(known)

    def _new_call(self, lid: str, now: float) -> _Call:
        if len(self._calls) >= self.max_open_calls:
            oldest = next(iter(self._calls))
            log.warning(
                "more than %d open calls: finalising the oldest (%s) as incomplete",
                self.max_open_calls, oldest,
            )
            self._calls[oldest].incomplete = True
            self.evicted += 1
            self._finalise(oldest)
        call = _Call(lid, now)
        parked = self._parked.pop(lid, None)
        if parked is not None:
            self._restore(call, parked)
        self._calls[lid] = call
        self._closed.pop(lid, None)
        return call

    def _move(self, uid: str, old_lid: str, new_lid: str, h: dict[str, str]) -> _Call:
        """A channel's Linkedid changed (transfer): follow it to its new call."""
        old = self._calls.get(old_lid)
        new = self._calls.get(new_lid) or self._new_call(new_lid, self._event_time(h))
        self._join(new, uid, h)
        self._dirty.add(new_lid)
        if new.first_uid is None:
            new.first_uid = uid
        if old is not None:
            old.live.discard(uid)
            old.names.pop(uid, None)
            if not old.live:
                self._close(old, self._event_time(h))
        return new

    def _join(self, call: _Call, uid: str, h: dict[str, str]) -> None:
        """Channel ``uid`` is up and part of ``call``. A call that had closed (its only
        channels seen were gone: a call first seen by a hangup, just after a (re)connect)
        is open again: it is finalised when this channel is gone too."""
        self._uid_lid[uid] = call.linkedid
        call.live.add(uid)
        call.names[uid] = h.get("Channel", uid)
        if call.closed_at is not None:
            call.closed_at = None
            call.end_time = None
            self._closed.pop(call.linkedid, None)
            self._ready.pop(call.linkedid, None)

    def _close(self, call: _Call, now: float) -> None:
        call.closed_at = now
        call.quiet_since = self.clock()
        if call.end_time is None:
            call.end_time = now
        self._closed[call.linkedid] = call
        if call.cdrs_in():
            self._ready[call.linkedid] = call

    def _caller(self, call: _Call, h: dict[str, str]) -> None:
        num = h.get("CallerIDNum")
        if num is not None and num not in UNKNOWN_IDS:
            call.caller_num = num
        name = h.get("CallerIDName")
        if name is not None and name.lower() not in UNKNOWN_IDS:
            call.caller_name = name

    # --- channel events -------------------------------------------------------------------
    def _on_newchannel(self, call: _Call, h: dict[str, str], uid: str) -> None:
        if uid == call.first_uid:
            if call.exten is None:
                call.exten = h.get("Exten")
            if call.first_seen is None and not call.incomplete:
                call.first_seen = self._event_time(h)

    def _on_newexten(self, call: _Call, h: dict[str, str], uid: str) -> None:
        if h.get("Application") == "VoiceMail" and call.voicemail is None:
            box = (h.get("AppData") or "").split(",", 1)[0].split("&", 1)[0]
            call.voicemail = box or None
            call.voicemail_time = self._event_time(h)
            self._dirty.add(call.linkedid)

    def _on_callerid(self, call: _Call, h: dict[str, str], uid: str) -> None:
        return None  # caller id is read for the customer leg in handle()

    def _on_rename(self, call: _Call, h: dict[str, str], uid: str) -> None:
        new = h.get("Newname")
        if new:
            call.names[uid] = new

    def _on_varset(self, call: _Call, h: dict[str, str], uid: str) -> None:
        var = h.get("Variable", "").lstrip("_")
        value = h.get("Value", "")
        if var in ROUTE_VARS:
            self._dirty.add(call.linkedid)
            if value:
                call.vars[var] = value
            else:
                call.vars.pop(var, None)
        elif var in TIMING_VARS:
            if value and uid in call.dialers:
                call.timing[var] = value
        elif var in STEP_VARS:
            self._dirty.add(call.linkedid)
            if value:
                call.steps[var] = value
            if var == "QUEUESTATUS" and value:
                # Queue() returned with the caller still there: a QueueCallerAbandon before
                # it was the queue giving up (TIMEOUT), not the caller hanging up.
                call.abandoned = False
        elif var == "MIXMONITOR_FILENAME" and value:
            self._dirty.add(call.linkedid)
            call.recording = value
        elif var == "DIALSTATUS" and value and uid not in call.dest_uids:
            # Dial()'s result on the caller's side. A Dial that could create no channel
            # (CHANUNAVAIL: no such device or context) sends no DialBegin/DialEnd, only
            # this; after a DialEnd it repeats the attempt's overall status.
            call.dial_statuses.append(value)
            self._dirty.add(call.linkedid)

    def _on_dial_begin(self, call: _Call, h: dict[str, str], uid: str) -> None:
        if uid in call.dest_uids:
            return  # an agent's own leg dialling onwards: not a new attempt
        dest_uid = h.get("DestUniqueid")
        if dest_uid:
            call.dest_uids.add(dest_uid)
            pair = call.local_pairs.get(dest_uid)
            if pair:
                call.dest_uids.add(pair)
        call.dialers.add(uid)
        self._rang(call, device_of_channel(h.get("DestChannel")) or h.get("DialString"))

    @staticmethod
    def _rang(call: _Call, device: str | None) -> None:
        if device and device not in call.rung:
            call.rung.append(device)

    def _on_dial_end(self, call: _Call, h: dict[str, str], uid: str) -> None:
        if uid in call.dest_uids:
            return
        status = h.get("DialStatus", "")
        call.dial_statuses.append(status)
        if status == "ANSWER" and call.answered_by is None:
            call.answer_dest = h.get("DestChannel")
            call.answered_by = device_of_channel(call.answer_dest)
            call.answer_time = self._event_time(h)

    def _on_agent_called(self, call: _Call, h: dict[str, str], uid: str) -> None:
        interface = h.get("Interface")
        if interface:
            self._rang(call, device_of(interface))

    def _on_agent_connect(self, call: _Call, h: dict[str, str], uid: str) -> None:
        interface = h.get("Interface")
        if interface:
            call.answered_by = device_of(interface)
        call.answer_dest = h.get("DestChannel") or call.answer_dest
        if call.answer_time is None:
            call.answer_time = self._event_time(h)
        call.queue = h.get("Queue") or call.queue
        call.hold_time = h.get("HoldTime") or call.hold_time

    def _on_agent_complete(self, call: _Call, h: dict[str, str], uid: str) -> None:
        call.talk_time = h.get("TalkTime")

    def _on_queue_join(self, call: _Call, h: dict[str, str], uid: str) -> None:
        call.queue = h.get("Queue") or call.queue
        call.joined_queue = True
        call.dialers.add(uid)

    def _on_queue_abandon(self, call: _Call, h: dict[str, str], uid: str) -> None:
        call.abandoned = True
        call.abandon_hold = h.get("HoldTime")
        call.queue = h.get("Queue") or call.queue

    def _on_hangup(self, call: _Call, h: dict[str, str], uid: str) -> None:
        call.live.discard(uid)
        if uid == call.first_uid:
            call.hangup_code = h.get("Cause")
            call.hangup_text = h.get("Cause-txt")
        if not call.live:
            now = self._event_time(h)
            call.end_time = now
            self._close(call, now)

    # --- other events ---------------------------------------------------------------------
    def _on_cdr(self, h: dict[str, str]) -> None:
        uid = h.get("UniqueID") or h.get("Uniqueid") or ""
        lid = self._uid_lid.get(uid)
        call = self._calls.get(lid) if lid is not None else None
        if call is None:
            self.late_cdrs += 1
            log.debug("Cdr for unknown or finished channel %s ignored", uid)
            return
        call.cdrs.append({k: v for k, v in h.items() if k not in _CDR_DROP})
        call.cdr_uids.add(uid)
        call.quiet_since = self.clock()
        dest = h.get("DestinationChannel")
        if dest:
            call.cdr_dests.add(dest)
        if call.closed_at is not None and not call.live and call.cdrs_in():
            self._ready[call.linkedid] = call

    def _on_local_bridge(self, h: dict[str, str]) -> None:
        lid = h.get("LocalOneLinkedid")
        call = self._calls.get(lid) if lid else None
        one, two = h.get("LocalOneUniqueid"), h.get("LocalTwoUniqueid")
        if call is None or not one or not two:
            return
        call.local_pairs[one] = two
        if one in call.dest_uids:
            call.dest_uids.add(two)

    def _on_device_state(self, h: dict[str, str]) -> None:
        device, state = h.get("Device"), h.get("State")
        if self.presence is not None and device and state and not device.startswith("Queue:"):
            self.presence.update(device, state)

    def _on_member_status(self, h: dict[str, str]) -> None:
        if self.presence is None:
            return
        device = h.get("StateInterface") or h.get("Interface") or h.get("Location")
        state = member_state(h.get("Status"))
        if device and state and state != "UNKNOWN":
            self.presence.update(device, state)

    def _apply_queue_status(self, messages: Iterable[Message]) -> None:
        for msg in messages:
            if msg.event == "QueueMember":
                self._on_member_status(msg.headers)
            elif msg.event == "QueueEntry":
                lid = self._uid_lid.get(msg.get("Uniqueid") or "")
                call = self._calls.get(lid) if lid else None
                if call is not None:
                    call.queue = msg.get("Queue") or call.queue
                    call.joined_queue = True

    # --- finalisation ---------------------------------------------------------------------
    def _finalise_ready(self) -> None:
        for lid in list(self._ready):
            self._finalise(lid)

    def _finalise(self, lid: str) -> None:
        call = self._calls.pop(lid, None)
        self._ready.pop(lid, None)
        self._closed.pop(lid, None)
        self._dirty.discard(lid)
        if call is None or lid in self._done:
            return
        self._done[lid] = None
        if len(self._done) > _DONE_MEMORY:
            self._done.popitem(last=False)
        for uid in call.names:
            self._uid_lid.pop(uid, None)
        with bind_call(lid):
            try:
                record = self.build_record(call)
            except Exception:
                # A bug or input we did not foresee must not cost the CRM the call: post
                # what is surely known, marked incomplete.
                log.exception("could not build the record of call %s: posting what is known",
                              lid)
                record = self.fallback_record(call)
            self.records_emitted += 1
            try:
                self.on_record(record)
            except Exception:
                log.exception("record consumer failed; record was %s",
                              json.dumps(mask_record(record.model_dump(mode="json"))))

    # --- the record -----------------------------------------------------------------------
    def _skew(self, call: _Call) -> float:
        """Seconds to add to this call's event times to put them on Asterisk's clock: 0
        when its first channel was seen created within a moment of the epoch its Uniqueid
        carries (the clocks agree), else the difference (logged once); for a call whose
        creation was not seen (adopted), the last difference measured."""
        epoch = uid_epoch(call.linkedid)
        if call.first_seen is None or epoch is None:
            return self._last_skew
        lag = call.first_seen - epoch
        if -1.0 <= lag <= 1.0 + EVENT_CLOCK_SLACK_S:
            self._last_skew = 0.0
        else:
            self._last_skew = epoch + 0.5 - call.first_seen
            if not self._skew_warned:
                self._skew_warned = True
                log.warning("this host's clock and Asterisk's differ by about %.0f s: call "
                            "times are taken from the Cdr events (synchronise the clocks, or "
                            "set timestampevents = yes in manager.conf)", lag)
        return self._last_skew

    @staticmethod
    def _answered_cdr(call: _Call) -> dict[str, str] | None:
        """The Cdr of the leg an agent answered: by the answer seen on AMI, else (events
        missed) the first answered Cdr towards another party."""
        for cdr in call.cdrs:
            if call.answer_dest and cdr.get("DestinationChannel") == call.answer_dest:
                return cdr
        if call.answered_by is not None:
            return None
        return next((c for c in call.cdrs if c.get("DestinationChannel")
                     and c.get("Disposition") == "ANSWERED" and c.get("AnswerTime")), None)

    def _times(self, call: _Call, answered: dict[str, str] | None) -> _Times:
        """Start, agent answer, end, mailbox pickup: from the events when the clocks agree
        (to the millisecond), else from the Cdrs (whole seconds, Asterisk's own clock)."""
        zone = self.cdr_clock.zone_for(call.cdrs)

        def cdr(value: str | None) -> datetime | None:
            return self.cdr_clock.read(value, zone)

        skew = self._skew(call)

        def event(at: float | None) -> datetime | None:
            return _utc(at + skew) if at is not None else None

        mailbox = next((c for c in call.cdrs if c.get("LastApplication") == "VoiceMail"), None)
        c_start = min((t for c in call.cdrs if (t := cdr(c.get("StartTime")))), default=None)
        c_end = max((t for c in call.cdrs if (t := cdr(c.get("EndTime")))), default=None)
        c_answer = cdr(answered.get("AnswerTime")) if answered else None
        c_pickup = cdr(mailbox.get("AnswerTime")) if mailbox else None
        if call.unseen_end and call.end_time is not None:
            c_end = event(call.end_time)  # the Cdrs known are of legs that ended before
        if skew == 0.0 and call.first_seen is not None:
            return _Times(event(call.first_seen), event(call.answer_time) or c_answer,
                          event(call.end_time) or c_end, event(call.voicemail_time) or c_pickup)
        epoch = uid_epoch(call.linkedid)
        start = c_start or event(call.first_seen) or (
            _utc(epoch) if epoch is not None else event(call.start_time))
        return _Times(start, c_answer or event(call.answer_time), c_end or event(call.end_time),
                      c_pickup or event(call.voicemail_time))

    @staticmethod
    def _ms(value: str | None) -> float | None:
        try:
            return int(value) / 1000.0 if value else None
        except ValueError:
            return None

    @staticmethod
    def _seconds(value: str | None) -> float | None:
        try:
            return float(value) if value else None
        except ValueError:
            return None

    @staticmethod
    def _outcome(call: _Call, answered_by: str | None) -> Outcome:
        if answered_by is not None:
            return "answered"
        if (call.vars.get("ROUTE_ACTION") == "reject" and not call.joined_queue
                and not call.dial_statuses and call.voicemail is None):
            return "rejected"
        if call.voicemail is not None:
            return "voicemail"
        if call.abandoned:
            return "abandoned"
        if call.joined_queue:
            return "missed"
        if call.dial_statuses:
            last = call.dial_statuses[-1]
            if last == "CANCEL":
                return "abandoned"
            if last == "BUSY":
                return "busy"
            return "failed" if last in FAILED_DIALS else "missed"
        try:
            code = int(call.hangup_code or "0")
        except ValueError:
            code = 0
        return "failed" if code in FAILURE_CAUSES else "abandoned"

    def _durations(self, call: _Call, times: _Times, outcome: Outcome
                   ) -> tuple[float | None, float | None]:
        """(wait_s, talk_s): the wait until an agent or the mailbox answered (or the end),
        and the agent's talk time."""
        start, answer, end = times.start, times.answer, times.end
        if outcome == "answered":
            wait = _span(start, answer)
            talk = self._ms(call.timing.get("ANSWEREDTIME_MS")) or self._seconds(call.talk_time)
            return wait, talk if talk is not None else _span(answer, end)
        if outcome == "voicemail" and times.pickup is not None:
            return _span(start, times.pickup), 0.0
        wait = _span(start, end)
        if wait is None:
            wait = self._seconds(call.abandon_hold)
        return wait, 0.0

    def _queue_wait(self, call: _Call) -> float | None:
        if not call.joined_queue:
            return None
        waited = self._ms(call.steps.get("QUEUEWAIT_MS"))
        if waited is not None:
            return waited
        return self._seconds(call.hold_time) or self._seconds(call.abandon_hold)

    def _voicemail_s(self, call: _Call) -> float | None:
        if call.voicemail is None:
            return None
        seconds = self._seconds(call.steps.get("CALLROUTE_VM_SECONDS"))
        if seconds is not None:
            return seconds
        return None if call.steps.get("VM_MESSAGEFILE") else 0.0

    def _caller_number(self, call: _Call) -> tuple[str | None, str | None, bool]:
        """(E.164 or None, raw number, anonymous) of the caller."""
        raw = call.caller_num
        if raw is None:
            first = call.names.get(call.first_uid or "")
            raw = next(
                (c.get("Source") for c in call.cdrs if c.get("Channel") == first and
                 c.get("Source")), None,
            )
        number = normalize(raw, self.region) if raw else None
        anonymous = number is None or number.kind is NumberKind.ANONYMOUS
        return (number.e164 if number is not None else None), raw, anonymous

    def fallback_record(self, call: _Call) -> CallRecord:
        """The record of ``call`` from what needs no interpretation (its ids, number, the
        route's variables), marked incomplete: for when :meth:`build_record` failed."""
        v = call.vars
        return CallRecord(
            record_key=record_key_for(call.linkedid), linkedid=call.linkedid,
            caller_raw=call.caller_num, did=v.get("CALL_DID") or call.exten,
            customer_id=v.get("CRM_CUSTOMER_ID") or None, routing_rule=v.get("ROUTE_RULE"),
            route_reason=v.get("ROUTE_REASON"), answered_by=call.answered_by,
            outcome="answered" if call.answered_by else "failed", incomplete=True,
        )

    def build_record(self, call: _Call) -> CallRecord:
        """The record of ``call`` as it stands (used at finalisation)."""
        caller, raw, anonymous = self._caller_number(call)
        answered_cdr = self._answered_cdr(call)
        answered_by = call.answered_by
        if answered_by is None and answered_cdr is not None:
            answered_by = device_of_channel(answered_cdr.get("DestinationChannel"))
        times = self._times(call, answered_cdr)
        outcome = self._outcome(call, answered_by)
        wait, talk = self._durations(call, times, outcome)
        agent = None
        if answered_by is not None and self.agent_for_device is not None:
            agent = self.agent_for_device(answered_by)
        cause = None
        if call.hangup_code is not None or call.hangup_text is not None:
            text = call.hangup_code or ""
            code = int(text) if text.isdigit() else None
            cause = HangupCause(code=code, text=call.hangup_text)
        v = call.vars
        reason = v.get("ROUTE_REASON")
        incomplete = call.incomplete or call.suspect
        decided = any(v.get(name) for name in DECISION_VARS)
        degraded = reason not in COMPLETE_REASONS if reason else not (decided or incomplete)
        return CallRecord(
            record_key=record_key_for(call.linkedid),
            linkedid=call.linkedid,
            caller=caller,
            caller_raw=raw,
            caller_name=call.caller_name,
            anonymous=anonymous,
            did=v.get("CALL_DID") or call.exten,
            customer_id=v.get("CRM_CUSTOMER_ID"),
            customer_tier=v.get("CRM_TIER"),
            customer_owner=v.get("CRM_OWNER") or None,
            customer_kind=v.get("CRM_KIND") or None,
            routing_rule=v.get("ROUTE_RULE"),
            route_reason=reason,
            route_target=v.get("ROUTE_TARGET"),
            route_queue=v.get("ROUTE_QUEUE"),
            degraded=degraded,
            queue=call.queue,
            agents_rung=list(call.rung),
            answered_by=answered_by,
            answered_by_agent=agent,
            start=times.start,
            answer=times.answer if answered_by is not None else None,
            end=times.end,
            wait_s=wait,
            talk_s=talk,
            queue_wait_s=self._queue_wait(call),
            voicemail=call.voicemail,
            voicemail_s=self._voicemail_s(call),
            outcome=outcome,
            hangup_cause=cause,
            recording=call.recording,
            incomplete=incomplete,
            cdrs=call.cdrs,
        )


class _Times(NamedTuple):
    """A call's start, agent answer, end and mailbox pickup, in UTC."""

    start: datetime | None
    answer: datetime | None
    end: datetime | None
    pickup: datetime | None


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _span(a: datetime | None, b: datetime | None) -> float | None:
    """Seconds from ``a`` to ``b`` (never negative), None when one is missing."""
    if a is None or b is None:
        return None
    return round(max((b - a).total_seconds(), 0.0), 3)
