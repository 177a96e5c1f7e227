"""The pages' reads of customer records in the audit trail: each card shown to a page,
the supervisor's live view with names and the CSV export, with who, role, what, when,
from where and the hash of what was shown; written behind the push, never on it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from router.audit import AuditEntry, AuditLog, list_entries, state_hash
from router.keys import Keys
from router.web.audit import PageAudit, Reader
from tests.router.web.conftest import WebService

KEYS = Keys(prefix="pa:", secret=b"s")


class Clock:
    """A settable wall clock."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def audit_log(redis_url: str) -> AsyncIterator[AuditLog]:
    """An audit trail in the test Redis."""
    client = aioredis.Redis.from_url(redis_url)
    yield AuditLog(client, KEYS)
    await client.aclose()


def card(call: str, customer: str | None, caller: str | None = "+8613800138000"
         ) -> dict[str, Any]:
    """A card as the live view builds it (the fields the audit reads)."""
    return {"call": call, "caller": caller, "state": "ringing",
            "customer": {"id": customer, "name": "Li Lei"} if customer else None}


async def test_cards_are_buffered_once_per_call_and_written_in_one_go(
    audit_log: AuditLog,
) -> None:
    """A card is one read per call and page (its updates are the same read; a later card
    that names the customer the first did not is one more); nothing is written until
    the flush, which stores every entry with who, role, action, target, source, time and
    the hash of the card shown; an unknown caller is its number's keyed hash, a withheld
    number the call."""
    clock = Clock()
    pages = PageAudit(audit_log, lambda n: f"number:h({n})", clock=clock)
    agent = Reader("li-na", "agent", "10.0.0.7")
    boss = Reader("boss", "supervisor", "10.0.0.9")
    first = card("1.0", None)
    pages.card(agent, first)
    pages.card(agent, card("1.0", None) | {"state": "talking"})  # same read
    pages.card(agent, card("1.0", "C-1001"))                        # now the customer
    pages.card(boss, card("1.0", "C-1001"))                         # another page
    pages.card(agent, card("2.0", None, caller=None))               # withheld number
    assert await list_entries(audit_log.redis, KEYS) == []          # nothing yet
    clock.now += 0.2
    assert await pages.flush() == 4
    got = await list_entries(audit_log.redis, KEYS)
    assert [(e.who, e.role, e.action, e.target, e.source) for e in got] == [
        ("li-na", "agent", "customer.card", "number:h(+8613800138000)", "10.0.0.7"),
        ("li-na", "agent", "customer.card", "customer:C-1001", "10.0.0.7"),
        ("boss", "supervisor", "customer.card", "customer:C-1001", "10.0.0.9"),
        ("li-na", "agent", "customer.card", "call:2.0", "10.0.0.7"),
    ]
    assert got[0].after == state_hash(first)
    assert got[0].at == 1_800_000_000.0  # when it was shown, not when it was written
    assert all(e.id and e.before == "" and e.outcome == "ok" for e in got)
    assert await pages.flush() == 0


async def test_live_view_reads_name_each_customer_once_per_page(audit_log: AuditLog) -> None:
    """The supervisor's live view is a read of the customers it newly shows: one entry
    per page and update with those customers (an outside caller's call with only a
    caller-id name counts as its call; an internal call showing a colleague's caller-id
    name is no read); customers already shown to that page are not read again."""
    pages = PageAudit(audit_log, str)
    boss = Reader("boss", "supervisor", "10.0.0.9")
    pages.live(boss, [{"call": "1.0", "customer_id": "C-1", "customer": "Li Lei",
                       "external": True},
                      {"call": "2.0", "customer_id": None, "customer": "Han Meimei",
                       "external": True},
                      {"call": "3.0", "customer_id": None, "customer": None,
                       "external": True},
                      {"call": "5.0", "customer_id": None, "customer": "Wang Wei",
                       "external": False}])
    pages.live(boss, [{"call": "1.0", "customer_id": "C-1", "customer": "Li Lei"}])
    pages.live(boss, [{"call": "4.0", "customer_id": "C-4", "customer": "Zhou"}])
    await pages.flush()
    got = await list_entries(audit_log.redis, KEYS)
    assert [(e.action, e.target) for e in got] == [
        ("customer.live", "customer:C-1,call:2.0"), ("customer.live", "customer:C-4")]


