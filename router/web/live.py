"""The live view: AMI events in, agents' cards and the supervisor's figures out (no I/O).

:meth:`LiveState.handle` is registered as a listener of the AMI client (it runs after
the call tracker, on the same parsed events). It follows each call by ``Linkedid``:
the routing variables (``VarSet``), the agents rung (``DialBegin`` to an agent's device,
``AgentCalled`` from a queue), who answered (``DialEnd`` ANSWER, ``AgentConnect``), the
queue wait, and hangups. Agents are recognised by device through the rules' agents
table.

Only calls callroute routed pop a card (its decision is here, or its ``ROUTE_*``/``CRM_*``
variables were seen, or the call went through ``[callroute-inbound]``, which sets
``CALL_DID`` before asking callroute: a call the dialplan's fallback queued while
callroute was unreachable still pops, marked degraded), so internal calls between
extensions stay off the agents' pages. Cards and the live rows say when the caller
withheld the number (``anonymous``) and when the route was degraded (``degraded``: the
reason, e.g. ``deadline``, ``crm-error``, ``fallback``).
Each change of what an agent should see is pushed at once, as one JSON text, to that
agent's connected pages only (:class:`Sink`): a ``card`` (ringing, talking, ended) or a
``close`` (taken by another agent, not answered, done). The supervisor's pages get a
snapshot on a timer (:meth:`snapshot`), with or without customer names by role.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from urllib.parse import quote

from router.phone import ANONYMOUS
from router.rules.presence import Presence, device_of
from router.web.audit import Reader
from router.web.decisions import CallDecision, DecisionStore
from router.web.stats import Samples, Window, percentile

log = logging.getLogger(__name__)

ROUTE_VARS = frozenset({"ROUTE_RULE", "ROUTE_REASON", "CRM_CUSTOMER_ID", "CRM_TIER",
                        "ROUTE_TARGET", "ROUTE_QUEUE", "CRM_OWNER", "CALL_DID"})
#: ``ROUTE_REASON`` values of a complete decision; any other reason, or a call that went
#: through callroute's dialplan (``CALL_DID``) without any decision (the dialplan's own
#: fallback: callroute was not reached), is shown as routed in a degraded way.
COMPLETE_REASONS = frozenset({"rule", "default"})
#: A call through callroute's dialplan that callroute did not decide (AGI failed).
FALLBACK = "fallback"
#: A call older than this is dropped from the live view (events were missed).
MAX_CALL_AGE_S = 6 * 3600.0
#: A ring older than this is closed (its end was missed: no Dial rings for 10 minutes).
MAX_RING_S = 600.0
#: How long an ended card is kept for a page that reconnects (beyond the wrap-up time).
ENDED_GRACE_S = 60.0
MAX_ENDED = 5000

RingState = Literal["ringing", "talking", "ended"]


class Event(Protocol):
    """A parsed AMI event (``ami.protocol.Message``): its name and headers."""

    @property
    def event(self) -> str | None: ...

    @property
    def headers(self) -> dict[str, str]: ...


def device_of_channel(channel: str | None) -> str | None:
    """The device of a channel name: ``PJSIP/7001`` from ``PJSIP/7001-0000002a``,
    ``Local/7001@agents`` from ``Local/7001@agents-00000001;1`` (as the call tracker reads
    them; this wing does not import ``ami``)."""
    if not channel:
        return None
    name = channel.split(";", 1)[0]
    base, sep, suffix = name.rpartition("-")
    return base if sep and suffix and "/" in base else name


def withheld(number: str | None) -> bool:
    """Whether a caller id number means "no number" (withheld, anonymous, none)."""
    if not number:
        return True
    compact = number.strip()
    return compact.lower() in ANONYMOUS or not any(ch.isdigit() for ch in compact)


#: Caller numbers shorter than this are the PBX's own extensions (as router.log masks).
MIN_EXTERNAL_DIGITS = 7


def external_number(number: str | None) -> bool:
    """Whether a caller id number is an outside caller's (not withheld, not a short
    extension of the PBX)."""
    return not withheld(number) and sum(ch.isdigit() for ch in str(number)) >= \
        MIN_EXTERNAL_DIGITS


def _name(name: str | None) -> str | None:
    """A caller id name worth showing (not "unknown", "Anonymous", "Restricted"...)."""
    return name if name and name.strip().lower() not in ANONYMOUS else None


def degraded_reason(reason: str | None, decided: bool) -> str | None:
    """Why a routed call was routed without a complete decision (None: it was not)."""
    if reason:
        return None if reason in COMPLETE_REASONS else reason
    return None if decided else FALLBACK


Enrich = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Sink:
    """One connected page: texts queue here and its connection's task sends them. A page
    that cannot keep up (queue full) is marked stale and closed by its task."""

    def __init__(self, agent: str | None = None, customers: bool = True,
                 limit: int = 256, reader: Reader | None = None, own: bool = False) -> None:
        self.agent = agent
        #: the agent's own page (signed in as that agent), not someone watching it: only
        #: such pages get the agent's calls awaiting a disposition
        self.own = own
        self.customers = customers
        #: who reads through this page, for the audit trail (None: not audited)
        self.reader = reader
        self.queue: asyncio.Queue[str] = asyncio.Queue(limit)
        self.stale = False

    def send(self, text: str) -> None:
        """Queue ``text`` (never blocks)."""
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            self.stale = True


@dataclass
class Ring:
    """One agent rung on one call."""

    agent: str
    device: str
    via: str                       # "dial" (owner / fixed agent) or "queue"
    queue: str | None
    since: float
    dest_uid: str | None
    state: RingState = "ringing"
    answered_at: float | None = None
    ended_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LiveCall:
    """What the live view knows of one call."""

    linkedid: str
    started: float
    caller: str | None = None
    caller_name: str | None = None
    did: str | None = None
    vars: dict[str, str] = field(default_factory=dict)
    decision: CallDecision | None = None
    queue: str | None = None
    waiting_since: float | None = None
    rings: dict[str, Ring] = field(default_factory=dict)
    answered_agent: str | None = None
    answered_at: float | None = None
    uids: set[str] = field(default_factory=set)
    counted: bool = False
    customer: dict[str, Any] | None = None


class LiveState:
    """Calls in progress, per-agent cards and the rolling figures of the last hour."""

    def __init__(
        self,
        agent_of: Callable[[str], str | None],
        decisions: DecisionStore | None = None,
        *,
        presence: Presence | None = None,
        roster: Callable[[], Mapping[str, tuple[str | None, str]]] | None = None,
        crm_url: str = "",
        wrapup_s: float = 120.0,
        enrich: Enrich | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.agent_of = agent_of
        self.decisions = decisions or DecisionStore()
        self.presence = presence
        self.roster = roster or dict
        self.crm_url = crm_url
        self.wrapup_s = wrapup_s
        self.enrich = enrich
        self.clock = clock
        #: told of every card pushed to a page with a reader (the audit of page reads);
        #: must not do I/O (it runs on the ring -> card path)
        self.on_card: Callable[[Reader, Mapping[str, Any]], None] | None = None
        self.calls: dict[str, LiveCall] = {}
        self._uid_lid: dict[str, str] = {}
        self._ended: OrderedDict[str, tuple[float, dict[str, dict[str, Any]]]] = OrderedDict()
        self._agent_sinks: dict[str, set[Sink]] = {}
        self._live_sinks: set[Sink] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: (call, agent) whose card is being completed (:meth:`_complete`)
        self._completing: set[tuple[str, str]] = set()
        self.rules_hour: Window[tuple[str, str]] = Window(3600.0, clock)
        self.owner_hour: Window[bool] = Window(3600.0, clock)
        self.lookups = Samples(900.0, clock)
        self.lookup_sources: Window[str] = Window(900.0, clock)
        self.dirty = True
        self.events = 0
        self._handlers: dict[str, Callable[[Mapping[str, str]], None]] = {
            "Newchannel": self._on_newchannel,
            "VarSet": self._on_varset,
            "DialBegin": self._on_dial_begin,
            "DialEnd": self._on_dial_end,
            "AgentCalled": self._on_agent_called,
            "AgentConnect": self._on_agent_connect,
            "AgentRingNoAnswer": self._on_ring_no_answer,
            "QueueCallerJoin": self._on_queue_join,
            "QueueCallerLeave": self._on_queue_leave,
            "QueueCallerAbandon": self._on_queue_leave,
            "Hangup": self._on_hangup,
        }

    # --- subscribers ----------------------------------------------------------------------
    def subscribe_agent(self, agent: str, sink: Sink) -> None:
        """Push ``agent``'s cards to ``sink`` (and nobody else's)."""
        self._agent_sinks.setdefault(agent, set()).add(sink)
        self.dirty = True

    def unsubscribe_agent(self, agent: str, sink: Sink) -> None:
        """Stop pushing to ``sink``."""
        sinks = self._agent_sinks.get(agent)
        if sinks is not None:
            sinks.discard(sink)
            if not sinks:
                del self._agent_sinks[agent]
        self.dirty = True

    def subscribe_live(self, sink: Sink) -> None:
        """Push the supervisor's snapshots to ``sink``."""
        self._live_sinks.add(sink)

    def unsubscribe_live(self, sink: Sink) -> None:
        """Stop pushing snapshots to ``sink``."""
        self._live_sinks.discard(sink)

    @property
    def live_sinks(self) -> set[Sink]:
        """The supervisors' pages connected here."""
        return self._live_sinks

    def online_agents(self) -> list[str]:
        """Agents with their own page connected to this instance (not only watched)."""
        return sorted(agent for agent in self._agent_sinks if self.has_own_page(agent))

    def note_lookup(self, source: str, elapsed_ms: float) -> None:
        """A lookup on the call path (from the decision store): for the CRM health panel."""
        self.lookup_sources.add(source)
        if source == "crm":
            self.lookups.add(elapsed_ms)

    # --- events ---------------------------------------------------------------------------
    def handle(self, msg: Event) -> None:
        """The AMI listener: one parsed event."""
        name = msg.event
        if name is None:
            return
        handler = self._handlers.get(name)
        if handler is not None:
            self.events += 1
            handler(msg.headers)

    def _call(self, h: Mapping[str, str]) -> LiveCall | None:
        lid = h.get("Linkedid")
        if not lid:
            return None
        call = self.calls.get(lid)
        if call is None:
            call = self.calls[lid] = LiveCall(lid, self.clock())
            self.dirty = True
        uid = h.get("Uniqueid")
        if uid and uid not in call.uids:
            call.uids.add(uid)
            self._uid_lid[uid] = lid
        return call

    def _on_newchannel(self, h: Mapping[str, str]) -> None:
        call = self._call(h)
        if call is not None and h.get("Uniqueid") == call.linkedid:
            num, name = h.get("CallerIDNum"), h.get("CallerIDName")
            call.caller = num if num and num.lower() not in ("<unknown>", "unknown") else None
            call.caller_name = _name(name)
            call.did = h.get("Exten") or None

    def _on_varset(self, h: Mapping[str, str]) -> None:
        var = h.get("Variable", "").lstrip("_")
        if var not in ROUTE_VARS and var != "ROUTE_ACTION":
            return
        call = self._call(h)
        if call is None:
            return
        value = h.get("Value", "")
        if var == "CALL_DID" and value:
            call.vars.setdefault(var, value)
            return
        if var == "ROUTE_ACTION":
            if not call.counted:
                call.counted = True
                self.rules_hour.add((call.vars.get("ROUTE_RULE", "?"),
                                     call.vars.get("ROUTE_REASON", "?")))
                self.dirty = True
        elif value:
            call.vars[var] = value

    def _decision_of(self, call: LiveCall, h: Mapping[str, str]) -> None:
        """Attach the routing decision made on the channel of ``h`` (the one dialling or
        queueing), and take the caller id from it if the call has none yet."""
        uid = h.get("Uniqueid")
        if call.decision is None and uid:
            call.decision = d = self.decisions.get(uid)
            if d is not None and not call.counted:  # no ROUTE_ACTION seen: count it here
                call.counted = True
                self.rules_hour.add((d.rule, d.reason))
        if call.caller is None:
            num = h.get("CallerIDNum")
            if num and num.lower() not in ("<unknown>", "unknown"):
                call.caller = num
                name = h.get("CallerIDName")
                if not call.caller_name:
                    call.caller_name = _name(name)

    def _on_dial_begin(self, h: Mapping[str, str]) -> None:
        uid = h.get("Uniqueid")
        if not uid:
            return  # an Originate's dial: no caller channel
        device = device_of_channel(h.get("DestChannel"))
        agent = self.agent_of(device) if device else None
        if agent is None or device is None:
            return
        call = self._call(h)
        if call is None:
            return
        self._decision_of(call, h)
        via = "queue" if call.waiting_since is not None else "dial"
        self._ring(call, agent, device, via, call.queue if via == "queue" else None,
                   h.get("DestUniqueid"))

    def _on_agent_called(self, h: Mapping[str, str]) -> None:
        interface = h.get("Interface")
        if not interface:
            return
        device = device_of(interface)
        agent = self.agent_of(device)
        call = self._call(h)
        if agent is None or call is None:
            return
        self._decision_of(call, h)
        queue = h.get("Queue") or call.queue
        call.queue = queue
        self._ring(call, agent, device, "queue", queue, h.get("DestUniqueid"))

    @staticmethod
    def _decided(call: LiveCall) -> bool:
        """Whether callroute decided this call's route (not only the dialplan's fallback)."""
        return call.decision is not None or call.counted or \
            any(name != "CALL_DID" for name in call.vars)

    @staticmethod
    def _routed(call: LiveCall) -> bool:
        """Whether callroute routed this call (a decision here, or its variables seen):
        internal calls between extensions pop no card."""
        return call.decision is not None or bool(call.vars)

    def _ring(self, call: LiveCall, agent: str, device: str, via: str, queue: str | None,
              dest_uid: str | None) -> None:
        if not self._routed(call):
            return
        ring = call.rings.get(agent)
        if ring is not None and ring.state == "ringing":
            if dest_uid and ring.dest_uid is None:
                ring.dest_uid = dest_uid
            return
        ring = call.rings[agent] = Ring(agent, device, via, queue, self.clock(), dest_uid)
        if dest_uid:
            self._uid_lid[dest_uid] = call.linkedid
        self.dirty = True
        if not self._agent_sinks.get(agent):
            return  # no page open: nothing to build
        card = self.card(call, ring)
        self._push(agent, {"type": "card", "card": card})
        self._complete(call.linkedid, agent, card)

    def _answered(self, call: LiveCall, agent: str) -> None:
        if call.answered_agent is not None:
            return
        now = self.clock()
        call.answered_agent, call.answered_at = agent, now
        call.waiting_since = None
        self.dirty = True
        if not self._routed(call):
            return
        for other, ring in list(call.rings.items()):
            if other == agent:
                ring.state, ring.answered_at = "talking", now
                self._push(agent, {"type": "card", "card": self.card(call, ring)})
            elif ring.state == "ringing":
                self._close(call, other, "taken")
        if agent not in call.rings:  # answered without a ring we saw (events missed)
            device = ""
            ring = call.rings[agent] = Ring(agent, device, "dial", call.queue, now, None,
                                            "talking", now)
            self._push(agent, {"type": "card", "card": self.card(call, ring)})

    def _not_answered(self, call: LiveCall, agent: str) -> None:
        ring = call.rings.get(agent)
        if ring is not None and ring.state == "ringing":
            self._close(call, agent, "missed")

    def _dest_agent(self, h: Mapping[str, str]) -> str | None:
        device = device_of_channel(h.get("DestChannel"))
        return self.agent_of(device) if device else None

    def _on_dial_end(self, h: Mapping[str, str]) -> None:
        agent = self._dest_agent(h)
        call = self.calls.get(h.get("Linkedid", ""))
        if agent is None or call is None or not h.get("Uniqueid"):
            return
        if h.get("DialStatus") == "ANSWER":
            self._answered(call, agent)
        else:
            self._not_answered(call, agent)

    def _on_agent_connect(self, h: Mapping[str, str]) -> None:
        interface = h.get("Interface")
        call = self.calls.get(h.get("Linkedid", ""))
        agent = self.agent_of(device_of(interface)) if interface else None
        if agent is not None and call is not None:
            self._answered(call, agent)

    def _on_ring_no_answer(self, h: Mapping[str, str]) -> None:
        interface = h.get("Interface")
        call = self.calls.get(h.get("Linkedid", ""))
        agent = self.agent_of(device_of(interface)) if interface else None
        if agent is not None and call is not None:
            self._not_answered(call, agent)

    def _on_queue_join(self, h: Mapping[str, str]) -> None:
        call = self._call(h)
        if call is not None:
            call.queue = h.get("Queue") or call.queue
            call.waiting_since = self.clock()
            self._decision_of(call, h)
            self.dirty = True

    def _on_queue_leave(self, h: Mapping[str, str]) -> None:
        call = self.calls.get(h.get("Linkedid", ""))
        if call is not None:
            call.waiting_since = None
            self.dirty = True

    def _on_hangup(self, h: Mapping[str, str]) -> None:
        uid = h.get("Uniqueid", "")
        lid = self._uid_lid.pop(uid, None) or h.get("Linkedid", "")
        call = self.calls.get(lid)
        if call is None:
            return
        call.uids.discard(uid)
        for ring in list(call.rings.values()):
            if ring.dest_uid == uid:
                self._ring_over(call, ring)
        if not call.uids:
            self._forget(call)

    def _close(self, call: LiveCall, agent: str, why: str) -> None:
        """Take ``agent``'s card of ``call`` off its pages, saying ``why``."""
        del call.rings[agent]
        self._push(agent, {"type": "close", "call": call.linkedid, "why": why})
        self.dirty = True

    def _forget(self, call: LiveCall, close: str | None = None) -> None:
        """Drop ``call`` and its channels; its cards end as on a hangup (closed if
        ringing, ended if talking) or, with ``close``, all close saying so."""
        uids = call.uids | {r.dest_uid for r in call.rings.values() if r.dest_uid}
        for ring in list(call.rings.values()):
            if close is None:
                self._ring_over(call, ring)
            else:
                self._close(call, ring.agent, close)
        for uid in uids:
            self._uid_lid.pop(uid, None)
        del self.calls[call.linkedid]
        self.dirty = True

    def _ring_over(self, call: LiveCall, ring: Ring) -> None:
        if ring.state == "ringing":
            self._close(call, ring.agent, "hangup")
        elif ring.state == "talking":
            ring.state, ring.ended_at = "ended", self.clock()
            card = self.card(call, ring)
            self._remember_ended(call.linkedid, ring.agent, card)
            self._push(ring.agent, {"type": "card", "card": card})
        self.dirty = True

    def resync(self, channels: Sequence[Event]) -> int:
        """After an AMI (re)connect: the channels alive now (``CoreShowChannels``). Calls
        none of whose channels is alive ended while the link was down: their cards close
        (ringing) or end (talking). Returns how many calls ended so."""
        alive = {uid for msg in channels if (uid := msg.headers.get("Uniqueid"))}
        gone = [call for call in self.calls.values() if not call.uids & alive]
        for call in gone:
            self._forget(call)
        if gone:
            log.info("live view: %d call(s) ended while AMI was away", len(gone))
        return len(gone)

    # --- after the call -------------------------------------------------------------------
    def _remember_ended(self, lid: str, agent: str, card: dict[str, Any]) -> None:
        entry = self._ended.get(lid)
        cards = entry[1] if entry is not None else {}
        cards[agent] = card
        self._ended[lid] = (self.clock(), cards)
        self._ended.move_to_end(lid)
        while len(self._ended) > MAX_ENDED:
            self._ended.popitem(last=False)

    def answered_by(self, lid: str) -> str | None:
        """The agent who answered call ``lid`` (in progress or recently ended)."""
        call = self.calls.get(lid)
        if call is not None:
            return call.answered_agent
        entry = self._ended.get(lid)
        if entry is None:
            return None
        return next((a for a, c in entry[1].items() if c.get("answered_at")), None)

    def rung_to(self, lid: str, agent: str) -> bool:
        """Whether call ``lid`` (in progress or recently ended) rang ``agent`` here and
        was not answered by another agent."""
        call = self.calls.get(lid)
        if call is not None:
            return agent in call.rings and call.answered_agent in (None, agent)
        entry = self._ended.get(lid)
        return entry is not None and agent in entry[1] and \
            self.answered_by(lid) in (None, agent)

    def shown_name(self, lid: str, agent: str) -> str | None:
        """The name ``agent``'s card of call ``lid`` shows (the customer's, else the
        caller id name), while this instance still has the card."""
        entry = self._ended.get(lid)
        card = entry[1].get(agent) if entry is not None else None
        if card is None:
            call = self.calls.get(lid)
            ring = call.rings.get(agent) if call is not None else None
            if call is None or ring is None:
                return None
            card = self.card(call, ring)
        customer = card.get("customer") or {}
        name = customer.get("name") or card.get("caller_name")
        return str(name) if name else None

    def push_own(self, agent: str, message: Mapping[str, Any]) -> list[Sink]:
        """Push ``message`` to ``agent``'s own pages only (not to those watching them);
        returns the pages it went to."""
        own = [sink for sink in self._agent_sinks.get(agent, ()) if sink.own]
        if own:
            text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
            for sink in own:
                sink.send(text)
        return own

    def has_own_page(self, agent: str) -> bool:
        """Whether ``agent``'s own page is connected here."""
        return any(sink.own for sink in self._agent_sinks.get(agent, ()))

    def done(self, lid: str, agent: str, why: str) -> None:
        """The agent's after-call work on ``lid`` is over: close its card (no page is
        shown it again; it is still remembered as the agent's call until swept, so a
        second disposition is told it came too late, not that the call is another's)."""
        entry = self._ended.get(lid)
        card = entry[1].get(agent) if entry is not None else None
        if entry is not None and card is not None:
            entry[1][agent] = {**card, "done": True}
        self._push(agent, {"type": "close", "call": lid, "why": why})

    # --- what a page is shown -------------------------------------------------------------
    def cards_for(self, agent: str) -> list[dict[str, Any]]:
        """The cards ``agent`` should see now (for a page that just connected)."""
        cards = [self.card(call, call.rings[agent]) for call in self.calls.values()
                 if agent in call.rings]
        now = self.clock()
        for ended_at, by_agent in self._ended.values():
            card = by_agent.get(agent)
            if card is not None and not card.get("done") and \
                    now - ended_at <= self.wrapup_s + ENDED_GRACE_S:
                cards.append(card)
        for card in cards:  # rung before any page of the agent was open: complete it now
            self._complete(card["call"], agent, card)
        return cards

    def card(self, call: LiveCall, ring: Ring) -> dict[str, Any]:
        """The screen-pop card of ``call`` as ``ring.agent`` sees it."""
        d = call.decision
        v = call.vars
        customer: dict[str, Any] | None = None
        if d is not None and d.customer is not None:
            if call.customer is None:  # once per call, not per card
                call.customer = d.customer.model_dump(mode="json", exclude={"updated_at"})
            customer = call.customer
        elif v.get("CRM_CUSTOMER_ID"):
            customer = {"id": v["CRM_CUSTOMER_ID"], "tier": v.get("CRM_TIER"),
                        "owner": v.get("CRM_OWNER")}
        if ring.extra.get("customer"):  # completed after the ring (another instance's
            customer = {**(customer or {}), **ring.extra["customer"]}  # call, a late CRM)
        crm_link = None
        if customer is not None and self.crm_url:
            crm_link = self.crm_url.replace("{id}", quote(str(customer["id"]), safe=""))
        rule = d.rule if d is not None else v.get("ROUTE_RULE")
        reason = d.reason if d is not None else v.get("ROUTE_REASON")
        caller = (d.caller if d is not None and d.caller else None) or call.caller
        anonymous = withheld(caller)
        return {
            "call": call.linkedid,
            "agent": ring.agent,
            "state": ring.state,
            "rang_at": ring.since,
            "answered_at": ring.answered_at,
            "ended_at": ring.ended_at,
            "wrapup_until": (ring.ended_at + self.wrapup_s
                             if ring.ended_at is not None and self.wrapup_s > 0 else None),
            "via": ring.via,
            "queue": ring.queue,
            "caller": None if anonymous else caller,
            "caller_name": call.caller_name,
            "anonymous": anonymous,
            "degraded": degraded_reason(reason, self._decided(call)),
            "did": call.did,
            "customer": customer,
            "crm_link": crm_link,
            "why": {
                "rule": rule,
                "description": d.description if d is not None else None,
                "reason": reason,
                "note": d.note if d is not None else None,
                "target": d.target if d is not None else v.get("ROUTE_TARGET"),
                "queue": d.queue if d is not None else v.get("ROUTE_QUEUE"),
                "owner": bool(customer and customer.get("owner") == ring.agent),
            },
            # None while being read; [] when there are none (or nothing reads them)
            "last_calls": ring.extra.get("last_calls", None if self.enrich else []),
            "last_calls_error": bool(ring.extra.get("last_calls_error")),
        }

    def _push(self, agent: str, message: dict[str, Any]) -> None:
        sinks = self._agent_sinks.get(agent)
        if not sinks:
            return
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        audit = self.on_card if message["type"] == "card" else None
        for sink in sinks:
            sink.send(text)
            if audit is not None and sink.reader is not None:
                audit(sink.reader, message["card"])

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _complete(self, lid: str, agent: str, card: dict[str, Any]) -> None:
        """Complete ``card`` (the customer from the cache, the last calls) in the
        background, unless it is complete or being completed."""
        if self.enrich is None or card.get("last_calls") is not None or \
                card.get("last_calls_error") or (lid, agent) in self._completing:
            return
        self._completing.add((lid, agent))
        self._spawn(self._enrich(lid, agent, card))

    async def _enrich(self, lid: str, agent: str, card: dict[str, Any]) -> None:
        """Complete the card and push it; it always ends with its last calls read, or
        said not readable (the page never waits for them forever)."""
        assert self.enrich is not None
        try:
            extra = dict(await self.enrich(card))
        except Exception:
            log.exception("could not complete the card of call %s", lid)
            extra = {"last_calls_error": True}
        finally:
            self._completing.discard((lid, agent))
        if not extra.get("last_calls_error"):
            extra.setdefault("last_calls", [])  # none kept (no history here)
        call = self.calls.get(lid)
        ring = call.rings.get(agent) if call is not None else None
        entry = self._ended.get(lid)
        kept = entry[1].get(agent) if entry is not None else None
        if call is not None and ring is not None:
            ring.extra.update(extra)
            card = self.card(call, ring)
            if kept is not None and ring.state == "ended":
                kept.update(card)  # the ended card a reconnecting page gets
        elif kept is not None:  # the call ended meanwhile: its ended card, kept for the
            self._apply(kept, extra)  # wrap-up, is completed
            card = kept
        else:
            return
        if kept is None or not kept.get("done"):  # (a card closed stays closed)
            self._push(agent, {"type": "card", "card": card})

    def _apply(self, card: dict[str, Any], extra: Mapping[str, Any]) -> None:
        """Put what completing a card found onto an already built ``card``."""
        if extra.get("customer"):
            customer = {**(card.get("customer") or {}), **extra["customer"]}
            card["customer"] = customer
            if self.crm_url:
                card["crm_link"] = self.crm_url.replace("{id}",
                                                        quote(str(customer["id"]), safe=""))
        card["last_calls"] = extra.get("last_calls")
        card["last_calls_error"] = bool(extra.get("last_calls_error"))

    async def aclose(self) -> None:
        """Cancel card completions still running."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- housekeeping and the supervisor's view ----------------------------------------------
    def sweep(self) -> int:
        """Drop calls older than :data:`MAX_CALL_AGE_S` (their end was missed) and ended
        cards past their wrap-up; return how many calls were dropped."""
        now = self.clock()
        for call in self.calls.values():  # no phone rings this long: its end was missed
            for ring in [r for r in call.rings.values()
                         if r.state == "ringing" and now - r.since > MAX_RING_S]:
                self._close(call, ring.agent, "missed")
        old = [c for c in self.calls.values() if now - c.started > MAX_CALL_AGE_S]
        for call in old:
            self._forget(call, close="hangup")  # no wrap-up for a call this old
        keep = self.wrapup_s + ENDED_GRACE_S
        while self._ended:
            lid, (ended_at, _) = next(iter(self._ended.items()))
            if now - ended_at <= keep:
                break
            del self._ended[lid]
        if old:
            log.warning("dropped %d call(s) from the live view: no hangup seen for %.0f h",
                        len(old), MAX_CALL_AGE_S / 3600)
            self.dirty = True
        return len(old)

    def note_record(self, record: Mapping[str, Any]) -> None:
        """A finished call's record: counts owner-routed calls and owner answers."""
        target = record.get("route_target")
        if not target:
            return
        answered = record.get("answered_by")
        self.owner_hour.add(bool(answered) and device_of(str(answered)) == device_of(target))
        self.dirty = True

    def snapshot(self, *, customers: bool) -> dict[str, Any]:
        """The supervisor's live figures (customer names and numbers only with
        ``customers``)."""
        now = self.clock()
        queues: dict[str, dict[str, Any]] = {}
        calls: list[dict[str, Any]] = []
        busy: dict[str, str] = {}
        for call in self.calls.values():
            if call.answered_agent is not None:
                state = "talking"
            elif call.waiting_since is not None:
                state = "waiting"
            elif call.rings:
                state = "ringing"
            else:
                state = "routing"
            for agent, ring in call.rings.items():
                if ring.state != "ended":
                    busy[agent] = ring.state
            key = call.queue or "-"
            q = queues.setdefault(key, {"waiting": 0, "talking": 0, "ringing": 0,
                                        "longest_wait_s": 0.0})
            if state in ("waiting", "talking", "ringing"):
                q[state] += 1
            wait = now - call.waiting_since if call.waiting_since is not None else None
            if wait is not None:
                q["longest_wait_s"] = max(q["longest_wait_s"], round(wait, 1))
            d = call.decision
            caller = (d.caller if d and d.caller else None) or call.caller
            row: dict[str, Any] = {
                "call": call.linkedid, "state": state, "queue": call.queue,
                "agent": call.answered_agent, "wait_s": round(wait, 1) if wait else None,
                "since_s": round(now - call.started, 1),
                "tier": (d.customer.tier if d and d.customer else call.vars.get("CRM_TIER")),
                "rule": d.rule if d else call.vars.get("ROUTE_RULE"),
                "anonymous": withheld(caller),
                # a caller from outside (routed by callroute, or an outside number): its
                # name is a customer's; an internal call's caller id name is a colleague's
                "external": self._routed(call) or external_number(caller),
                "degraded": (degraded_reason(d.reason if d else call.vars.get("ROUTE_REASON"),
                                             self._decided(call))
                             if self._routed(call) else None),
            }
            if customers:
                row["customer"] = (d.customer.name if d and d.customer else None) or \
                    call.caller_name
                row["customer_id"] = (d.customer.id if d and d.customer
                                      else call.vars.get("CRM_CUSTOMER_ID"))
            calls.append(row)
        presence = self.presence.snapshot() if self.presence is not None else {}
        agents = []
        for agent_id, (name, dial) in sorted(self.roster().items()):
            agents.append({
                "id": agent_id, "name": name, "device": device_of(dial),
                "presence": presence.get(device_of(dial)), "call": busy.get(agent_id),
                "page": self.has_own_page(agent_id),
            })
        rules = self.rules_hour.counts()
        owner = self.owner_hour.counts()
        routed = owner[True] + owner[False]
        lat = self.lookups.values()
        sources = self.lookup_sources.counts()
        waits = [c["wait_s"] for c in calls if c["wait_s"] is not None]
        return {
            "at": now,
            "waiting": sum(q["waiting"] for q in queues.values()),
            "talking": sum(q["talking"] for q in queues.values()),
            "longest_wait_s": max(waits, default=0.0),
            "queues": queues,
            "calls": sorted(calls, key=lambda c: -c["since_s"]),
            "agents": agents,
            "rules_hour": [{"rule": r, "reason": why, "calls": n}
                           for (r, why), n in sorted(rules.items(), key=lambda kv: -kv[1])],
            "owner_hour": {"routed": routed, "answered": owner[True],
                           "rate": owner[True] / routed if routed else None},
            "lookups": {"crm_p50_ms": percentile(lat, 0.5), "crm_p95_ms": percentile(lat, 0.95),
                        "crm_calls": len(lat),
                        "sources": {str(k): v for k, v in sources.items()}},
        }
