"""Who may see what: every /ui route and push channel checked for every role, agents
held to their own agent id, cookies only from this origin (real service on loopback)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.router.web.conftest import ADMIN_TOKEN, WebService, wait_for

ANON = None
#: (method, path, who) -> expected status; "agent" pages of other roles are refused.
ROUTES: list[tuple[str, str, str | None, int]] = [
    ("GET", "/ui/api/me", ANON, 401),
    ("GET", "/ui/api/me", "looker", 200),
    ("GET", "/ui/api/cards", ANON, 401),
    ("GET", "/ui/api/cards", "li-na", 200),
    ("GET", "/ui/api/cards?agent=7002", "li-na", 403),   # another agent's cards
    ("GET", "/ui/api/cards?agent=7002", "boss", 200),    # a supervisor may watch
    ("GET", "/ui/api/cards?agent=7001", "looker", 403),  # a viewer sees no customers
    ("GET", "/ui/api/live", ANON, 401),
    ("GET", "/ui/api/live", "li-na", 403),
    ("GET", "/ui/api/live", "looker", 200),
    ("GET", "/ui/api/live", "boss", 200),
    ("GET", "/ui/api/today", "looker", 200),
    ("GET", "/ui/api/today", "li-na", 403),
    ("GET", "/ui/api/today.csv", "looker", 403),
    ("GET", "/ui/api/today.csv", "boss", 200),
    ("GET", "/ui/api/today.csv", ANON, 401),
    ("POST", "/ui/api/calls/1.1/disposition", ANON, 401),
    ("POST", "/ui/api/calls/1.1/disposition", "boss", 403),
    ("POST", "/ui/api/calls/1.1/disposition", "looker", 403),
    ("GET", "/ui/api/pending", ANON, 401),
    ("GET", "/ui/api/pending", "li-na", 200),
    ("GET", "/ui/api/pending?agent=7001", "li-na", 200),   # naming oneself
    ("GET", "/ui/api/pending?agent=7002", "li-na", 403),   # another agent's list
    ("GET", "/ui/api/pending", "boss", 403),               # a supervisor gets no list
    ("GET", "/ui/api/pending?agent=7001", "boss", 403),
    ("GET", "/ui/api/pending", "looker", 403),
    ("GET", "/ui/agent", "looker", 403),
    ("GET", "/ui/supervisor", "li-na", 403),
    ("GET", "/ui/agent", "li-na", 200),
    ("GET", "/ui/supervisor", "looker", 200),
    ("GET", "/ui/ws/agent", ANON, 401),
    ("GET", "/ui/ws/agent?agent=7002", "li-na", 403),
    ("GET", "/ui/ws/agent", "looker", 403),
    ("GET", "/ui/ws/live", "li-na", 403),
    ("GET", "/ui/ws/live", ANON, 401),
    ("GET", "/ui/static/agent.html", ANON, 404),  # pages only through their guarded path
    ("GET", "/ui/static/app.css", ANON, 200),
]


def bearer(service: WebService, user: str | None) -> dict[str, str]:
    """The Authorization header of ``user`` (none for anonymous)."""
    return {"Authorization": f"Bearer {service.tokens[user]}"} if user else {}


async def test_every_route_checks_the_role(service: WebService) -> None:
    """Each row of ROUTES answers its status; so a route whose check is missing fails."""
    async with aiohttp.ClientSession() as http:
        for method, path, user, status in ROUTES:
            kwargs: dict[str, Any] = {"headers": bearer(service, user), "allow_redirects": False}
            if method == "POST":
                kwargs["json"] = {"code": "resolved", "note": ""}
            async with http.request(method, service.base + path, **kwargs) as resp:
                assert resp.status == status, (method, path, user, resp.status)


async def test_every_ui_route_declares_its_rule_and_is_in_the_table() -> None:
    """Each /ui route declares the access rule the role model expects (the middleware
    refuses a route without one), and every route has rows in ROUTES."""
    from aiohttp import web

    from router.auth.access import AuthContext, route_table
    from router.auth.users import Directory
    from router.web.live import LiveState
    from router.web.routes import WebService, add_web_routes
    from tests.router.web.conftest import web_settings

    app = web.Application()
    add_web_routes(app, WebService(web_settings(), AuthContext(Directory()),
                                   LiveState(lambda _: None)))
    rules = {(m, p): r.describe() if r is not None else None for m, p, r in route_table(app)}
    assert rules == {
        ("GET", "/ui/login"): "public (the sign-in form: no data)",
        ("POST", "/ui/login"): "public (signing in: checks the token itself)",
        ("POST", "/ui/logout"): "public (signing out: clears the cookie)",
        ("GET", "/ui/"): "signed in",
        ("GET", "/ui/agent"): "cards",
        ("GET", "/ui/supervisor"): "live",
        ("GET", "/ui/static/{name}"): "public (CSS, scripts and strings of the pages: no data)",
        ("GET", "/ui/api/me"): "signed in",
        ("GET", "/ui/api/cards"): "cards",
        ("POST", "/ui/api/calls/{call}/disposition"): "dispose",
        ("GET", "/ui/api/pending"): "dispose",
        ("GET", "/ui/api/live"): "live",
        ("GET", "/ui/api/today"): "live",
        ("GET", "/ui/api/today.csv"): "customers",
        ("GET", "/ui/ws/agent"): "cards",
        ("GET", "/ui/ws/live"): "live",
    }
    tested = {path.split("?")[0] for _, path, _, _ in ROUTES}
    tested = {"/ui/api/calls/{call}/disposition" if "/calls/" in p else
              "/ui/static/{name}" if "/static/" in p else p for p in tested}
    tested |= {"/ui/login", "/ui/logout", "/ui/"}  # open, or a redirect by role
    assert {p for _, p in rules} == tested


async def test_agent_pages_are_signed_in_by_cookie_and_held_to_their_id(
    service: WebService,
) -> None:
    """The sign-in sets an HttpOnly, SameSite=Strict cookie; with it an agent reads its own
    cards, not another's; a tampered cookie, a bad token and a foreign Origin are refused."""
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(f"{service.base}/ui/login",
                             json={"token": service.tokens["li-na"]}) as r:
            assert r.status == 200
            assert (await r.json())["home"] == "/ui/agent"
            cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie
            assert "SameSite=Strict" in cookie
        async with http.get(f"{service.base}/ui/api/cards") as r:
            assert (await r.json())["agent"] == "7001"
        async with http.get(f"{service.base}/ui/api/cards?agent=7002") as r:
            assert r.status == 403
        origin = {"Origin": "http://evil.example"}
        async with http.post(f"{service.base}/ui/api/calls/1.1/disposition",
                             json={"code": "resolved"}, headers=origin) as r:
            assert r.status == 401
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(f"{service.base}/ui/ws/agent", headers=origin)
        assert info.value.status == 401
        async with http.ws_connect(f"{service.base}/ui/ws/agent") as ws:
            hello = json.loads((await ws.receive()).data)
            assert hello == {"type": "hello", "agent": "7001", "cards": [], "pending": []}
    value = next(iter(jar)).value
    forged = value.replace(value.split(".")[0], "d2FuZy13ZWk")  # "wang-wei", same signature
    async with (aiohttp.ClientSession(cookies={"callroute_session": forged}) as http,
                http.get(f"{service.base}/ui/api/cards") as r):
        assert r.status == 401
    async with (aiohttp.ClientSession() as http,
                http.post(f"{service.base}/ui/login", json={"token": "nope-nope-nope"}) as r):
        assert r.status == 401


