"""The pages and their API on the admin HTTP server, and the WebSocket push.

====================================  ==============================  =================
path                                  what                            who
====================================  ==============================  =================
``GET  /ui/login``, ``POST /ui/login``  sign in with a token (cookie)  anyone
``POST /ui/logout``                     sign out                      anyone
``GET  /ui/``                           to the page of one's role     signed in
``GET  /ui/agent``                      the agent's page              cards
``GET  /ui/supervisor``                 the supervisor's page         live
``GET  /ui/static/*``                   CSS, JS, strings (no data)    anyone
``GET  /ui/api/me``                     who am I, page settings       signed in
``GET  /ui/api/cards``                  my cards (``?agent=``)        cards (own id)
``POST /ui/api/calls/{call}/disposition``  after-call disposition     dispose (own call)
``GET  /ui/api/pending``              my calls awaiting a disposition  dispose (own only)
``GET  /ui/api/live``                   the live figures              live
``GET  /ui/api/today``                  today's charts (``?day=``)    live
``GET  /ui/api/today.csv``              the day's calls as CSV        customers
``GET  /ui/ws/agent``                   cards pushed (``?agent=``)    cards (own id)
``GET  /ui/ws/live``                    live figures pushed           live
====================================  ==============================  =================

Every route declares its access rule (:mod:`router.auth.access`: the middleware checks
the role's permission before the handler runs); agents are held to their own agent id
here, in the API and in the push. An agent's calls awaiting a disposition
(:mod:`router.web.pending`) go to that agent's own pages only: the API answers the
signed-in agent's list alone, and the push sends it only to pages signed in as that
agent (a supervisor watching the agent's page gets cards, not the list). A disposition
is taken only for a call rung to the signed-in agent, by what is shared between
instances (:meth:`router.web.wrapup.Wrapup.dispose`: the held or kept record, the
agent's list) or this instance's live view; any other call id, made up or another
agent's, is answered 403 ``not_yours`` (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from redis.exceptions import RedisError

from router.audit import AuditLog, state_hash
from router.auth.access import (
    AuthContext,
    peer_of,
    principal_of,
    public,
    request_entry,
    requires,
    signed_in,
    signed_in_page,
)
from router.auth.roles import Permission, Principal, Role
from router.auth.sessions import COOKIE, same_origin, set_cookie
from router.metrics import REGISTRY
from router.settings import WebSettings
from router.web.audit import PageAudit, Reader
from router.web.history import History
from router.web.live import LiveState, Sink
from router.web.stats import CounterRate
from router.web.wrapup import Wrapup

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
PAGES = {"agent": "agent.html", "supervisor": "supervisor.html", "login": "login.html"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
Status = Callable[[], Awaitable[Mapping[str, Any]]]
KEY: web.AppKey[WebService] = web.AppKey("callroute_web", object)  # type: ignore[arg-type]


@dataclass
class WebService:
    """Everything the pages need, assembled by :func:`router.app.serve`."""

    settings: WebSettings
    auth: AuthContext
    live: LiveState
    record_key_for: Callable[[str], str] = "call:{}".format
    history: History | None = None
    wrapup: Wrapup | None = None
    outbox_status: Status | None = None
    ami_connected: Callable[[], bool] | None = None
    roster_names: Callable[[], Mapping[str, tuple[str | None, str]]] | None = None
    #: the audit trail: the CSV export is written to it at once
    audit: AuditLog | None = None
    #: the pages' customer reads (cards, live view with names), written behind
    page_audit: PageAudit | None = None
    tick_s: float = 1.0
    sync: CounterRate = field(init=False)
    _outbox: dict[str, Any] = field(default_factory=dict)
    _outbox_at: float = 0.0
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.sync = CounterRate(self.settings.alert_window_s)
        if self.page_audit is not None:
            self.live.on_card = self.page_audit.card
        if self.wrapup is not None and self.wrapup.pending is not None:
            self.wrapup.pending.changed = self._pending_changed

    def reader(self, request: web.Request, principal: Principal) -> Reader | None:
        """Who reads through ``request``, when page reads are audited."""
        if self.page_audit is None or not self.page_audit.enabled:
            return None
        return Reader(principal.user, str(principal.role), peer_of(request))

    def read_cards(self, reader: Reader | None, cards: list[dict[str, Any]]) -> None:
        """``reader`` is shown ``cards`` (audited, written behind)."""
        if reader is not None and self.page_audit is not None:
            for card in cards:
                self.page_audit.card(reader, card)

    def read_pending(self, reader: Reader | None, rows: list[dict[str, Any]]) -> None:
        """``reader`` is shown the calls awaiting a disposition ``rows`` (audited)."""
        if reader is not None and self.page_audit is not None:
            self.page_audit.pending(reader, rows)

    async def pending_calls(self, agent: str) -> list[dict[str, Any]] | None:
        """``agent``'s calls awaiting a disposition (None: no such list here, or it cannot
        be read now: Redis is down; the cards go on without it)."""
        pending = self.wrapup.pending if self.wrapup is not None else None
        if pending is None:
            return None
        try:
            return await pending.calls(agent)
        except (RedisError, OSError) as exc:
            log.warning("agent %s's calls awaiting a disposition not read (Redis: %s)",
                        agent, exc)
            return None

    def _pending_changed(self, agent: str) -> None:
        """``agent``'s list changed: push it to the agent's own pages connected here."""
        if self.live.has_own_page(agent):
            _background(self.push_pending(agent), "calls awaiting a disposition not pushed")

    async def push_pending(self, agent: str) -> None:
        """Send ``agent``'s list to the agent's own pages connected here."""
        rows = await self.pending_calls(agent)
        if rows is None:
            return
        message = {"type": "pending", "agent": agent, "calls": rows}
        for sink in self.live.push_own(agent, message):
            self.read_pending(sink.reader, rows)

    def read_live(self, reader: Reader | None, body: Mapping[str, Any]) -> None:
        """``reader`` is shown the live view ``body`` with customers (audited)."""
        if reader is not None and self.page_audit is not None:
            self.page_audit.live(reader, body.get("calls") or [])

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the supervisor ticker and the wrap-up releaser."""
        self._stop.clear()
        self._tasks.append(asyncio.create_task(self._ticker(), name="web-ticker"))
        if self.wrapup is not None:
            self._tasks.append(asyncio.create_task(
                self.wrapup.run(self.live.online_agents, self._stop), name="web-wrapup"))
        if self.page_audit is not None and self.page_audit.enabled:
            self._tasks.append(asyncio.create_task(self.page_audit.run(self._stop),
                                                   name="web-audit"))

    async def stop(self) -> None:
        """Stop the background tasks (held records stay in Redis for the next run)."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.live.aclose()

    async def _ticker(self) -> None:
        last_full = 0.0
        while not self._stop.is_set():
            try:
                await self._tick(last_full)
                now = time.monotonic()
                if now - last_full >= 5.0:
                    last_full = now
            except Exception:
                log.exception("live view update failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.tick_s)

    async def _tick(self, last_full: float) -> None:
        self.sync.sample(_metric("callroute_records_total", {"stage": "delivered"}),
                         _metric("callroute_records_total", {"stage": "retry"}) +
                         _metric("callroute_records_total", {"stage": "dead"}))
        self.live.sweep()
        sinks = self.live.live_sinks
        if not sinks:
            return
        if not (self.live.dirty or time.monotonic() - last_full >= 5.0):
            return
        self.live.dirty = False
        texts: dict[bool, tuple[str, dict[str, Any]]] = {}
        for sink in list(sinks):
            if sink.customers not in texts:
                body = await self.figures(customers=sink.customers)
                texts[sink.customers] = (json.dumps({"type": "live", "live": body},
                                                    ensure_ascii=False, default=str), body)
            text, body = texts[sink.customers]
            sink.send(text)
            if sink.customers:
                self.read_live(sink.reader, body)

    async def figures(self, *, customers: bool) -> dict[str, Any]:
        """The live view plus CRM, outbox and sync health, with the alerts."""
        body = self.live.snapshot(customers=customers)
        breaker = REGISTRY.get_sample_value("callroute_breaker_open") or 0.0
        body["lookups"]["breaker"] = ("open" if breaker >= 1 else
                                      "half_open" if breaker > 0 else "closed")
        body["outbox"] = await self._outbox_figures()
        rate, attempts = self.sync.rate()
        body["sync"] = {"success_rate": rate, "attempts": attempts,
                        "window_s": self.settings.alert_window_s}
        alerts = []
        if rate is not None and rate < self.settings.alert_success_rate:
            alerts.append({"code": "sync_rate", "value": rate,
                           "limit": self.settings.alert_success_rate})
        oldest = body["outbox"].get("oldest_age_s")
        if isinstance(oldest, int | float) and oldest > self.settings.alert_oldest_s:
            alerts.append({"code": "oldest", "value": oldest,
                           "limit": self.settings.alert_oldest_s})
        if self.ami_connected is not None and not self.ami_connected():
            alerts.append({"code": "ami_down"})
        body["alerts"] = alerts
        return body

    async def _outbox_figures(self) -> dict[str, Any]:
        if self.outbox_status is None:
            return {"enabled": False}
        now = time.monotonic()
        if now - self._outbox_at >= 5.0:  # the status scans the stream: not every second
            self._outbox_at = now
            try:
                self._outbox = {"enabled": True, **(await self.outbox_status())}
            except Exception as exc:
                self._outbox = {"enabled": True, "error": f"{type(exc).__name__}: {exc}"}
        return self._outbox


def _metric(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, ensure_ascii=False, default=str), status=status,
                        content_type="application/json",
                        headers={"Cache-Control": "no-store", **SECURITY_HEADERS})


Handler = Callable[[web.Request, Principal], Awaitable[web.StreamResponse]]
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guard(permission: Permission | None, handler: Handler, *, page: bool = False) -> Route:
    """``handler`` as a route that declares its access rule (router.auth.access checks it
    before the handler runs; a page without credentials goes to the sign-in page) and
    gets the request's principal."""

    async def route(request: web.Request) -> web.StreamResponse:
        return await handler(request, principal_of(request))

    if permission is not None:
        return requires(permission, page=page)(route)
    return signed_in_page(route) if page else signed_in(route)


