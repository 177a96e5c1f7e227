"""The live view fed with recorded Asterisk 22 events: who gets which card, when it
changes and closes, and what the supervisor's snapshot says (pure: no I/O)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from ami.peer import Recording
from ami.protocol import Message
from router.models import Customer
from router.rules.presence import Presence
from router.web.decisions import CallDecision, DecisionStore
from router.web.live import MAX_CALL_AGE_S, MAX_RING_S, LiveState, Sink

AGENTS = {"Local/7001@agents": "7001", "Local/7002@agents": "7002",
          "Local/7008@agents": "7008", "Local/7009@agents": "7009",
          "Local/7101@agents": "7101"}


class Clock:
    """A settable clock."""

    def __init__(self) -> None:
        self.now = 1_795_338_333.0

    def __call__(self) -> float:
        return self.now


def events(fixtures_dir: Path) -> list[Message]:
    """Every event of the basic recording (four calls)."""
    return Recording.load(fixtures_dir / "ami-basic.raw").parsed


def drained(sink: Sink) -> list[dict[str, Any]]:
    """Messages queued on ``sink``, decoded, in order."""
    out = []
    while not sink.queue.empty():
        out.append(json.loads(sink.queue.get_nowait()))
    return out


def steps(messages: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(type, call, state-or-why) of each message."""
    return [(m["type"], m["card"]["call"] if m["type"] == "card" else m["call"],
             m["card"]["state"] if m["type"] == "card" else m["why"]) for m in messages]


def li_lei_decision(at: float) -> CallDecision:
    """What the route handler decided for call 1 on its AGI channel."""
    customer = Customer(id="C-1001", name="Li Lei", tier="gold", value=52000, owner="7001",
                        tags=("repeat-buyer",), open_tickets=1, language="zh")
    return CallDecision("1795338333.1", at, "+8613800138000", customer, "vip-owner", "rule",
                        "Gold and platinum customers ring their owner", "1 condition(s) hold",
                        "Local/7001@agents", "vip", "dial", "lru", 0.2)


async def test_each_agent_gets_only_its_own_cards_in_order(fixtures_dir: Path) -> None:
    """Replaying the four recorded calls: 7001 gets call 1 (ring, talk, end) and call 3
    closed as taken when 7002 answers the ringall queue; 7009 (busy) and 7008 (no answer)
    get a ring that closes as missed; 7101 gets call 2 from the vip queue."""
    clock = Clock()
    store = DecisionStore(clock=clock)
    store.add(li_lei_decision(clock.now))
    live = LiveState(AGENTS.get, store, clock=clock, crm_url="https://crm/c/{id}")
    sinks = {a: Sink(agent=a) for a in AGENTS.values()}
    for agent, sink in sinks.items():
        live.subscribe_agent(agent, sink)
    for msg in events(fixtures_dir):
        live.handle(msg)
    got = {a: drained(s) for a, s in sinks.items()}
    c1, c2, c3 = "1795338333.0", "1795338363.4", "1795338393.10"
    assert steps(got["7001"]) == [("card", c1, "ringing"), ("card", c1, "talking"),
                                  ("card", c1, "ended"), ("card", c3, "ringing"),
                                  ("close", c3, "taken")]
    assert steps(got["7002"]) == [("card", c3, "ringing"), ("card", c3, "talking"),
                                  ("card", c3, "ended")]
    assert steps(got["7009"]) == [("card", c2, "ringing"), ("close", c2, "missed")]
    assert steps(got["7008"]) == [("card", c3, "ringing"), ("close", c3, "missed")]
    assert steps(got["7101"]) == [("card", c2, "ringing"), ("card", c2, "talking"),
                                  ("card", c2, "ended")]
    first = got["7001"][0]["card"]
    assert first["customer"]["name"] == "Li Lei"
    assert first["customer"]["value"] == 52000
    assert first["why"] == {"rule": "vip-owner", "description":
                            "Gold and platinum customers ring their owner", "reason": "rule",
                            "note": "1 condition(s) hold", "target": "Local/7001@agents",
                            "queue": "vip", "owner": True}
    assert first["via"] == "dial"
    assert first["crm_link"] == "https://crm/c/C-1001"
    queued = got["7101"][0]["card"]
    assert queued["via"] == "queue"
    assert queued["queue"] == "vip"
    assert queued["caller"] == "13900139000"  # no decision here: from the channel
    assert queued["customer"] is None or queued["customer"]["id"]
    assert live.calls == {}  # every call ended
    assert live.answered_by(c1) == "7001"
    assert live.answered_by(c3) == "7002"


