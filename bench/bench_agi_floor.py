"""The FastAGI floor: how fast can *any* asyncio responder answer, with no lookup?

Two responders run, each in its own process (so the load generator has its own
core), and are driven by :func:`bench.agi_load.run_load` at the same open-loop rate:

* ``floor``: raw asyncio streams. Read up to the blank line, write the ``SET VARIABLE``
  lines callroute writes for that kind of caller one by one (reading each reply), close:
  the default route's four for a caller the CRM does not know, a customer's ten (owner
  agent, queue, rule, customer id, tier, owner, name...) for a caller listed with
  ``--known``. The same variables with no parsing, no limits and no lookup: the lowest
  decision time this stack can show for the same work on the wire.
* ``agiserver``: :class:`dialplan.server.AgiServer` with a handler that sets the same
  four variables: the cost of our protocol code, limits and bookkeeping over the floor.

Both responders, and the load generator, run on the event loop ``--loop`` selects
(``auto``: uvloop, as ``callroute serve`` does; ``asyncio``: the stock loop).

Run: ``.venv/bin/python -m bench.bench_agi_floor [--rate 500] [--duration 3] [--loop auto]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import signal
import subprocess
import sys
from collections.abc import Sequence

from bench.agi_load import LoadReport, format_table, run_load
from router.runner import LoopChoice
from router.runner import run as run_on

#: What callroute writes for a caller the CRM does not know (the example rules' default).
COMMANDS = (
    b"SET VARIABLE ROUTE_QUEUE support\n",
    b"SET VARIABLE ROUTE_RULE default\n",
    b"SET VARIABLE ROUTE_REASON default\n",
    b"SET VARIABLE ROUTE_ACTION queue\n",
)
#: What callroute writes for a key-account customer (the owner agent first, then a queue).
CUSTOMER_COMMANDS = (
    b'SET VARIABLE ROUTE_TARGET "Local/7001@agents"\n',
    b"SET VARIABLE ROUTE_TIMEOUT 15\n",
    b"SET VARIABLE ROUTE_QUEUE support\n",
    b'SET VARIABLE ROUTE_RULE "key-account-owner"\n',
    b"SET VARIABLE ROUTE_REASON rule\n",
    b'SET VARIABLE CRM_CUSTOMER_ID "C-1001"\n',
    b"SET VARIABLE CRM_TIER vip\n",
    b"SET VARIABLE CRM_OWNER 7001\n",
    b'SET VARIABLE CALLERID(name) "Li Lei"\n',
    b"SET VARIABLE ROUTE_ACTION dial\n",
)
CALLERID = b"agi_callerid: "


async def floor_session(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    known: frozenset[bytes] = frozenset(),
) -> None:
    """The floor: read the environment, write the commands, read replies, close."""
    try:
        env = await reader.readuntil(b"\n\n")
        commands = COMMANDS
        if known:
            start = env.find(CALLERID) + len(CALLERID)
            if env[start:env.find(b"\n", start)] in known:
                commands = CUSTOMER_COMMANDS
        for command in commands:
            writer.write(command)
            await reader.readline()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve(kind: str, known: frozenset[bytes] = frozenset()) -> None:
    """Run one responder on a free port; print ``PORT <n>``; stop on SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if kind == "floor":
        server = await asyncio.start_server(
            functools.partial(floor_session, known=known), "127.0.0.1", 0, backlog=1024)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await stop.wait()
        server.close()
        return
    from dialplan.server import AgiServer, AgiSession
    from router.settings import AgiSettings

    async def handler(session: AgiSession) -> None:
        await session.commands(COMMANDS)

    agi = AgiServer(AgiSettings(port=0, max_sessions=4096))
    agi.route("route", handler)
    await agi.start()
    print(f"PORT {agi.port}", flush=True)
    await stop.wait()
    await agi.stop(1.0)


async def measure(kind: str, rate: float, duration_s: float, loop: str) -> LoadReport:
    """Start responder ``kind`` in a child process (on event loop ``loop``) and load it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.bench_agi_floor", "--serve", kind, "--loop", loop,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        port = int(line.split()[1])
        await run_load("127.0.0.1", port, rate, 0.5, label="warmup")
        return await run_load("127.0.0.1", port, rate, duration_s, label=kind)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()


async def run(rate: float, duration_s: float, loop: str) -> list[LoadReport]:
    """Measure both responders, one after the other."""
    return [await measure(kind, rate, duration_s, loop) for kind in ("floor", "agiserver")]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description="FastAGI floor benchmark")
    parser.add_argument("--serve", choices=["floor", "agiserver"])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                        help="event loop of the responders and the load generator")
    parser.add_argument("--known", default="",
                        help="comma-separated caller ids the floor answers as customers")
    args = parser.parse_args(argv)
    choice: LoopChoice = args.loop
    if args.serve:
        known = frozenset(n.encode() for n in args.known.split(",") if n)
        run_on(serve(args.serve, known), choice)
        return
    reports = run_on(run(args.rate, args.duration, args.loop), choice)
    print(f"FastAGI floor at {args.rate:g} calls/s for {args.duration:g}s (open loop, "
          f"event loop {args.loop})")
    print(format_table(reports))


if __name__ == "__main__":
    main()