def add_web_routes(app: web.Application, svc: WebService) -> None:
    """Put the pages, their API and the push channels on ``app``."""
    app[KEY] = svc
    r = app.router
    p = Permission
    r.add_get("/ui/login", public("the sign-in form: no data")(_page("login")))
    r.add_post("/ui/login", public("signing in: checks the token itself")(_login))
    r.add_post("/ui/logout", public("signing out: clears the cookie")(_logout))
    r.add_get("/ui/", _guard(None, _home, page=True))
    r.add_get("/ui/agent", _guard(p.CARDS, _page_for("agent"), page=True))
    r.add_get("/ui/supervisor", _guard(p.LIVE, _page_for("supervisor"), page=True))
    r.add_get("/ui/static/{name}", public("CSS, scripts and strings of the pages: no data")(
        _static))
    r.add_get("/ui/api/me", _guard(None, _me))
    r.add_get("/ui/api/cards", _guard(p.CARDS, _cards))
    r.add_post("/ui/api/calls/{call}/disposition", _guard(p.DISPOSE, _dispose))
    r.add_get("/ui/api/pending", _guard(p.DISPOSE, _pending))
    r.add_get("/ui/api/live", _guard(p.LIVE, _live))
    r.add_get("/ui/api/today", _guard(p.LIVE, _today))
    r.add_get("/ui/api/today.csv", _guard(p.CUSTOMERS, _today_csv))
    r.add_get("/ui/ws/agent", _guard(p.CARDS, _ws_agent))
    r.add_get("/ui/ws/live", _guard(p.LIVE, _ws_live))