async def test_a_page_that_connects_late_gets_current_and_ended_cards(
    fixtures_dir: Path,
) -> None:
    """cards_for() gives a (re)connecting page what it should show: the ringing card
    mid-call, the ended card during wrap-up, nothing after the wrap-up time."""
    clock = Clock()
    live = LiveState(AGENTS.get, clock=clock, wrapup_s=60)
    msgs = events(fixtures_dir)
    for msg in msgs[:51]:
        live.handle(msg)
    assert [c["state"] for c in live.cards_for("7001")] == ["ringing"]
    assert live.cards_for("7002") == []
    for msg in msgs[51:102]:
        live.handle(msg)
    assert [c["state"] for c in live.cards_for("7001")] == ["ended"]
    clock.now += 60 + 61
    assert live.cards_for("7001") == []
    live.done("1795338333.0", "7001", "done")
    assert live.cards_for("7001") == []


async def test_snapshot_counts_waiting_talking_and_hides_customers_by_role(
    fixtures_dir: Path,
) -> None:
    """Mid-call-2 the snapshot shows the call waiting in the vip queue with its wait,
    agents with presence; customer names only when asked for."""
    clock = Clock()
    presence = Presence()
    presence.update("Local/7101@agents", "NOT_INUSE")
    live = LiveState(AGENTS.get, clock=clock, presence=presence,
                     roster=lambda: {a: (f"name {a}", f"{d}/n") for d, a in AGENTS.items()})
    msgs = events(fixtures_dir)
    for msg in msgs[:170]:  # call 2 has just joined the vip queue
        live.handle(msg)
    clock.now += 12
    snap = live.snapshot(customers=True)
    assert snap["waiting"] == 1
    assert snap["talking"] == 0
    assert snap["queues"]["vip"]["waiting"] == 1
    assert snap["queues"]["vip"]["longest_wait_s"] == pytest.approx(12.0)
    assert snap["longest_wait_s"] == pytest.approx(12.0)
    row = snap["calls"][0]
    assert row["state"] == "waiting"
    assert "customer" in row
    assert row["external"] is True  # a caller from outside, routed by callroute
    hidden = live.snapshot(customers=False)
    assert "customer" not in hidden["calls"][0]
    assert "customer_id" not in hidden["calls"][0]
    desk = next(a for a in snap["agents"] if a["id"] == "7101")
    assert desk["presence"] == "NOT_INUSE"
    assert desk["device"] == "Local/7101@agents"
    for msg in msgs[170:200]:  # 7101 answers
        live.handle(msg)
    snap = live.snapshot(customers=False)
    assert snap["talking"] == 1
    assert snap["waiting"] == 0
    assert next(a for a in snap["agents"] if a["id"] == "7101")["call"] == "talking"


def _varset(lid: str, var: str, value: str) -> Message:
    return Message({"Event": "VarSet", "Uniqueid": lid, "Linkedid": lid, "Variable": var,
                    "Value": value})


async def test_rules_owner_rate_and_lookup_windows_roll_over_an_hour() -> None:
    """Calls by rule and reason are counted once per call (at ROUTE_ACTION) and leave the
    window after an hour; owner-answer rate counts owner-routed records only."""
    clock = Clock()
    live = LiveState(AGENTS.get, clock=clock)
    for lid, rule, reason in (("a.1", "vip-owner", "rule"), ("b.1", "vip-owner", "rule"),
                              ("c.1", "default", "deadline")):
        live.handle(_varset(lid, "ROUTE_RULE", rule))
        live.handle(_varset(lid, "ROUTE_REASON", reason))
        live.handle(_varset(lid, "ROUTE_ACTION", "queue"))
        live.handle(_varset(lid, "ROUTE_ACTION", "queue"))  # set twice: counted once
    live.note_record({"route_target": "Local/7001@agents", "answered_by": "Local/7001@agents"})
    live.note_record({"route_target": "Local/7001@agents", "answered_by": "Local/7101@agents"})
    live.note_record({"route_target": None, "answered_by": "Local/7101@agents"})
    live.note_lookup("crm", 120.0)
    live.note_lookup("crm", 80.0)
    live.note_lookup("lru", 0.1)
    snap = live.snapshot(customers=False)
    assert snap["rules_hour"] == [{"rule": "vip-owner", "reason": "rule", "calls": 2},
                                  {"rule": "default", "reason": "deadline", "calls": 1}]
    assert snap["owner_hour"] == {"routed": 2, "answered": 1, "rate": 0.5}
    assert snap["lookups"]["crm_p50_ms"] == 80.0
    assert snap["lookups"]["crm_calls"] == 2
    assert snap["lookups"]["sources"] == {"crm": 2, "lru": 1}
    clock.now += 3601
    snap = live.snapshot(customers=False)
    assert snap["rules_hour"] == []
    assert snap["owner_hour"]["routed"] == 0
    assert snap["lookups"]["crm_calls"] == 0