async def test_sign_in_is_throttled_after_repeated_failures(service: WebService) -> None:
    """After 20 bad tokens in a minute from one address, even a good one waits."""
    async with aiohttp.ClientSession() as http:
        for _ in range(20):
            async with http.post(f"{service.base}/ui/login", json={"token": "bad-token-xx"}) as r:
                assert r.status == 401
        async with http.post(f"{service.base}/ui/login",
                             json={"token": service.tokens["boss"]}) as r:
            assert r.status == 429


async def test_admin_token_opens_the_api_and_pages_an_agent_token_only_its_pages(
    service: WebService,
) -> None:
    """admin.token opens the admin API and the pages as the admin role; an agent's token
    is known but its role may not read the admin API's status (403)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.base}/api/presence",
                            headers=bearer(service, "li-na")) as r:
            assert r.status == 403
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with http.get(f"{service.base}/api/presence", headers=admin) as r:
            assert r.status == 200
        async with http.get(f"{service.base}/ui/api/me", headers=admin) as r:
            assert (await r.json())["role"] == "admin"


async def test_an_agent_cannot_dispose_of_another_agents_call(service: WebService) -> None:
    """Call 1 rings and is answered by 7001: 7002's disposition on it is refused, 7001's
    is taken, and an unknown code is a 400."""
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    await service.ami.play(service.ami.events(0, 71))
    url = f"{service.base}/ui/api/calls/1795338333.0/disposition"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{service.base}/ui/api/cards", headers=bearer(service, "li-na")) as r:
            assert [c["state"] for c in (await r.json())["cards"]] == ["talking"]
        async with http.post(url, json={"code": "resolved"},
                             headers=bearer(service, "wang-wei")) as r:
            assert r.status == 403
        async with http.post(url, json={"code": "nope"}, headers=bearer(service, "li-na")) as r:
            assert r.status == 400
        async with http.post(url, json={"code": "sale", "note": "2 units"},
                             headers=bearer(service, "li-na")) as r:
            assert r.status == 200
    await service.ami.play(service.ami.events(72, 101))
    await wait_for(lambda: len(service.activities()) == 1)
    act = service.activities()[0]
    assert (act["disposition"], act["note"]) == ("sale", "2 units")


async def pending_of(http: aiohttp.ClientSession, service: WebService, user: str
                     ) -> list[dict[str, Any]]:
    """``user``'s list of calls awaiting a disposition, through the API."""
    async with http.get(f"{service.base}/ui/api/pending", headers=bearer(service, user)) as r:
        assert r.status == 200
        body = await r.json()
        calls: list[dict[str, Any]] = body["calls"]
        return calls


