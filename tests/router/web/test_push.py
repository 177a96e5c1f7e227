"""The push channel against the running service (no browser): what an agent's socket
receives for a call routed by another instance, and the card's history."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from router.metrics import LOOKUPS
from router.samplecrm import state_of
from tests.router.web.conftest import WebService, pages_app, wait_for

CALL1 = (0, 101)


def lookups_counted() -> float:
    """Every ``callroute_lookups`` so far, whatever their source."""
    return sum(sample.value for metric in LOOKUPS.collect() for sample in metric.samples
               if sample.name.endswith("_total"))


def renamed(blocks: list[bytes], tag: bytes) -> list[bytes]:
    """The same call with other Uniqueids/Linkedids (a new call of the same caller)."""
    return [b.replace(b"179533", tag) for b in blocks]


async def next_card(ws: aiohttp.ClientWebSocketResponse, want: Any) -> dict[str, Any]:
    """The next message on ``ws`` for which ``want(message)`` holds (bounded)."""
    async with asyncio.timeout(10):
        while True:
            msg = json.loads((await ws.receive()).data)
            if want(msg):
                return dict(msg)


async def test_call_routed_elsewhere_is_completed_from_the_crm_and_history(
    service: WebService,
) -> None:
    """A call whose FastAGI ran on another instance (no decision here) first pops with
    what its channel variables say (customer id, tier), then is completed with the
    customer's card from the shared customer cache (read only: no CRM request, nothing
    counted as a lookup) and the last calls from callroute's own history, which holds the
    caller's earlier call with its outcome and agent."""
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    await service.ami.play(service.ami.events(*CALL1))
    await wait_for(lambda: len(service.activities()) == 1)  # filed in the history too
    lookups = lookups_counted()
    crm_requests = len(state_of(service.crm).requests)
    headers = {"Authorization": f"Bearer {service.tokens['li-na']}"}
    async with aiohttp.ClientSession() as http, \
            http.ws_connect(f"{service.base}/ui/ws/agent", headers=headers) as ws:
        hello = json.loads((await ws.receive()).data)
        assert hello["type"] == "hello"
        await service.ami.play(renamed(service.ami.events(*CALL1[:1], 50), b"279533"))
        first = await next_card(ws, lambda m: m["type"] == "card")
        card = first["card"]
        assert card["call"] == "2795338333.0"
        assert card["state"] == "ringing"
        assert card["customer"]["id"] == "C-1001"
        assert card["customer"]["tier"] == "gold"
        full = await next_card(ws, lambda m: m["type"] == "card" and m["card"]["last_calls"]
                               is not None)
        customer = full["card"]["customer"]
        assert (customer["name"], customer["value"], customer["owner"]) == \
            ("Li Lei", 52000.0, "7001")
        last = full["card"]["last_calls"]
        assert [c["call"] for c in last] == ["1795338333.0"]
        assert (last[0]["outcome"], last[0]["agent"]) == ("answered", "7001")
        assert full["card"]["why"]["owner"] is True
    assert lookups_counted() == lookups
    assert len(state_of(service.crm).requests) == crm_requests


async def test_only_the_rung_agent_socket_gets_the_card(service: WebService) -> None:
    """With three agents' sockets open, the ring of 7001 reaches 7001's socket only;
    a supervisor watching 7001 gets it too."""
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    got: dict[str, list[dict[str, Any]]] = {}

    async def listen(user: str, query: str = "") -> None:
        headers = {"Authorization": f"Bearer {service.tokens[user]}"}
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"{service.base}/ui/ws/agent{query}", headers=headers) as ws:
            got[user] = []
            async for msg in ws:
                got[user].append(json.loads(msg.data))

    tasks = [asyncio.create_task(listen(u)) for u in ("li-na", "wang-wei", "chen-jie")]
    tasks.append(asyncio.create_task(listen("boss", "?agent=7001")))
    await wait_for(lambda: len(got) == 4 and all(got.values()))  # every hello in
    await service.ami.play(service.ami.events(0, 50))
    await wait_for(lambda: any(m["type"] == "card" for m in got["li-na"]))
    await wait_for(lambda: any(m["type"] == "card" for m in got["boss"]))
    await asyncio.sleep(0.3)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert [m["type"] for m in got["wang-wei"]] == ["hello"]
    assert [m["type"] for m in got["chen-jie"]] == ["hello"]
    assert got["li-na"][1]["card"]["customer"]["name"] == "Li Lei"


async def test_card_customers_wait_for_a_late_crm_answer_and_only_read(redis_url: str
                                                                       ) -> None:
    """A deadline call's card looks in the cache again while the CRM's late answer is on
    its way: found once it lands in Redis (from another instance: not this one's LRU);
    without waiting it is not there; a cached "nobody" ends the search; the reads leave
    the LRU empty and Redis as it was."""
    import time

    from router.keys import Keys
    from router.lookup.cache import CacheEntry, TwoLevelCache, redis_client
    from router.models import Customer
    from router.settings import CacheSettings, RedisSettings
    from router.web.assemble import CardCustomers

    keys = Keys(prefix="cc:", secret=b"s")
    client = redis_client(RedisSettings(url=redis_url))
    reader = TwoLevelCache(client, keys, CacheSettings())
    writer = TwoLevelCache(client, keys, CacheSettings())
    try:
        customers = CardCustomers(reader, waits=(0.2, 0.4, 0.8))
        assert await customers.find("+8613800138000") is None

        async def late_answer() -> None:
            await asyncio.sleep(0.3)
            await writer.put("+8613800138000", CacheEntry(Customer(id="C-9", name="Li Lei"),
                                                          time.time()))

        task = asyncio.create_task(late_answer())
        started = time.monotonic()
        found = await customers.find("+8613800138000", wait=True)
        await task
        assert found is not None
        assert found.name == "Li Lei"
        assert 0.3 <= time.monotonic() - started < 1.5
        await writer.put("+8613900139000", CacheEntry(None, time.time()))
        assert await customers.find("+8613900139000") is None
        assert len(reader.lru) == 0
        assert sorted(await client.keys("cc:cust:*")) == sorted(
            [keys.customer("+8613800138000").encode(),
             keys.customer("+8613900139000").encode()])
    finally:
        await reader.aclose()
        await writer.aclose()
        await client.aclose()