async def test_stale_calls_are_swept_and_slow_pages_marked() -> None:
    """A call whose hangup never came is dropped after MAX_CALL_AGE_S with its card
    closed; a page whose queue is full is marked stale instead of blocking the loop."""
    clock = Clock()
    live = LiveState(AGENTS.get, clock=clock)
    sink = Sink(agent="7001", limit=2)
    live.subscribe_agent("7001", sink)
    live.handle(_varset("x.1", "ROUTE_QUEUE", "support"))
    live.handle(Message({"Event": "DialBegin", "Uniqueid": "x.2", "Linkedid": "x.1",
                         "DestChannel": "Local/7001@agents-00000001;1",
                         "DestUniqueid": "x.3"}))
    assert live.sweep() == 0
    clock.now += MAX_CALL_AGE_S + 1
    assert live.sweep() == 1
    assert [m["type"] for m in drained(sink)] == ["card", "close"]
    for _ in range(3):
        sink.send("x")
    assert sink.stale
    await asyncio.sleep(0)


async def test_unknown_devices_and_malformed_events_change_nothing() -> None:
    """Events for devices not in the agents table, without Linkedid, or of no interest
    create no card and raise nothing."""
    live = LiveState(AGENTS.get)
    sink = Sink(agent="7001")
    live.subscribe_agent("7001", sink)
    for headers in ({"Event": "DialBegin", "Uniqueid": "u", "Linkedid": "l",
                     "DestChannel": "PJSIP/9999-0001"},
                    {"Event": "DialBegin", "DestChannel": "Local/7001@agents-1;1"},
                    {"Event": "AgentCalled", "Uniqueid": "u", "Linkedid": "l"},
                    {"Event": "AgentConnect", "Linkedid": "nope", "Interface": "Local/7001@agents"},
                    {"Event": "Hangup", "Uniqueid": "zz"},
                    {"Event": "VarSet", "Variable": "ROUTE_RULE", "Value": "x"},
                    {"Response": "Success"}):
        live.handle(Message(headers))
    assert sink.queue.empty()


async def test_calls_callroute_did_not_route_pop_no_card() -> None:
    """An internal call (no decision, no ROUTE_*/CRM_* variable) ringing and answered by
    7001 puts nothing on 7001's page; the supervisor still sees it talking."""
    live = LiveState(AGENTS.get)
    sink = Sink(agent="7001")
    live.subscribe_agent("7001", sink)
    for headers in ({"Event": "Newchannel", "Uniqueid": "i.1", "Linkedid": "i.1",
                     "CallerIDNum": "7002"},
                    {"Event": "DialBegin", "Uniqueid": "i.1", "Linkedid": "i.1",
                     "DestChannel": "Local/7001@agents-00000009;1", "DestUniqueid": "i.2"},
                    {"Event": "DialEnd", "Uniqueid": "i.1", "Linkedid": "i.1",
                     "DestChannel": "Local/7001@agents-00000009;1", "DialStatus": "ANSWER"}):
        live.handle(Message(headers))
    assert sink.queue.empty()
    assert live.snapshot(customers=True)["talking"] == 1


async def test_calls_that_ended_while_ami_was_away_close_their_cards(
    fixtures_dir: Path,
) -> None:
    """After a reconnect, resync() with the channels alive ends the calls none of whose
    channels is left: a ringing card closes, a talking one ends (for the disposition);
    a call still alive stays."""
    clock = Clock()
    live = LiveState(AGENTS.get, clock=clock)
    sinks = {a: Sink(agent=a) for a in ("7001", "7009")}
    for agent, sink in sinks.items():
        live.subscribe_agent(agent, sink)
    msgs = events(fixtures_dir)
    for msg in msgs[:60]:   # call 1 answered by 7001
        live.handle(msg)
    for msg in msgs[102:154]:  # call 2 ringing 7009
        live.handle(msg)
    drained(sinks["7001"]), drained(sinks["7009"])
    alive = [Message({"Event": "CoreShowChannel", "Uniqueid": "1795338363.5"})]
    assert live.resync(alive) == 1
    assert steps(drained(sinks["7001"])) == [("card", "1795338333.0", "ended")]
    assert drained(sinks["7009"]) == []
    assert list(live.calls) == ["1795338363.4"]
    clock.now += MAX_RING_S + 1
    live.sweep()
    assert steps(drained(sinks["7009"])) == [("close", "1795338363.4", "missed")]


