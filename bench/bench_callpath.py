"""The CPU cost of one call's Python path, without sockets: callroute vs a bare handler.

``bench_route`` measures whole processes on a noisy 2-core machine; this one isolates
what callroute's own code costs per call, so a change to it can be judged in seconds.
Each call is an :class:`~dialplan.server.AgiConnection` fed the bytes of a recorded-style
environment through an in-memory transport that answers every command line with
``200 result=1`` on the next loop iteration (as a socket would), on the real event loop.

Two handlers run the same calls, interleaved in rounds (the machine's drift hits both):

* ``bare``: the AgiServer with a handler that sets the four variables of the default
  route (the protocol machinery alone: what a call costs before any decision);
* ``callroute``: the route handler of ``callroute serve`` (normalise, cached lookup,
  rules, log line, metrics, variables), with ``examples/config.yaml``, the sample CRM
  (in this process) and a private ``redis-server``; the cache is warmed first, so
  lookups are LRU hits as in the warm phases of ``bench_route``.

Printed: microseconds of CPU per call (median and spread over rounds) and the ratio.
Run: ``.venv/bin/python -m bench.bench_callpath [--calls 4000] [--rounds 7]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (./dev bench): make `bench` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Awaitable, Callable, Iterator, Sequence  # noqa: E402

from bench.bench_route import Mix, unknown_numbers  # noqa: E402
from bench.route_server import OPEN, bench_settings  # noqa: E402
from dialplan.peer import build_environment  # noqa: E402
from dialplan.route import make_route_handler  # noqa: E402
from dialplan.server import AgiConnection, AgiServer, AgiSession  # noqa: E402
from router import log as router_log  # noqa: E402
from router.runner import loop_name  # noqa: E402
from router.runner import run as run_on  # noqa: E402
from router.settings import AgiSettings  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

REPLY = b"200 result=1\n"


class MemoryTransport:
    """Enough of a stream transport for one AgiConnection: replies come one loop
    iteration after each command line; close() reports the connection lost."""

    def __init__(self, conn: AgiConnection, done: asyncio.Future[None]) -> None:
        self._conn = conn
        self._done = done
        self._closing = False
        self._loop = asyncio.get_running_loop()
        self.lines = 0

    def write(self, data: bytes) -> None:
        self.lines += 1
        self._loop.call_soon(self._conn.data_received, REPLY)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.call_soon(self._lost)

    def _lost(self) -> None:
        self._conn.connection_lost(None)
        if not self._done.done():
            self._done.set_result(None)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


async def one_call(server: AgiServer, env: bytes) -> int:
    """Play one call through ``server``; the number of command lines it wrote."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    conn = AgiConnection(server)
    transport = MemoryTransport(conn, done)
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(env)
    await done
    return transport.lines


async def cpu_per_call(server: AgiServer, envs: Sequence[bytes], batch: int = 20) -> float:
    """CPU microseconds per call over ``envs``, ``batch`` calls in flight at a time."""
    gc.collect()
    start = time.process_time()
    for i in range(0, len(envs), batch):
        await asyncio.gather(*(one_call(server, env) for env in envs[i:i + batch]))
    return (time.process_time() - start) / len(envs) * 1e6


@contextlib.contextmanager
def devnull_stderr() -> Iterator[None]:
    """Log lines are formatted and written (as in serve), to /dev/null, not the terminal."""
    saved = sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stderr = sink
        try:
            yield
        finally:
            sys.stderr = saved


def bare_handler() -> Callable[[AgiSession], Awaitable[None]]:
    async def handler(session: AgiSession) -> None:
        await session.set_variables([("ROUTE_QUEUE", "support"), ("ROUTE_RULE", "default"),
                                     ("ROUTE_REASON", "default"), ("ROUTE_ACTION", "queue")])
    return handler


async def main(calls: int, rounds: int) -> None:
    from router.app import build_router
    from router.rules.presence import Presence
    from router.samplecrm import make_app, start_sample_crm

    router_log.setup("INFO")  # one INFO line per call, as serve; written to /dev/null here
    redis = RedisServer()
    redis.start()
    runner, url = await start_sample_crm("127.0.0.1", 0, make_app(token="demo-token", delays={}))
    try:
        settings = bench_settings(redis.url, url, 4096)
        mix = Mix(unknown_numbers(1, 492))
        callers = mix.draw(calls)
        envs = [build_environment(c, None, "4008002000" if i % 5 == 0 else "4008001000",
                                  f"1795300000.{i}") for i, c in enumerate(callers)]
        async with build_router(settings, Presence()) as router:
            router.clock = lambda: OPEN
            bare = AgiServer(AgiSettings(max_sessions=4096))
            bare.route("route", bare_handler())
            route = AgiServer(settings.agi)
            route.route("route", make_route_handler(router))
            warm = [build_environment(n, None, "4008001000", f"1.{i}")
                    for i, n in enumerate(mix.distinct())]
            results: dict[str, list[float]] = {"bare": [], "callroute": []}
            with devnull_stderr():
                await cpu_per_call(route, warm)  # fill the cache: the measured calls are warm
                await cpu_per_call(bare, envs[:500])
                for _ in range(rounds):
                    results["bare"].append(await cpu_per_call(bare, envs))
                    results["callroute"].append(await cpu_per_call(route, envs))
        report(results, calls, loop_name(asyncio.get_running_loop()))
    finally:
        await runner.cleanup()
        redis.close()


def report(results: dict[str, list[float]], calls: int, loop: str) -> None:
    print(f"CPU per call, in-memory transport, {calls} calls per round, "
          f"{len(results['bare'])} rounds (median, min-max), event loop {loop}")
    medians = {}
    for name, values in results.items():
        medians[name] = statistics.median(values)
        print(f"  {name:10s} {medians[name]:7.1f} us  ({min(values):.1f}-{max(values):.1f})")
    print(f"  callroute / bare: x{medians['callroute'] / medians['bare']:.2f}; "
          f"callroute's own work: {medians['callroute'] - medians['bare']:.1f} us per call")


def cli(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="per-call CPU of callroute's Python path")
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    args = parser.parse_args(argv)
    run_on(main(args.calls, args.rounds), args.loop)


if __name__ == "__main__":
    cli()