# --- pages -----------------------------------------------------------------------------------
def _file(name: str) -> web.FileResponse:
    return web.FileResponse(STATIC / name, headers={"Cache-Control": "no-cache",
                                                    **SECURITY_HEADERS})


def _page(name: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(_: web.Request) -> web.StreamResponse:
        return _file(PAGES[name])

    return handler


def _page_for(name: str) -> Handler:
    async def handler(_: web.Request, __: Principal) -> web.StreamResponse:
        return _file(PAGES[name])

    return handler


async def _home(_: web.Request, principal: Principal) -> web.StreamResponse:
    raise web.HTTPSeeOther(_home_of(principal))


def _home_of(principal: Principal) -> str:
    return "/ui/agent" if principal.role is Role.AGENT else "/ui/supervisor"


async def _static(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path = STATIC / name
    if "/" in name or name.startswith(".") or name.endswith(".html") or not path.is_file():
        raise web.HTTPNotFound()
    return _file(name)


async def _login(request: web.Request) -> web.StreamResponse:
    ctx = request.app[KEY].auth
    peer = peer_of(request)
    if not same_origin(request):
        return _json({"error": "forbidden"}, status=403)
    if ctx.throttled(peer):
        return _json({"error": "too_many_attempts"}, status=429)
    if request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            return _json({"error": "bad_request"}, status=400)
        token = str(body.get("token", "")) if isinstance(body, dict) else ""
    else:
        form = await request.post()
        token = str(form.get("token", ""))
    principal = await ctx.directory.authenticate(token.strip())
    found = ctx.directory.lookup(principal.user) if principal is not None else None
    if principal is None or found is None:
        ctx.failed(peer)
        log.warning("web sign-in refused from %s", peer)
        return _json({"error": "bad_token"}, status=401)
    log.info("web sign-in: %s (%s) from %s", principal.user, principal.role, peer)
    response = _json({"user": principal.user, "role": str(principal.role),
                      "agent": principal.agent, "home": _home_of(principal)})
    set_cookie(response, request, ctx.codec, principal.user, found[1])
    return response


async def _logout(request: web.Request) -> web.StreamResponse:
    response = _json({"ok": True})
    response.del_cookie(COOKIE, path="/")
    return response


# --- API -------------------------------------------------------------------------------------
def _watched_agent(request: web.Request, principal: Principal) -> str | None:
    """The agent whose cards are asked for: an agent's own; others name one."""
    wanted = request.query.get("agent") or principal.agent
    if not wanted or not principal.may_act_for(wanted):
        return None
    return wanted


async def _me(request: web.Request, principal: Principal) -> web.StreamResponse:
    svc = request.app[KEY]
    roster = svc.roster_names() if svc.roster_names is not None else {}
    entry = roster.get(principal.agent or "")
    return _json({
        "user": principal.user, "role": principal.role, "agent": principal.agent,
        "agent_name": entry[0] if entry else None,
        "device": entry[1] if entry else None,
        "can": {str(p): principal.can(p) for p in (Permission.LIVE, Permission.CUSTOMERS,
                                                    Permission.CARDS, Permission.DISPOSE,
                                                    Permission.AUDIT)},
        "dispositions": [d.model_dump() for d in svc.settings.dispositions],
        "language": svc.settings.language,
        "wrapup_s": svc.settings.wrapup_s if svc.wrapup is not None else 0,
        "late_s": svc.wrapup.late_s if svc.wrapup is not None else 0,
        "agents": sorted(roster) if principal.can(Permission.CUSTOMERS) else [],
    })


async def _cards(request: web.Request, principal: Principal) -> web.StreamResponse:
    agent = _watched_agent(request, principal)
    if agent is None:
        return _json({"error": "forbidden"}, status=403)
    svc = request.app[KEY]
    cards = svc.live.cards_for(agent)
    svc.read_cards(svc.reader(request, principal), cards)
    return _json({"agent": agent, "cards": cards})


async def _dispose(request: web.Request, principal: Principal) -> web.StreamResponse:
    svc = request.app[KEY]
    lid = request.match_info["call"]
    agent = principal.agent
    if svc.wrapup is None or agent is None or (svc.settings.wrapup_s <= 0
                                               and svc.wrapup.late_s <= 0):
        return _json({"error": "not_available"}, status=503)
    try:
        body = await request.json()
    except ValueError:
        return _json({"error": "bad_request"}, status=400)
    code = str(body.get("code", "")) if isinstance(body, dict) else ""
    note = str(body.get("note", "") or "") if isinstance(body, dict) else ""
    if code not in {d.code for d in svc.settings.dispositions}:
        return _json({"error": "unknown_code"}, status=400)
    answered = svc.live.answered_by(lid)
    if answered is not None and answered != agent:
        return _not_yours(lid, agent)
    try:
        result = await svc.wrapup.dispose(svc.record_key_for(lid), agent, code, note,
                                          rung=svc.live.rung_to(lid, agent))
    except (RedisError, OSError) as exc:
        log.warning("disposition on call %s by agent %s not saved (Redis: %s)", lid, agent,
                    exc)
        return _json({"error": "not_available"}, status=503)
    if result == "not-yours":
        return _not_yours(lid, agent)
    if result == "busy":
        log.warning("disposition on call %s by agent %s not saved: another instance is "
                    "still sending its record", lid, agent)
        return _json({"error": "not_available"}, status=503)
    if result == "gone":
        return _json({"error": "already_sent"}, status=409)
    svc.live.done(lid, agent, "done")
    log.info("disposition %s on call %s by agent %s%s", code, lid, agent,
             " (an update of the sent activity)" if result == "updated" else "")
    return _json({"ok": True, "call": lid, "code": code, "updated": result == "updated"})


def _not_yours(lid: str, agent: str) -> web.Response:
    """A disposition refused: the call was not rung to ``agent`` (by what this instance's
    live view and Redis know: held or kept record, the agent's list), or never was."""
    log.warning("disposition on call %r by agent %s refused: not a call rung to them",
                lid[:64], agent)
    return _json({"error": "not_yours"}, status=403)


async def _pending(request: web.Request, principal: Principal) -> web.StreamResponse:
    """The signed-in agent's own calls awaiting a disposition (never another's)."""
    svc = request.app[KEY]
    agent = principal.agent
    asked = request.query.get("agent")
    if agent is None or principal.role is not Role.AGENT or (asked and asked != agent):
        return _json({"error": "forbidden"}, status=403)
    rows = await svc.pending_calls(agent)
    if rows is None:
        return _json({"error": "not_available"}, status=503)
    svc.read_pending(svc.reader(request, principal), rows)
    return _json({"agent": agent, "calls": rows})


async def _live(request: web.Request, principal: Principal) -> web.StreamResponse:
    svc = request.app[KEY]
    customers = principal.can(Permission.CUSTOMERS)
    body = await svc.figures(customers=customers)
    if customers:
        svc.read_live(svc.reader(request, principal), body)
    return _json(body)


async def _today(request: web.Request, principal: Principal) -> web.StreamResponse:
    svc = request.app[KEY]
    if svc.history is None:
        return _json({"error": "no_history"}, status=503)
    day = request.query.get("day") or svc.history.today()
    if not _valid_day(day):
        return _json({"error": "bad_day"}, status=400)
    return _json(await svc.history.day(day))


async def _today_csv(request: web.Request, principal: Principal) -> web.StreamResponse:
    svc = request.app[KEY]
    if svc.history is None:
        return _json({"error": "no_history"}, status=503)
    day = request.query.get("day") or svc.history.today()
    if not _valid_day(day):
        return _json({"error": "bad_day"}, status=400)
    rows = await svc.history.rows(day)
    text = await asyncio.to_thread(svc.history.to_csv, rows, customers=True)
    entry = request_entry(request, "customer.export", f"calls:{day}", after=state_hash(text))
    if svc.audit is not None:
        await svc.audit.write(entry)
    else:
        log.info("audit: %s by %s (%s) on %s from %s", entry.action, entry.who, entry.role,
                 entry.target, entry.source)
    return web.Response(text="\ufeff" + text, content_type="text/csv", charset="utf-8",
                        headers={"Content-Disposition":
                                 f'attachment; filename="callroute-{day}.csv"',
                                 "Cache-Control": "no-store"})


def _valid_day(day: str) -> bool:
    from datetime import date

    try:
        date.fromisoformat(day)
    except ValueError:
        return False
    return len(day) == 10


# --- push ------------------------------------------------------------------------------------
async def _pump(ws: web.WebSocketResponse, sink: Sink) -> None:
    while not ws.closed:
        text = await sink.queue.get()
        if sink.stale:
            await ws.close(code=1013, message=b"too slow")
            return
        await ws.send_str(text)


async def _serve_socket(request: web.Request, sink: Sink,
                        hello: Callable[[], Awaitable[str]],
                        attach: Callable[[], None], detach: Callable[[], None]
                        ) -> web.WebSocketResponse:
    """Serve one page's socket: subscribed first, then the hello (the state now), then
    every push. A push made meanwhile is queued behind the hello, never lost (the page
    takes a card twice as one)."""
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=4096)
    await ws.prepare(request)
    attach()
    pump: asyncio.Task[None] | None = None
    try:
        await ws.send_str(await hello())
        pump = asyncio.create_task(_pump(ws, sink))
        async for msg in ws:  # the page sends nothing we need; read to see the close
            if msg.type == WSMsgType.ERROR:
                break
    finally:
        detach()
        if pump is not None:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)
    return ws


