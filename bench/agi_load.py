"""FastAGI load generator: plays Asterisk's side of many calls at a set rate.

Open loop: call *i* starts at ``t0 + i / rate`` whether or not earlier calls have
finished (as real calls arrive), for ``duration_s`` seconds. Each call is a
:class:`LoadPeer` (the conversation of :class:`~dialplan.peer.AsteriskAgiPeer` on a bare
protocol); its decision time is from the environment fully written to the server
closing the socket.

Use it from code (the lead measures the real server and the floor in one run)::

    report = await run_load("127.0.0.1", port, rate=500, duration_s=3)
    print(format_table([report]))

or from the shell: ``python -m bench.agi_load --port 4573 --rate 200 --duration 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.common import percentile
from dialplan.peer import ROUTER, AsteriskAgiPeer, PeerResult, build_environment
from dialplan.protocol import parse_args

MakeEnv = Callable[[int], bytes]
Check = Callable[[PeerResult], str | None]


def default_env(index: int) -> bytes:
    """Call ``index``: a distinct mobile caller on DID 4008001000, a distinct uniqueid."""
    return build_environment(
        f"139{index % 100_000_000:08d}", "Load Test", "4008001000", f"1795300000.{index}"
    )


class LoadPeer(asyncio.Protocol):
    """Asterisk's side of one call, lean enough to play a thousand calls a second.

    The same conversation as :class:`~dialplan.peer.AsteriskAgiPeer` (environment, then
    one reply per command line, decision time from the environment written to the
    server's close), on a bare protocol: the generator stands in for Asterisk, whose AGI
    code is C, and with stream objects, a task and a timer per call it used more CPU
    than the servers it measured, on the same two cores. ``SET VARIABLE`` is answered
    here; any other command by an :class:`AsteriskAgiPeer` made for it.
    """

    def __init__(self, env: bytes, variables: Mapping[str, str] | None,
                 done: asyncio.Future[PeerResult], deadline: float) -> None:
        self.result = PeerResult()
        self.deadline = deadline
        self._env = env
        self._variables = variables
        self._answerer: AsteriskAgiPeer | None = None
        self._done = done
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._env_written_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        transport.write(self._env)  # type: ignore[attr-defined]
        self._env_written_at = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        assert self._transport is not None
        for line in lines:
            self.result.transcript.append((ROUTER, line + b"\n"))
            self._transport.write(self._answer(line.rstrip(b"\r").decode("utf-8", "replace")))

    def _answer(self, text: str) -> bytes:
        if text.startswith("SET VARIABLE "):
            args = parse_args(text)
            if len(args) == 4:
                self.result.variables[args[2]] = args[3]
                return b"200 result=1\n"
        if self._answerer is None:
            self._answerer = AsteriskAgiPeer("", 0, self._env, variables=self._variables)
        return self._answerer.answer(text, self.result.variables)

    def eof_received(self) -> bool:
        self.result.closed_by_server = True
        self.result.decision_ms = (time.monotonic() - self._env_written_at) * 1000.0
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and not self.result.closed_by_server:
            self.result.error = f"connection: {exc}"
        if not self._done.done():
            self._done.set_result(self.result)

    def abort(self, why: str) -> None:
        """Give up on the call."""
        if not self._done.done():
            self.result.error = why
            self._done.set_result(self.result)
        if self._transport is not None:
            self._transport.abort()


class Calls:
    """Plays calls with :class:`LoadPeer`; one sweep (not a timer per call) times out
    the calls past their deadline."""

    def __init__(self, host: str, port: int, timeout_s: float,
                 variables: Mapping[str, str] | None = None) -> None:
        self.host, self.port, self.timeout_s, self.variables = host, port, timeout_s, variables
        self._active: set[LoadPeer] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def play(self, env: bytes) -> PeerResult:
        """One call; errors as :class:`AsteriskAgiPeer` reports them."""
        loop = asyncio.get_running_loop()
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        done: asyncio.Future[PeerResult] = loop.create_future()
        deadline = loop.time() + self.timeout_s
        try:
            _, peer = await loop.create_connection(
                lambda: LoadPeer(env, self.variables, done, deadline), self.host, self.port)
        except OSError as exc:
            result = PeerResult()
            result.error = f"refused: {exc}"
            return result
        self._active.add(peer)
        try:
            return await done
        finally:
            self._active.discard(peer)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.05)
            now = loop.time()
            for peer in [p for p in self._active if p.deadline <= now]:
                peer.abort("timeout")

    async def aclose(self) -> None:
        """Stop the sweep."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper


@dataclass
class LoadReport:
    """What one load run measured."""

    label: str
    offered_rate: float
    duration_s: float
    started: int = 0
    completed: int = 0
    elapsed_s: float = 0.0
    max_start_lag_ms: float = 0.0
    decision_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def achieved_cps(self) -> float:
        """Calls completed per second, first start to last completion."""
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def pct(self, p: float) -> float:
        """Decision-time percentile in ms."""
        return percentile(self.decision_ms, p)

    @property
    def max_ms(self) -> float:
        """Slowest decision in ms."""
        return max(self.decision_ms) if self.decision_ms else math.nan

    def summary(self) -> dict[str, float | int | str]:
        """The figures as a flat dict (for JSON or a table)."""
        return {
            "label": self.label,
            "offered_cps": self.offered_rate,
            "achieved_cps": round(self.achieved_cps, 1),
            "calls": self.started,
            "ok": self.completed,
            "errors": sum(self.errors.values()),
            "p50_ms": round(self.pct(50), 3),
            "p90_ms": round(self.pct(90), 3),
            "p99_ms": round(self.pct(99), 3),
            "max_ms": round(self.max_ms, 3),
            "max_start_lag_ms": round(self.max_start_lag_ms, 2),
        }


def format_table(reports: Sequence[LoadReport]) -> str:
    """A fixed-width table, one row per report, then any error kinds."""
    columns = list(reports[0].summary()) if reports else []
    rows = [[str(r.summary()[c]) for c in columns] for r in reports]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    for report in reports:
        for kind, count in report.errors.most_common():
            lines.append(f"  {report.label}: {count} x {kind}")
    return "\n".join(lines)


async def run_load(
    host: str,
    port: int,
    rate: float,
    duration_s: float,
    make_env: MakeEnv = default_env,
    *,
    label: str = "",
    check: Check | None = None,
    variables: Mapping[str, str] | None = None,
    call_timeout_s: float = 5.0,
) -> LoadReport:
    """Start ``rate * duration_s`` calls on an open-loop schedule and measure them.

    ``check(result)`` may return an error kind for a call that completed but is wrong
    (e.g. no ROUTE_QUEUE set); calls that time out, are refused, or are closed before
    deciding count as errors of their kind.
    """
    total = max(1, round(rate * duration_s))
    report = LoadReport(label or f"{host}:{port}", rate, duration_s)
    tasks: list[asyncio.Task[None]] = []
    loop = asyncio.get_running_loop()
    # The generator stands in for Asterisk (C, no collector): a pause of its own would
    # be measured as the server's latency. No cyclic GC while the calls run.
    gc.collect()
    gc.disable()
    t0 = loop.time()
    last_done = t0

    calls = Calls(host, port, call_timeout_s, variables)

    async def call(index: int) -> None:
        nonlocal last_done
        result = await calls.play(make_env(index))
        last_done = max(last_done, loop.time())
        kind = _error_kind(result) or (check(result) if check else None)
        if kind:
            report.errors[kind] += 1
            return
        report.completed += 1
        assert result.decision_ms is not None
        report.decision_ms.append(result.decision_ms)

    try:
        await _start_calls(report, tasks, call, t0, total, rate)
        await asyncio.gather(*tasks)
    finally:
        gc.enable()
        await calls.aclose()
    report.elapsed_s = last_done - t0
    return report


async def _start_calls(
    report: LoadReport,
    tasks: list[asyncio.Task[None]],
    call: Callable[[int], Coroutine[Any, Any, None]],
    t0: float,
    total: int,
    rate: float,
) -> None:
    """Start call ``i`` at ``t0 + i / rate`` (open loop), recording how late each start is."""
    loop = asyncio.get_running_loop()
    for index in range(total):
        due = t0 + index / rate
        now = loop.time()
        if due > now:
            await asyncio.sleep(due - now)
            now = loop.time()
        report.max_start_lag_ms = max(report.max_start_lag_ms, (now - due) * 1000.0)
        tasks.append(asyncio.create_task(call(index)))
        report.started += 1


def _error_kind(result: PeerResult) -> str | None:
    if result.error:
        return result.error.split(":")[0]
    if not result.closed_by_server or result.decision_ms is None:
        return "not_closed"
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: load a running FastAGI server and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4573)
    parser.add_argument("--rate", type=float, default=100.0, help="calls per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of arrivals")
    args = parser.parse_args(argv)
    started = time.monotonic()
    report = asyncio.run(run_load(args.host, args.port, args.rate, args.duration))
    print(format_table([report]))
    print(f"wall time {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
