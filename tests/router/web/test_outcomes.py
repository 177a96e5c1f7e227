"""The pages speak the call records' outcomes (answered, voicemail, rejected, missed,
abandoned, busy, failed) and show withheld numbers and degraded routes: in the live
view's cards and rows, the day's figures, the CSV and both languages' strings."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, get_args

import pytest
import redis.asyncio as aioredis

from ami.protocol import Message
from ami.records import Outcome
from router.keys import Keys
from router.web.history import CSV_COLUMNS, OUTCOMES, History
from router.web.live import LiveState, Sink

STATIC = Path(__file__).parents[3] / "router" / "web" / "static"
AGENTS = {"Local/7001@agents": "7001", "Local/7002@agents": "7002"}
KEYS = Keys(prefix="o:", secret=b"secret")


def strings(lang: str) -> dict[str, str]:
    """The keys and texts of one language block of strings.js."""
    text = (STATIC / "strings.js").read_text(encoding="utf-8")
    block = re.search(rf"\n  {lang}: {{\n(.*?)\n  }},", text, re.S)
    assert block is not None, lang
    pairs = re.findall(r'"?([\w-]+)"?: ("(?:[^"\\]|\\.)*")', block.group(1))
    return {key: json.loads(value) for key, value in pairs}


def test_every_outcome_has_a_chart_colour_and_both_languages() -> None:
    """The outcomes of ami.records are exactly the history's chart series and the
    supervisor page's, each with a colour in the stylesheet and a text in English and
    Chinese; so are the degraded-route notices and the withheld number."""
    assert set(OUTCOMES) == set(get_args(Outcome))
    page = (STATIC / "supervisor.js").read_text(encoding="utf-8")
    found = re.search(r"const OUTCOMES = \[(.*?)\];", page)
    assert found is not None
    assert json.loads(f"[{found.group(1)}]") == list(OUTCOMES)
    css = (STATIC / "app.css").read_text(encoding="utf-8")
    en, zh = strings("en"), strings("zh")
    assert set(en) == set(zh)
    for outcome in OUTCOMES:
        assert f".s-{outcome} {{" in css, outcome
        assert f".legend .key.s-{outcome}::before" in css, outcome
        assert en[f"outcome_{outcome}"], outcome
        assert zh[f"outcome_{outcome}"], outcome
    for key in ("withheld", "degraded_deadline", "degraded_crm-error", "degraded_fallback",
                "degraded_other", "flags_today"):
        assert en[key], key
        assert zh[key] not in ("", en[key]), key


def play(live: LiveState, *events: dict[str, str]) -> None:
    """Feed events (as the AMI client parses them)."""
    for headers in events:
        live.handle(Message(headers))


def queued_call(lid: str, caller: str, *variables: tuple[str, str],
                name: str = "<unknown>") -> list[dict[str, str]]:
    """A call entering the dialplan, setting ``variables``, queued and offered to 7001."""
    inbound = f"Local/4008001000@from-trunk-0000{lid};2"
    base = {"Uniqueid": f"{lid}.1", "Linkedid": f"{lid}.0", "Channel": inbound}
    return [
        {"Event": "Newchannel", "Uniqueid": f"{lid}.0", "Linkedid": f"{lid}.0",
         "CallerIDNum": caller, "CallerIDName": name, "Exten": "4008001000"},
        *({"Event": "VarSet", **base, "Variable": name, "Value": value}
          for name, value in variables),
        {"Event": "QueueCallerJoin", **base, "Queue": "support", "CallerIDNum": caller},
        {"Event": "AgentCalled", **base, "Queue": "support",
         "Interface": "Local/7001@agents", "DestUniqueid": f"{lid}.2",
         "CallerIDNum": caller},
    ]


def cards(sink: Sink) -> list[dict[str, Any]]:
    """The cards pushed to ``sink``."""
    out = []
    while not sink.queue.empty():
        msg = json.loads(sink.queue.get_nowait())
        if msg["type"] == "card":
            out.append(msg["card"])
    return out


async def test_withheld_number_and_deadline_route_show_on_card_and_live_row() -> None:
    """A caller who withheld the number, routed by default because the CRM was late:
    the card says anonymous (no number, and no "Anonymous" as a name, shown) and degraded
    'deadline'; the supervisor's row says the same."""
    live = LiveState(AGENTS.get)
    sink = Sink(agent="7001")
    live.subscribe_agent("7001", sink)
    play(live, *queued_call("5", "anonymous", ("ROUTE_RULE", "default"),
                            ("ROUTE_REASON", "deadline"), ("ROUTE_ACTION", "queue"),
                            name="Anonymous"))
    (card,) = cards(sink)
    assert (card["anonymous"], card["caller"], card["degraded"]) == (True, None, "deadline")
    assert card["caller_name"] is None  # "Anonymous" is no name
    assert card["why"]["reason"] == "deadline"
    (row,) = live.snapshot(customers=True)["calls"]
    assert (row["anonymous"], row["degraded"]) == (True, "deadline")