async def _ws_agent(request: web.Request, principal: Principal) -> web.StreamResponse:
    svc = request.app[KEY]
    agent = _watched_agent(request, principal)
    if agent is None:
        return _json({"error": "forbidden"}, status=403)
    reader = svc.reader(request, principal)
    own = principal.role is Role.AGENT and principal.agent == agent
    sink = Sink(agent=agent, reader=reader, own=own)

    async def hello() -> str:
        cards = svc.live.cards_for(agent)
        rows = await svc.pending_calls(agent) if own else None
        if rows is not None:  # an ended call on the list is shown there, not as a card
            listed = {row["call"] for row in rows}
            cards = [c for c in cards if c.get("state") != "ended" or c["call"] not in listed]
        svc.read_cards(reader, cards)
        body: dict[str, Any] = {"type": "hello", "agent": agent, "cards": cards}
        if rows is not None:
            svc.read_pending(reader, rows)
            body["pending"] = rows
        return json.dumps(body, ensure_ascii=False)

    def attach() -> None:
        svc.live.subscribe_agent(agent, sink)
        if own and svc.wrapup is not None:
            _background(svc.wrapup.mark_online([agent]))

    def detach() -> None:
        svc.live.unsubscribe_agent(agent, sink)
        if own and svc.wrapup is not None and not svc.live.has_own_page(agent):
            _background(svc.wrapup.mark_offline(agent))

    return await _serve_socket(request, sink, hello, attach, detach)


async def _ws_live(request: web.Request, principal: Principal) -> web.StreamResponse:
    svc = request.app[KEY]
    customers = principal.can(Permission.CUSTOMERS)
    reader = svc.reader(request, principal) if customers else None
    sink = Sink(customers=customers, reader=reader)

    async def hello() -> str:
        body = await svc.figures(customers=customers)
        if customers:
            svc.read_live(reader, body)
        return json.dumps({"type": "live", "live": body}, ensure_ascii=False, default=str)

    return await _serve_socket(request, sink, hello, lambda: svc.live.subscribe_live(sink),
                               lambda: svc.live.unsubscribe_live(sink))


_BACKGROUND: set[asyncio.Task[None]] = set()


def _background(coro: Awaitable[None],
                what: str = "agent page presence not updated in Redis") -> None:
    async def run() -> None:
        try:
            await coro
        except Exception as exc:
            log.warning("%s: %s", what, exc)

    task = asyncio.create_task(run())
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