async def test_the_list_of_calls_awaiting_a_disposition_is_read_once_per_call(
    audit_log: AuditLog,
) -> None:
    """An agent's list of calls awaiting a disposition is a read of the calls it newly
    shows (their customer, else the call), in one customer.pending entry with the hash
    of the rows shown; shown again (a push, a reload of the same page) it is no new read."""
    pages = PageAudit(audit_log, str)
    agent = Reader("li-na", "agent", "10.0.0.7")
    rows = [{"call": "1.0", "customer_id": "C-1", "name": "L.L."},
            {"call": "2.0", "customer_id": None, "name": None}]
    pages.pending(agent, rows)
    pages.pending(agent, rows)
    pages.pending(agent, [*rows, {"call": "3.0", "customer_id": "C-1", "name": "L.L."}])
    await pages.flush()
    got = await list_entries(audit_log.redis, KEYS)
    assert [(e.who, e.action, e.target) for e in got] == [
        ("li-na", "customer.pending", "customer:C-1,call:2.0"),
        ("li-na", "customer.pending", "customer:C-1")]
    assert got[0].after == state_hash(rows)


async def test_the_buffer_is_bounded_and_a_stop_flushes_it(audit_log: AuditLog,
                                                            caplog: pytest.LogCaptureFixture
                                                            ) -> None:
    """Past its bound the buffer drops the oldest reads with an ERROR line; run() writes
    what is left when it is stopped; without an audit trail nothing is buffered."""
    pages = PageAudit(audit_log, str, max_entries=3, flush_s=30)
    reader = Reader("li-na", "agent", "-")
    for n in range(5):
        pages.card(reader, card(f"{n}.0", f"C-{n}"))
    assert pages.dropped == 2
    assert "2 read(s) dropped" not in caplog.text  # logged at the first, then each 1000
    assert "1 read(s) dropped" in caplog.text
    stop = asyncio.Event()
    task = asyncio.create_task(pages.run(stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    got = await list_entries(audit_log.redis, KEYS)
    assert [e.target for e in got] == ["customer:C-2", "customer:C-3", "customer:C-4"]
    off = PageAudit(None, str)
    off.card(reader, card("9.0", "C-9"))
    assert await off.flush() == 0


async def test_audit_log_write_many_keeps_each_entrys_time(audit_log: AuditLog) -> None:
    """write_many stores a batch in one pipeline, each entry with its own time as the
    stream id; one behind the stream's last id (another writer's clock ran ahead) is
    still stored, under an id Redis picks, with its own time kept."""
    assert audit_log.redis is not None
    ahead = AuditLog(audit_log.redis, KEYS, clock=lambda: 1_800_000_005.0)
    await ahead.write(AuditEntry("x", "admin", "rules.reload", "rules", "-"))
    stored = await audit_log.write_many([
        AuditEntry("a", "agent", "customer.card", "customer:1", "-", at=1_800_000_001.0),
        AuditEntry("b", "agent", "customer.card", "customer:2", "-", at=1_800_000_010.0)])
    assert stored[1].id == "1800000010000-0"
    assert int(stored[0].id.split("-")[0]) >= 1_800_000_005_000
    assert [e.at for e in stored] == [1_800_000_001.0, 1_800_000_010.0]
    back = await audit_log.entries()
    assert sorted(e.who for e in back) == ["a", "b", "x"]


# --- through the running service ---------------------------------------------------------------
async def entries(service: WebService, **filters: Any) -> list[AuditEntry]:
    client = aioredis.Redis.from_url(service.settings.redis.url)
    try:
        keys = Keys(prefix=service.settings.redis.prefix,
                    secret=service.settings.redis.key_secret.get_secret_value().encode())
        return await list_entries(client, keys, **filters)
    finally:
        await client.aclose()


async def test_a_card_pushed_to_an_agents_page_is_audited(service: WebService) -> None:
    """Li Lei's card reaches agent 7001's socket: within a second the audit trail has one
    customer.card entry by li-na (agent) from the page's address on customer:C-1001, with
    the hash of the very card pushed; the other agent's page read nothing."""
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    headers = {"Authorization": f"Bearer {service.tokens['li-na']}"}
    other = {"Authorization": f"Bearer {service.tokens['wang-wei']}"}
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{service.base}/ui/ws/agent", headers=headers) as ws, \
            http.ws_connect(f"{service.base}/ui/ws/agent", headers=other) as ws2:
        await ws.receive()
        await ws2.receive()
        await service.ami.play(service.ami.events(0, 50))
        msg = json.loads((await ws.receive()).data)
        assert msg["type"] == "card"
        found: list[AuditEntry] = []

        async def poll() -> None:
            found[:] = await entries(service, action="customer.card")

        for _ in range(100):
            await poll()
            if found:
                break
            await asyncio.sleep(0.05)
    (entry,) = found
    assert (entry.who, entry.role, entry.target, entry.source) == \
        ("li-na", "agent", "customer:C-1001", "127.0.0.1")
    assert entry.after == state_hash(msg["card"])


async def test_live_view_with_names_and_csv_export_are_audited_not_a_viewers(
    service: WebService,
) -> None:
    """The supervisor's live view showing Han Meimei's call is a customer.live entry on
    her customer id; the viewer's (no names) is none; the day's CSV export is one
    customer.export entry with the hash of the file sent. (Before the call, nobody's live
    view showed a customer: no entry.)"""
    await service.route("13900139000", "Han Meimei", "1795338363.5")
    async with aiohttp.ClientSession() as http:
        for user in ("boss", "looker"):
            headers = {"Authorization": f"Bearer {service.tokens[user]}"}
            async with http.get(f"{service.base}/ui/api/live", headers=headers) as r:
                assert r.status == 200
        await service.ami.play(service.ami.events(0, 170))  # call 2 waits in vip
        boss = {"Authorization": f"Bearer {service.tokens['boss']}"}
        async with http.ws_connect(f"{service.base}/ui/ws/live", headers=boss) as ws:
            hello = json.loads((await ws.receive()).data)
            assert any(c.get("customer") == "Han Meimei" for c in hello["live"]["calls"])
        looker = {"Authorization": f"Bearer {service.tokens['looker']}"}
        async with http.ws_connect(f"{service.base}/ui/ws/live", headers=looker) as ws:
            await ws.receive()
        async with http.get(f"{service.base}/ui/api/today.csv", headers=boss) as r:
            csv_text = await r.text()
    got: list[AuditEntry] = []
    for _ in range(100):
        got = await entries(service, action="customer.")
        if any(e.action == "customer.live" for e in got):
            break
        await asyncio.sleep(0.05)
    live = [e for e in got if e.action == "customer.live"]
    assert [(e.who, e.role) for e in live] == [("boss", "supervisor")]
    assert "customer:C-1002" in live[0].target.split(",")
    (export,) = [e for e in got if e.action == "customer.export"]
    assert (export.who, export.target) == ("boss", f"calls:{service_day(csv_text)}")
    assert export.after == state_hash(csv_text.lstrip("\ufeff"))
    assert not any(e.who == "looker" for e in got)


def newchannel(lid: str, number: str, name: str, exten: str) -> bytes:
    """A Newchannel event of a call's first channel, as Asterisk 22 sends it."""
    return (f"Event: Newchannel\r\nPrivilege: call,all\r\nChannel: PJSIP/{number}-0000a001\r\n"
            f"ChannelState: 4\r\nChannelStateDesc: Ring\r\nCallerIDNum: {number}\r\n"
            f"CallerIDName: {name}\r\nConnectedLineNum: <unknown>\r\n"
            f"ConnectedLineName: <unknown>\r\nLanguage: en\r\nAccountCode: \r\n"
            f"Context: from-internal\r\nExten: {exten}\r\nPriority: 1\r\n"
            f"Uniqueid: {lid}\r\nLinkedid: {lid}").encode()


async def test_internal_calls_in_the_live_view_are_no_customer_reads(
    service: WebService,
) -> None:
    """Extension 7002 (caller id name Wang Wei) calls 7001 and an outside number calls in
    past callroute, both showing a caller id name in the supervisor's live view: only
    the outside caller's call is a customer.live read; the internal one is a
    colleague's name and is not in the audit trail."""
    await service.ami.play([newchannel("1795339000.1", "7002", "Wang Wei", "7001"),
                            newchannel("1795339001.1", "13700137000", "Zhang San", "8000")])
    boss = {"Authorization": f"Bearer {service.tokens['boss']}"}
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            async with http.get(f"{service.base}/ui/api/live", headers=boss) as r:
                calls = (await r.json())["calls"]
            if len(calls) == 2:
                break
            await asyncio.sleep(0.05)
    shown = {c["call"]: (c["customer"], c["external"]) for c in calls}
    assert shown == {"1795339000.1": ("Wang Wei", False),
                     "1795339001.1": ("Zhang San", True)}
    got: list[AuditEntry] = []
    for _ in range(100):
        got = await entries(service, action="customer.live")
        if got:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.6)  # a flush more: nothing else comes
    got = await entries(service, action="customer.live")
    assert [(e.who, e.target) for e in got] == [("boss", "call:1795339001.1")]


def service_day(_csv: str) -> str:
    """The day the export named (today in the pages' time zone)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    return datetime.now(ZoneInfo("Asia/Shanghai")).date().isoformat()
