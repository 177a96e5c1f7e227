"""callroute's own call history in a real Redis: last calls per customer, the day's
figures for the charts, and the CSV export."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.keys import Keys
from router.web.history import History, days_back

KEYS = Keys(prefix="h:", secret=b"secret")


def rec(lid: str, start: str, outcome: str = "answered", customer: str | None = "C-1",
        tier: str | None = "gold", queue: str | None = "vip", wait: float | None = 12.0,
        **extra: Any) -> dict[str, Any]:
    """A call record dict with the fields the history reads."""
    return {"record_key": f"call:{lid}", "linkedid": lid, "start": start, "outcome": outcome,
            "customer_id": customer, "customer_tier": tier, "queue": queue, "wait_s": wait,
            "talk_s": 30.0, "answered_by_agent": "7001" if outcome == "answered" else None,
            "routing_rule": "vip-owner", "route_reason": "rule",
            "caller": "+8613800138000", **extra}


@pytest.fixture
async def history(redis_url: str) -> AsyncIterator[History]:
    """A History over the test Redis, days in Shanghai time."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield History(client, KEYS, tz="Asia/Shanghai", days=8, last_calls=3)
    await client.aclose()


async def test_last_calls_are_per_customer_newest_first_and_capped(history: History) -> None:
    """recent() gives a customer's last calls (newest first, at most last_calls); unknown
    callers are filed under the keyed hash of the number, never the number."""
    for i in range(5):
        await history.add(rec(f"{i}.0", f"2026-11-22T0{i}:00:00+00:00"))
    await history.add(rec("9.0", "2026-11-22T09:00:00+00:00", customer=None))
    got = await history.recent("C-1", None)
    assert [c["call"] for c in got] == ["4.0", "3.0", "2.0"]
    assert got[0]["agent"] == "7001"
    assert "caller" not in got[0]
    unknown = await history.recent(None, "+8613800138000")
    assert [c["call"] for c in unknown] == ["9.0"]
    keys = [k async for k in history.redis.scan_iter("h:*")]
    assert not any("8613800138000" in k for k in keys)
    assert await history.recent(None, None) == []
    ttl = await history.redis.ttl(KEYS.web_recent("c:C-1"))
    assert ttl > 80 * 86400


async def test_day_figures_by_local_day_hour_tier_and_queue(history: History) -> None:
    """Counters land on the Shanghai day and hour of the call's start; averages of wait
    by tier and answer rate by queue come out of them."""
    await history.add(rec("a", "2026-11-22T01:10:00+00:00", wait=10))            # 09h local
    await history.add(rec("b", "2026-11-22T01:50:00+00:00", wait=30))            # 09h
    await history.add(rec("c", "2026-11-22T02:05:00+00:00", outcome="abandoned",  # 10h
                          wait=70, tier=None))
    await history.add(rec("d", "2026-11-22T17:00:00+00:00"))                     # next day
    day = await history.day("2026-11-22")
    assert day["hours"] == {"09": {"answered": 2}, "10": {"abandoned": 1}}
    assert day["outcomes"] == {"answered": 2, "abandoned": 1}
    assert day["wait_by_tier"]["gold"]["avg_s"] == 20.0
    assert day["wait_by_tier"]["gold"]["buckets"] == {"<=10": 1, "<=30": 1}
    assert day["wait_by_tier"]["none"]["buckets"] == {"<=120": 1}
    assert day["answer_by_queue"]["vip"] == {"offered": 3, "answered": 2, "rate": 2 / 3}
    assert (await history.day("2026-11-23"))["outcomes"] == {"answered": 1}
    assert await history.redis.ttl(KEYS.web_day("2026-11-22")) <= 8 * 86400


async def test_csv_has_every_call_and_defuses_formulas(history: History) -> None:
    """The CSV has a header and one row per call in order; a note starting with '='
    is quoted so a spreadsheet does not run it; customers can be blanked."""
    await history.add(rec("a", "2026-11-22T01:10:00+00:00", disposition="sale",
                          disposition_note="=HYPERLINK(\"x\")"))
    await history.add(rec("b", "2026-11-22T01:20:00+00:00"))
    rows = await history.rows("2026-11-22")
    parsed = list(csv.reader(io.StringIO(History.to_csv(rows, customers=True))))
    assert parsed[0][:3] == ["start", "call", "outcome"]
    assert [r[1] for r in parsed[1:]] == ["a", "b"]
    disposition = parsed[0].index("disposition")
    assert parsed[1][disposition:disposition + 2] == ["sale", "'=HYPERLINK(\"x\")"]
    blank = list(csv.reader(io.StringIO(History.to_csv(rows, customers=False))))
    assert blank[1][3] == ""
    await history.redis.rpush(KEYS.web_day_calls("2026-11-22"), "{broken")
    assert len(await history.rows("2026-11-22")) == 2


def test_days_back_and_bad_start_times() -> None:
    """days_back lists dates oldest first; a record without a readable start is filed
    under today."""
    assert days_back("2026-03-01", 3) == ["2026-02-27", "2026-02-28", "2026-03-01"]
    h = History(None, KEYS, tz="UTC")  # type: ignore[arg-type]
    assert h.day_of("not a time") == h.today()
    assert h.day_of("2026-11-22T23:30:00") == "2026-11-22"