async def test_a_page_watching_an_agent_does_not_make_the_agent_online() -> None:
    """Only the agent's own page counts as the agent's page being open (online: the
    records of calls it answers wait for its disposition; the live view's page column):
    a supervisor watching it does not, before the agent's page opens or after it closed."""
    live = LiveState(AGENTS.get, roster=lambda: {"7001": ("Li Na", "Local/7001@agents")})
    watcher, own = Sink(agent="7001"), Sink(agent="7001", own=True)
    live.subscribe_agent("7001", watcher)
    assert live.online_agents() == []
    assert live.snapshot(customers=False)["agents"][0]["page"] is False
    live.subscribe_agent("7001", own)
    assert live.online_agents() == ["7001"]
    assert live.snapshot(customers=False)["agents"][0]["page"] is True
    live.unsubscribe_agent("7001", own)
    assert live.online_agents() == []
    assert live.snapshot(customers=False)["agents"][0]["page"] is False


async def test_a_card_always_ends_with_its_last_calls_or_saying_they_failed(
    fixtures_dir: Path,
) -> None:
    """The card's last calls are None only while they are being read: a completion that
    fails says so (``last_calls_error``), one that finds no history gives [] (the page
    shows its empty text, never "…" for ever); a page that connects after the ring gets
    its card completed then; a completion that ends after the call did completes the
    ended card a reconnecting page is given; without any completion the card has []."""
    msgs = events(fixtures_dir)
    answers: list[Any] = [RuntimeError("history down"), {}]
    asked: list[str] = []

    async def enrich(card: dict[str, Any]) -> dict[str, Any]:
        asked.append(card["state"])
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    clock = Clock()
    live = LiveState(AGENTS.get, clock=clock, wrapup_s=60, enrich=enrich)
    sink = Sink(agent="7001")
    live.subscribe_agent("7001", sink)
    for msg in msgs[:51]:  # call 1 rings 7001
        live.handle(msg)
    first = drained(sink)[0]["card"]
    assert (first["last_calls"], first["last_calls_error"]) == (None, False)
    await asyncio.sleep(0.01)
    (failed,) = drained(sink)
    assert (failed["card"]["last_calls"], failed["card"]["last_calls_error"]) == (None, True)

    late = LiveState(AGENTS.get, clock=clock, wrapup_s=60, enrich=enrich)
    for msg in msgs[:51]:  # no page open while it rings: nothing read yet
        late.handle(msg)
    assert len(asked) == 1
    (card,) = late.cards_for("7001")  # a page connects
    assert card["last_calls"] is None
    late.subscribe_agent("7001", sink)
    await asyncio.sleep(0.01)
    (done,) = drained(sink)
    assert (done["card"]["last_calls"], done["card"]["last_calls_error"]) == ([], False)
    assert late.cards_for("7001")[0]["last_calls"] == []

    gate = asyncio.Event()

    async def slow(card: dict[str, Any]) -> dict[str, Any]:
        await gate.wait()
        return {"last_calls": [{"call": "earlier"}]}

    ended = LiveState(AGENTS.get, clock=clock, wrapup_s=60, enrich=slow)
    ended.subscribe_agent("7001", sink)
    for msg in msgs[:102]:  # rings, is answered and ends while its history is read
        ended.handle(msg)
    drained(sink)
    assert ended.cards_for("7001")[0]["last_calls"] is None
    gate.set()
    await asyncio.sleep(0.01)
    (pushed,) = drained(sink)
    assert pushed["card"]["state"] == "ended"
    assert pushed["card"]["last_calls"] == [{"call": "earlier"}]
    assert ended.cards_for("7001")[0]["last_calls"] == [{"call": "earlier"}]

    plain = LiveState(AGENTS.get, clock=clock)
    for msg in msgs[:51]:
        plain.handle(msg)
    assert plain.cards_for("7001")[0]["last_calls"] == []
