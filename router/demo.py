"""``callroute demo``: the whole call path on one machine, printed call by call.

Starts the sample CRM at ``crm.base_url``, the FastAGI server at ``agi.host:port``
with the example rules (either on a free port instead when its own is taken, saying
so: the demo never talks to whatever else listens there), then plays calls through
FastAGI exactly as Asterisk does
(the same bytes as the recordings in tests/fixtures) and prints, for each call, what
the dialplan was told. Redis is used when it answers at ``redis.url``; without it the
cache runs in-process only (and says so once).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from aiohttp import web

from dialplan.peer import AsteriskAgiPeer, PeerResult, build_environment
from dialplan.route import Router, make_route_handler
from dialplan.server import AgiServer
from router.app import build_router
from router.errors import ListenError
from router.rules.presence import Presence
from router.samplecrm import address, make_app, start_sample_crm
from router.settings import Settings

SHANGHAI = ZoneInfo("Asia/Shanghai")
#: A Monday mid-morning in Shanghai: inside business hours of the example rules.
OPEN = datetime(2026, 11, 23, 10, 30, tzinfo=SHANGHAI)
#: The same Monday at night.
CLOSED = datetime(2026, 11, 23, 21, 15, tzinfo=SHANGHAI)


@dataclass(frozen=True)
class DemoCall:
    """One call to play: who calls, which number they dial, and when."""

    callerid: str
    name: str | None
    did: str
    at: datetime
    note: str


CALLS = [
    DemoCall("+8613800138000", "Li Lei", "4008001000", OPEN, "gold, owner 7001 (recording 1)"),
    DemoCall("13900139000", "Han Meimei", "4008001000", OPEN,
             "platinum, owner 7009 busy per AMI"),
    DemoCall("02150501234", None, "4008002000", OPEN, "unknown landline on the sales line"),
    DemoCall("13600136000", "Impatient", "4008001000", OPEN, "bronze, tagged churn-risk"),
    DemoCall("138 0013 8000", "Li Lei", "4008001000", CLOSED, "same customer, after hours"),
    DemoCall("13500135000", None, "4008001000", OPEN, "four CRM records: highest tier wins"),
    DemoCall("anonymous", None, "4008001000", OPEN, "withheld number: no lookup"),
    DemoCall("7002", "Wang Wei", "4008001000", OPEN, "internal extension: no lookup"),
    DemoCall("13700137000", "Slow Case", "4008001000", OPEN,
             "CRM answers in 3 s: deadline hits"),
]




async def _start_crm(settings: Settings) -> tuple[web.AppRunner, Settings]:
    """The demo's own sample CRM at ``crm.base_url``; when that port is taken, on a free
    one (said in one line), never whatever listens there. Returns the runner and the
    settings pointing at it."""
    host, port = address(settings.crm.base_url)
    auth = settings.crm.auth
    token = auth.token.get_secret_value() if auth.type == "bearer" else None
    try:
        runner, url = await start_sample_crm(host, port, make_app(token=token or None))
    except OSError as exc:
        try:
            runner, url = await start_sample_crm(host, 0, make_app(token=token or None))
        except OSError as again:
            raise ListenError.from_os_error(again, "crm.base_url", host, port) from exc
        why = "is taken by another program" if exc.errno == errno.EADDRINUSE \
            else f"cannot be used ({exc.strerror})"
        print(f"sample CRM: {host}:{port} (crm.base_url) {why}; the demo runs its own on "
              f"{url} instead")
    else:
        print(f"sample CRM: {url}")
    crm = settings.crm.model_copy(update={"base_url": url})
    return runner, settings.model_copy(update={"crm": crm})


async def _start_agi(settings: Settings, router: Router) -> AgiServer:
    """The demo's FastAGI server at ``agi.host:agi.port``, or on a free port when that one
    is taken (said in one line: the demo plays its calls itself)."""
    agi = AgiServer(settings.agi)
    agi.route("route", make_route_handler(router))
    try:
        await agi.start()
    except ListenError as exc:
        agi = AgiServer(settings.agi.model_copy(update={"port": 0}))
        agi.route("route", make_route_handler(router))
        await agi.start()
        print(f"FastAGI: {exc.host}:{exc.port} (agi.port) is taken by another program; "
              f"the demo uses port {agi.port} instead")
    return agi


def _row(call: DemoCall, result: PeerResult) -> list[str]:
    v = result.variables
    customer = v.get("CRM_CUSTOMER_ID") or "-"
    name = v.get("CALLERID(name)") or "-"
    target = v.get("ROUTE_TARGET") or ""
    queue = v.get("ROUTE_QUEUE") or ""
    steps = []
    if target:
        timeout = f" {v['ROUTE_TIMEOUT']}s" if v.get("ROUTE_TIMEOUT") else ""
        steps.append(f"dial {target}{timeout}")
    if queue:
        prio = f" prio {v['ROUTE_PRIORITY']}" if v.get("ROUTE_PRIORITY") else ""
        steps.append(f"queue {queue}{prio}")
    if v.get("ROUTE_VOICEMAIL"):
        steps.append(f"voicemail {v['ROUTE_VOICEMAIL']}")
    if v.get("ROUTE_REJECT"):
        steps.append(f"reject {v['ROUTE_REJECT']}")
    route = " -> ".join(steps) or v.get("ROUTE_ACTION", "?")
    ms = f"{result.decision_ms:.1f}" if result.decision_ms is not None else "-"
    return [call.callerid, call.at.strftime("%a %H:%M"), f"{customer} {name}",
            v.get("CRM_TIER") or "-", v.get("CRM_OWNER") or "-",
            f"{v.get('ROUTE_RULE', '-')} ({v.get('ROUTE_REASON', '-')})", route, ms]


def _print_table(rows: list[list[str]]) -> None:
    head = ["caller", "time", "customer", "tier", "owner", "rule (reason)", "route", "ms"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


async def run_demo(settings: Settings, *, extra_calls: int = 0) -> int:
    """Run the demo; returns the exit code (1 when a call went wrong)."""
    logging.getLogger().setLevel(logging.WARNING)
    crm, settings = await _start_crm(settings)
    presence = Presence()
    presence.update("Local/7009@agents", "INUSE")  # as AMI would report a busy phone
    clock = {"now": OPEN}
    failures = 0
    try:
        async with build_router(settings, presence) as router:
            router.clock = lambda: clock["now"]
            agi = await _start_agi(settings, router)
            print(f"FastAGI: agi://{settings.agi.host}:{agi.port}/route  "
                  f"(deadline {settings.routing.deadline_ms} ms)\n")
            rows = []
            sets: list[str] = []
            calls = CALLS + [CALLS[i % 4] for i in range(extra_calls)]
            for n, call in enumerate(calls, start=1):
                clock["now"] = call.at
                env = build_environment(call.callerid, call.name, call.did,
                                        uniqueid=f"{int(time.time())}.{n}",
                                        port=agi.port)
                result = await AsteriskAgiPeer(settings.agi.host, agi.port, env).run()
                if result.error or "ROUTE_ACTION" not in result.variables:
                    failures += 1
                rows.append(_row(call, result))
                sets.append(" ".join(f"{k}={v}" for k, v in result.variables.items() if v))
            _print_table(rows)
            print("\nchannel variables set (non-empty):")
            for call, line in zip(calls, sets, strict=True):
                print(f"  {call.callerid:<16} {line}")
            print("\nnotes:")
            for call in CALLS:
                print(f"  {call.callerid:<16} {call.note}")
            await agi.stop(1.0)
    finally:
        with contextlib.suppress(Exception):
            await crm.cleanup()
    return 1 if failures else 0