async def test_an_agent_page_gets_its_cards_while_redis_is_down(
    own_redis: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis is down (the calls awaiting a disposition cannot be read): the agent's
    socket still opens with its hello (without that list, with a log line) and the card
    of a call that rings it still arrives; the list's API and the disposition's say they
    are unavailable (a text the page has in both languages), with log lines."""
    import redis.asyncio as aioredis
    from aiohttp.test_utils import TestServer

    from ami.protocol import Message
    from router.auth.roles import Role
    from router.keys import Keys
    from router.settings import WebSettings
    from router.web.live import LiveState
    from router.web.pending import Pending
    from router.web.wrapup import Wrapup
    from tests.router.web.test_outcomes import strings

    keys = Keys(prefix="t:", secret=b"s")
    client = aioredis.Redis.from_url(own_redis.url, decode_responses=True,
                                     socket_connect_timeout=0.2)

    async def enqueue(_: Any) -> str:
        return "enqueued"

    pending = Pending(client, keys, hold_s=30, late_s=3600)
    wrapup = Wrapup(client, keys, enqueue, 30, late_s=3600, pending=pending)
    live = LiveState({"PJSIP/7001": "7001"}.get)
    app, tokens = pages_app({"settings": WebSettings(wrapup_s=30), "live": live,
                             "wrapup": wrapup}, {"li-na": (Role.AGENT, "7001")})
    own_redis.stop()
    headers = {"Authorization": f"Bearer {tokens['li-na']}"}
    try:
        async with TestServer(app, host="127.0.0.1") as server, \
                aiohttp.ClientSession() as http:
            async with http.get(server.make_url("/ui/api/pending"), headers=headers) as resp:
                assert resp.status == 503
            async with http.post(server.make_url("/ui/api/calls/8.1/disposition"),
                                 headers=headers, json={"code": "sale"}) as resp:
                assert (resp.status, await resp.json()) == (503, {"error": "not_available"})
            async with http.ws_connect(server.make_url("/ui/ws/agent"), headers=headers) as ws:
                hello = json.loads((await ws.receive(timeout=5)).data)
                assert (hello["type"], hello["cards"]) == ("hello", [])
                assert "pending" not in hello
                for event in ({"Event": "VarSet", "Uniqueid": "9.1", "Linkedid": "9.1",
                               "Variable": "ROUTE_RULE", "Value": "vip-owner"},
                              {"Event": "DialBegin", "Uniqueid": "9.1", "Linkedid": "9.1",
                               "DestChannel": "PJSIP/7001-00000001", "DestUniqueid": "9.2"}):
                    live.handle(Message(event))
                card = await next_card(ws, lambda m: m["type"] == "card")
                assert (card["card"]["call"], card["card"]["state"]) == ("9.1", "ringing")
    finally:
        await client.aclose()
    assert "calls awaiting a disposition" in caplog.text
    assert "disposition on call 8.1 by agent 7001 not saved" in caplog.text
    assert strings("en")["not_available"]
    assert strings("zh")["not_available"]


async def test_a_page_that_cannot_keep_up_is_closed_and_let_go() -> None:
    """More pushes than a page's queue holds arrive before its socket could send any: the
    page is closed as too slow (1013, so it reconnects for a fresh hello) instead of the
    queue growing, and it is unsubscribed: nothing more is queued for it."""
    from aiohttp import WSMsgType
    from aiohttp.test_utils import TestServer

    from router.auth.roles import Role
    from router.web.live import LiveState
    from tests.router.web.conftest import pages_app

    live = LiveState({"PJSIP/7001": "7001"}.get)
    app, tokens = pages_app({"live": live}, {"li-na": (Role.AGENT, "7001")})
    headers = {"Authorization": f"Bearer {tokens['li-na']}"}
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        async with http.ws_connect(server.make_url("/ui/ws/agent"), headers=headers) as ws:
            hello = json.loads((await ws.receive(timeout=5)).data)
            assert hello["type"] == "hello"
            (sink,) = live.push_own("7001", {"type": "pending", "calls": []})
            for _ in range(400):  # all at once: the socket's task has not run meanwhile
                live.push_own("7001", {"type": "pending", "calls": []})
            assert sink.stale
            assert sink.queue.qsize() == sink.queue.maxsize
            async with asyncio.timeout(5):
                while (await ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED):
                    pass
            assert ws.close_code == 1013
        await wait_for(lambda: not live.has_own_page("7001"))
        assert live.push_own("7001", {"type": "pending", "calls": []}) == []
