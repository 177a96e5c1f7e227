"""Child processes of ``bench/bench_route.py``: the server under test, and the sample CRM.

``python -m bench.route_server route --redis-url URL --crm-url URL [--max-sessions N]``
    callroute's FastAGI server with ``make_route_handler(router)`` on a free port, the
    Router built by :func:`router.app.build_router` from ``examples/config.yaml`` (REST
    connector + CachedLookup on the given Redis + the example rules), its clock fixed to
    a Monday 10:30 in Shanghai (inside business hours), logging set up as ``callroute
    serve`` does it (one INFO line per call, to stderr), ``gc.freeze()`` after start-up
    as ``serve`` does. Prints ``PORT <n>``.
``python -m bench.route_server crm``
    the sample CRM (seed customers, token ``demo-token``, no per-customer delays: the
    "Slow Case" 3 s record is a test fixture; the bench injects its own delays as
    faults over HTTP). Prints ``URL <base url>``.

Both stop on SIGTERM or when stdin closes. The ``route`` server answers one command per
stdin line: ``stats`` prints one JSON line of its counters (lookups by source, AGI
sessions by outcome and in flight, refusals, CRM requests and errors, background fetches);
``gc`` prints its garbage collector passes since the last ``gc`` (count, full passes,
longest pause). With
``--profile FILE`` the route server runs under cProfile and writes the stats to FILE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import signal
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from pydantic import SecretStr

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "config.yaml"
#: A Monday mid-morning in Shanghai: inside the example rules' business hours.
OPEN = datetime(2026, 11, 23, 10, 30, tzinfo=ZoneInfo("Asia/Shanghai"))
CRM_TOKEN = "demo-token"


def bench_settings(redis_url: str, crm_url: str, max_sessions: int | None) -> Any:
    """``examples/config.yaml`` pointed at the bench's Redis and CRM, AGI on a free port."""
    from router.settings import load_settings

    settings = load_settings(CONFIG)
    agi = {"port": 0} | ({"max_sessions": max_sessions} if max_sessions else {})
    crm_auth = settings.crm.auth.model_copy(update={"token": SecretStr(CRM_TOKEN)})
    return settings.model_copy(update={
        "agi": settings.agi.model_copy(update=agi),
        "redis": settings.redis.model_copy(update={"url": redis_url}),
        "crm": settings.crm.model_copy(update={"base_url": crm_url, "auth": crm_auth}),
    })


class GcPauses:
    """The cyclic garbage collector's passes in this process since the last :meth:`take`
    (each pass stops the event loop): how many, how many full, and the longest."""

    def __init__(self) -> None:
        self._started = 0.0
        self.passes = self.full = 0
        self.longest_ms = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        self.passes += 1
        self.full += info["generation"] == 2
        self.longest_ms = max(self.longest_ms, (now - self._started) * 1000)

    def take(self) -> dict[str, float]:
        """The figures so far, then start again from zero."""
        out = {"passes": self.passes, "full": self.full, "max_ms": round(self.longest_ms, 2)}
        self.passes = self.full = 0
        self.longest_ms = 0.0
        return out


def counters() -> dict[str, Any]:
    """The callroute metrics the bench reads between phases."""
    from router import metrics

    out: dict[str, Any] = {}
    for name, metric in (("lookups", metrics.LOOKUPS), ("sessions", metrics.AGI_SESSIONS),
                         ("crm_requests", metrics.CRM_REQUESTS),
                         ("crm_errors", metrics.CRM_ERRORS), ("rejected", metrics.AGI_REJECTED),
                         ("active", metrics.AGI_ACTIVE),
                         ("background", metrics.LOOKUP_BACKGROUND),
                         ("breaker_open", metrics.BREAKER_STATE)):
        values: dict[str, float] = {}
        for family in metric.collect():
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                label = ",".join(str(v) for v in sample.labels.values()) or "value"
                values[label] = values.get(label, 0.0) + sample.value
        out[name] = values
    return out


async def _stdin_lines(stop: asyncio.Event, on_line: Any) -> None:
    """Read stdin lines until EOF (then set ``stop``)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        on_line(line.decode().strip())
    stop.set()


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve_route(redis_url: str, crm_url: str, max_sessions: int | None) -> None:
    """The callroute call path, as ``callroute serve`` assembles it (AGI + Router)."""
    from dialplan.route import make_route_handler
    from dialplan.server import AgiServer
    from router import log as router_log
    from router.app import build_router
    from router.rules.presence import Presence

    settings = bench_settings(redis_url, crm_url, max_sessions)
    router_log.setup(settings.log_level)
    stop = _stop_event()

    pauses = GcPauses()

    def on_line(line: str) -> None:
        if line == "stats":
            print(json.dumps(counters()), flush=True)
        elif line == "gc":
            print(json.dumps(pauses.take()), flush=True)

    async with build_router(settings, Presence()) as router:
        router.clock = lambda: OPEN
        agi = AgiServer(settings.agi)
        agi.route("route", make_route_handler(router))
        await agi.start()
        gc.collect()  # as serve does after start-up: long-lived objects out of the collector
        gc.freeze()
        print(f"PORT {agi.port}", flush=True)
        reading = asyncio.create_task(_stdin_lines(stop, on_line))
        await stop.wait()
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await agi.stop(1.0)


async def serve_crm() -> None:
    """The sample CRM on a free loopback port, until SIGTERM or stdin EOF."""
    from router.samplecrm import make_app, start_sample_crm

    stop = _stop_event()
    runner, url = await start_sample_crm("127.0.0.1", 0, make_app(token=CRM_TOKEN, delays={}))
    print(f"URL {url}", flush=True)
    reading = asyncio.create_task(_stdin_lines(stop, lambda _line: None))
    await stop.wait()
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description="bench_route child processes")
    parser.add_argument("role", choices=["route", "crm"])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--crm-url", default="http://127.0.0.1:8088")
    parser.add_argument("--max-sessions", type=int, default=None)
    parser.add_argument("--profile", default=None, help="cProfile the route server to FILE")
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                        help="event loop (auto: uvloop when installed, as callroute serve)")
    args = parser.parse_args(argv)
    from router.runner import run as run_on

    if args.role == "crm":
        run_on(serve_crm(), args.loop)
        return
    main_coro = serve_route(args.redis_url, args.crm_url, args.max_sessions)
    if args.profile:
        import cProfile

        with cProfile.Profile() as prof:
            run_on(main_coro, args.loop)
        prof.dump_stats(args.profile)
    else:
        run_on(main_coro, args.loop)


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    main()