async def messages(ws: aiohttp.ClientWebSocketResponse, quiet_s: float = 0.5
                   ) -> list[dict[str, Any]]:
    """Every message ``ws`` gets until it stays quiet for ``quiet_s``."""
    out = []
    while True:
        try:
            msg = await ws.receive(timeout=quiet_s)
        except TimeoutError:
            return out
        if msg.type != aiohttp.WSMsgType.TEXT:
            return out
        out.append(json.loads(msg.data))


async def test_calls_awaiting_a_disposition_are_only_the_agents_own(
    service: WebService,
) -> None:
    """Call 1 is answered by 7001 and ends while li-na's page is open: her list (API and
    push) has it, name and number masked; wang-wei's list and push never show it, nor
    does the page of the supervisor watching 7001 (cards, no list: its hello has none
    and nothing is pushed to it); wang-wei's disposition on it is refused; once li-na
    gives hers from the list, it leaves her list."""
    await service.route("+8613800138000", "Li Lei", "1795338333.1")
    async with aiohttp.ClientSession() as http:
        mine = await http.ws_connect(f"{service.base}/ui/ws/agent",
                                     headers=bearer(service, "li-na"))
        other = await http.ws_connect(f"{service.base}/ui/ws/agent",
                                      headers=bearer(service, "wang-wei"))
        watching = await http.ws_connect(f"{service.base}/ui/ws/agent?agent=7001",
                                         headers=bearer(service, "boss"))
        hellos = [json.loads((await ws.receive()).data) for ws in (mine, other, watching)]
        assert [h.get("pending") for h in hellos] == [[], [], None]
        await service.ami.play(service.ami.events(0, 101))  # rings, answered, hung up
        for _ in range(200):
            if await pending_of(http, service, "li-na"):
                break
            await asyncio.sleep(0.05)
        (row,) = await pending_of(http, service, "li-na")
        assert (row["call"], row["customer_id"], row["outcome"], row["held"]) == \
            ("1795338333.0", "C-1001", "answered", True)
        assert (row["name"], row["number"]) == ("L.L.", "+86138****8000")
        assert await pending_of(http, service, "wang-wei") == []
        pushed = [m for m in await messages(mine) if m["type"] == "pending"]
        assert pushed
        assert pushed[-1]["calls"][0]["call"] == "1795338333.0"
        assert not [m for m in await messages(other) if m["type"] == "pending"]
        watched = await messages(watching)
        assert [m["card"]["state"] for m in watched if m["type"] == "card"][-1] == "ended"
        assert not [m for m in watched if m["type"] == "pending"]
        url = f"{service.base}/ui/api/calls/1795338333.0/disposition"
        async with http.post(url, json={"code": "sale"},
                             headers=bearer(service, "wang-wei")) as r:
            assert r.status == 403
        async with http.post(url, json={"code": "sale", "note": "from the list"},
                             headers=bearer(service, "li-na")) as r:
            assert r.status == 200
            assert (await r.json())["updated"] is False  # onto the held record
        assert await pending_of(http, service, "li-na") == []
        pushed = [m for m in await messages(mine) if m["type"] == "pending"]
        assert pushed[-1]["calls"] == []
        for ws in (mine, other, watching):
            await ws.close()
    await wait_for(lambda: len(service.activities()) == 1)
    act = service.activities()[0]
    assert (act["disposition"], act["note"]) == ("sale", "from the list")