async def test_a_call_the_dialplan_fell_back_on_pops_marked_fallback() -> None:
    """callroute was not reached (AGI failed): the call went through [callroute-inbound]
    (CALL_DID set) to the default queue with no ROUTE_* variable. It still pops on the
    rung agent's page, marked degraded 'fallback', with its number; a call routed by a
    rule is not degraded."""
    live = LiveState(AGENTS.get)
    sink = Sink(agent="7001")
    live.subscribe_agent("7001", sink)
    play(live, *queued_call("6", "+8613800138000", ("__CALL_DID", "4008001000")))
    play(live, *queued_call("7", "13900139000", ("__CALL_DID", "4008001000"),
                            ("ROUTE_RULE", "vip-owner"), ("ROUTE_REASON", "rule"),
                            ("ROUTE_ACTION", "queue")))
    fallback, ruled = cards(sink)
    assert (fallback["call"], fallback["degraded"], fallback["anonymous"]) == \
        ("6.0", "fallback", False)
    assert fallback["caller"] == "+8613800138000"
    assert (ruled["call"], ruled["degraded"]) == ("7.0", None)
    rows = {r["call"]: r for r in live.snapshot(customers=False)["calls"]}
    assert rows["6.0"]["degraded"] == "fallback"
    assert rows["7.0"]["degraded"] is None


@pytest.fixture
async def history(redis_url: str) -> AsyncIterator[History]:
    """A History over the test Redis."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield History(client, KEYS, tz="Asia/Shanghai")
    await client.aclose()


async def test_day_figures_and_csv_carry_every_outcome_and_the_flags(history: History
                                                                     ) -> None:
    """Voicemail and rejected calls count in the day's figures like the others; withheld
    numbers and degraded routes are counted per day and are columns of the CSV."""
    start = "2026-11-22T01:10:00+00:00"
    for lid, outcome, extra in (("a", "voicemail", {"voicemail_s": 6.0}),
                                ("b", "rejected", {}),
                                ("c", "answered", {"anonymous": True, "degraded": True}),
                                ("d", "missed", {"degraded": True})):
        await history.add({"record_key": f"call:{lid}", "linkedid": lid, "start": start,
                           "outcome": outcome, "queue": "support", **extra})
    day = await history.day("2026-11-22")
    assert day["outcomes"] == {"voicemail": 1, "rejected": 1, "answered": 1, "missed": 1}
    assert day["hours"]["09"] == day["outcomes"]
    assert day["flags"] == {"anonymous": 1, "degraded": 2}
    parsed = list(csv.DictReader(io.StringIO(
        History.to_csv(await history.rows("2026-11-22"), customers=True))))
    assert list(parsed[0]) == list(CSV_COLUMNS)
    got = {r["call"]: (r["outcome"], r["anonymous"], r["degraded"], r["voicemail_s"])
           for r in parsed}
    assert got == {"a": ("voicemail", "false", "false", "6.0"),
                   "b": ("rejected", "false", "false", ""),
                   "c": ("answered", "true", "true", ""),
                   "d": ("missed", "false", "true", "")}