async def test_rows_and_last_calls_are_encrypted_and_late_dispositions_merged(
    redis_url: str,
) -> None:
    """With a key ring the rows and last calls are stored encrypted (no customer id, no
    note in clear) and read back; a disposition given later (an update record) shows in
    the customer's last calls and the day's CSV rows; a row another key sealed is
    skipped."""
    from router.crypto import KeyRing

    ring = KeyRing.parse("k1:" + base64.b64encode(b"1" * 32).decode())
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        h = History(client, KEYS, tz="Asia/Shanghai", crypto=ring)
        await h.add(rec("a", "2026-11-22T01:10:00+00:00", customer="C-77",
                        disposition_note="李雷 called"))
        await h.add(rec("b", "2026-11-22T01:20:00+00:00", customer="C-77"))
        stored = await client.lrange(KEYS.web_day_calls("2026-11-22"), 0, -1)
        stored += await client.lrange(KEYS.web_recent("c:C-77"), 0, -1)
        assert all(v.startswith("enc1:k1:") for v in stored)
        assert not any("C-77" in v or "李雷" in v for v in stored)
        await h.redispose({**rec("a", "2026-11-22T01:10:00+00:00", customer="C-77"),
                           "disposition": "sale", "disposition_note": "two units"})
        late = await client.hgetall(KEYS.web_day_dispositions("2026-11-22"))
        assert list(late) == ["a"]
        assert "two units" not in late["a"]
        recent = await h.recent("C-77", None)
        assert [(c["call"], c["disposition"], c["note"]) for c in recent] == \
            [("b", None, None), ("a", "sale", "two units")]
        rows = await h.rows("2026-11-22")
        assert [(r["call"], r["disposition"]) for r in rows] == [("a", "sale"), ("b", None)]
        other = KeyRing.parse("k2:" + base64.b64encode(b"2" * 32).decode())
        assert await History(client, KEYS, tz="Asia/Shanghai",
                             crypto=other).rows("2026-11-22") == []
    finally:
        await client.aclose()


async def test_a_record_spooled_while_redis_was_down_is_filed_when_drained(
    own_redis: Any, tmp_path: Any,
) -> None:
    """Redis down when the call ended: the record goes to the spool and is not filed (the
    history is in Redis too); when the spool drains into the stream it is filed once, as
    the service wires the history to the outbox's drain (a duplicate drain files nothing)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from router.records.outbox import Outbox
    from router.records.spool import Spool
    from router.settings import OutboxSettings
    from router.web.wrapup import Wrapup

    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True,
                                     socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    try:
        spool = Spool(tmp_path / "spool", max_records=10, max_bytes=1_000_000)
        outbox = Outbox(client, KEYS, OutboxSettings(), spool)
        h = History(client, KEYS, tz="Asia/Shanghai")
        outbox.drained.append(h.add)
        wrap = Wrapup(client, KEYS, outbox.enqueue, 0, filed=h.add)
        own_redis.stop()
        assert await wrap.put(rec("s1", "2026-11-22T01:10:00+00:00")) == "spooled"
        own_redis.start()
        assert await h.rows("2026-11-22") == []
        assert await outbox.drain_spool() == 1
        spool.put("call:s1", rec("s1", "2026-11-22T01:10:00+00:00"))  # drained twice
        assert await outbox.drain_spool() == 1
        assert [r["call"] for r in await h.rows("2026-11-22")] == ["s1"]
        assert (await h.day("2026-11-22"))["outcomes"] == {"answered": 1}
    finally:
        await client.aclose()


async def test_a_big_days_csv_export_does_not_stall_the_event_loop(redis_url: str) -> None:
    """Exporting a busy day (30 000 encrypted rows) leaves the event loop free to route
    calls meanwhile: it never waits 0.3 s between two of its turns (opening and
    writing the rows in the loop held it for more than half a second at once), and the
    CSV has every row."""
    import asyncio
    import time

    import aiohttp
    from aiohttp.test_utils import TestServer

    from router.auth.roles import Role
    from router.crypto import KeyRing, seal_json
    from router.web.history import summary
    from router.web.live import LiveState
    from tests.router.web.conftest import pages_app

    ring = KeyRing.parse("k1:" + base64.b64encode(b"1" * 32).decode())
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    key = KEYS.web_day_calls("2026-11-22")
    row = summary(rec("x", "2026-11-22T01:10:00+00:00", disposition_note="call back"))
    await client.rpush(key, *(seal_json(ring, {**row, "call": f"{i}.0"}, key)
                              for i in range(30_000)))
    history = History(client, KEYS, tz="Asia/Shanghai", crypto=ring)
    app, tokens = pages_app({"live": LiveState(dict[str, str]().get), "history": history},
                            {"boss": (Role.SUPERVISOR, None)})
    gaps: list[float] = []
    done = asyncio.Event()

    async def turns() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    try:
        async with TestServer(app, host="127.0.0.1") as server, \
                aiohttp.ClientSession() as http:
            ticker = asyncio.create_task(turns())
            async with http.get(server.make_url("/ui/api/today.csv?day=2026-11-22"),
                                headers={"Authorization": f"Bearer {tokens['boss']}"}) as resp:
                assert resp.status == 200
                text = await resp.text()
            done.set()
            await ticker
    finally:
        await client.aclose()
    assert len(text.strip().splitlines()) == 30_001
    assert max(gaps) < 0.3, max(gaps)