async def test_a_disposition_is_taken_only_for_a_call_rung_to_the_agent(
    redis: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """The route takes a disposition only for a call rung to the signed-in agent by what
    instances share: call 9.1 rings li-na here, so hers is kept before its record comes,
    while wang-wei's on it is refused (403 not_yours: it could otherwise stand in for
    hers) and so is any made-up call id, with nothing stored and a log line; call 8.1
    was served by another instance (this live view never saw it) and is on li-na's list
    of calls awaiting a disposition: hers is taken, wang-wei's refused. Each record
    goes with li-na's disposition."""
    from aiohttp.test_utils import TestServer

    from ami.protocol import Message
    from router.auth.roles import Role
    from router.keys import Keys
    from router.settings import WebSettings
    from router.web.live import LiveState
    from router.web.pending import Pending
    from router.web.wrapup import Wrapup
    from tests.router.web.conftest import pages_app

    keys = Keys(prefix="t:", secret=b"s")
    sent: list[dict[str, Any]] = []

    async def enqueue(rec: Any) -> str:
        if not await redis.set(keys.outbox_dedupe(rec["record_key"]), "1", nx=True):
            return "duplicate"
        sent.append(dict(rec))
        return "enqueued"

    def record(lid: str) -> dict[str, Any]:
        return {"record_key": f"call:{lid}", "linkedid": lid, "answered_by_agent": "7001",
                "outcome": "answered", "caller": "+8613800138000"}

    pending = Pending(redis, keys, hold_s=30, late_s=0)
    wrapup = Wrapup(redis, keys, enqueue, 30, pending=pending)
    live = LiveState({"PJSIP/7001": "7001", "PJSIP/7002": "7002"}.get)
    for event in ({"Event": "VarSet", "Uniqueid": "9.1", "Linkedid": "9.1",
                   "Variable": "ROUTE_RULE", "Value": "vip-owner"},
                  {"Event": "DialBegin", "Uniqueid": "9.1", "Linkedid": "9.1",
                   "DestChannel": "PJSIP/7001-00000001", "DestUniqueid": "9.2"}):
        live.handle(Message(event))
    app, tokens = pages_app({"settings": WebSettings(wrapup_s=30), "live": live,
                             "wrapup": wrapup, "record_key_for": "call:{}".format},
                            {"li-na": (Role.AGENT, "7001"), "wang-wei": (Role.AGENT, "7002")})
    await wrapup.mark_online(["7001"])
    assert await wrapup.put(record("8.1")) == "held"  # on another instance's call

    async def post(http: aiohttp.ClientSession, server: TestServer, call: str, user: str,
                   code: str) -> tuple[int, Any]:
        async with http.post(server.make_url(f"/ui/api/calls/{call}/disposition"),
                             json={"code": code, "note": user},
                             headers={"Authorization": f"Bearer {tokens[user]}"}) as r:
            return r.status, await r.json()

    not_yours = (403, {"error": "not_yours"})
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as http:
        assert (await post(http, server, "9.1", "li-na", "resolved"))[0] == 200
        assert await post(http, server, "9.1", "wang-wei", "sale") == not_yours
        assert await post(http, server, "1795330000.7", "li-na", "sale") == not_yours
        assert await post(http, server, "1795330000.7", "wang-wei", "sale") == not_yours
        assert await post(http, server, "8.1", "wang-wei", "sale") == not_yours
        assert await redis.keys("t:web:disp:*") == [keys.web_disposition("call:9.1", "7001")]
        assert (await post(http, server, "8.1", "li-na", "resolved"))[0] == 200
    assert await wrapup.put(record("9.1")) == "enqueued"
    assert [(r["record_key"], r["disposition"], r["disposition_note"]) for r in sent] == [
        ("call:8.1", "resolved", "li-na"), ("call:9.1", "resolved", "li-na")]
    assert "disposition on call '1795330000.7' by agent 7002 refused" in caplog.text
