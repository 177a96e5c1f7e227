"""An Asterisk-side FastAGI peer for tests, the demo and the benches.

:class:`AsteriskAgiPeer` connects to a FastAGI server the way Asterisk 22 does: it
writes an ``agi_*`` environment (from :func:`build_environment`, byte-compatible with
the recordings in ``tests/fixtures/asterisk-22/agi``, or a recorded one verbatim),
then answers each command line as Asterisk answers it, until the server closes the
socket. Options reproduce the awkward cases: ``HANGUP`` after a delay, closing early,
``100 Trying`` before replies, slow replies, 511 after a hangup.

:meth:`AsteriskAgiPeer.replay` instead plays a recording: it writes the recorded
Asterisk bytes in order, reading one command line wherever the recording has one.

Every run returns a :class:`PeerResult`: the transcript, the variables the server
set, and ``decision_ms`` (from the environment fully written to the server closing
the socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from dialplan.protocol import parse_args

ASTERISK: Final = "asterisk->router"
ROUTER: Final = "router->asterisk"
MAX_COMMAND_LINE: Final = 65536

_SUBST = re.compile(r"\$\{([^{}]*)\}")
_Body = Callable[["_PeerIO"], Awaitable[None]]


def build_environment(
    callerid: str,
    calleridname: str | None,
    did: str,
    uniqueid: str = "1795338333.1",
    *,
    channel: str | None = None,
    context: str = "inbound",
    script: str = "route",
    host: str = "127.0.0.1",
    port: int = 4573,
    language: str = "en",
    version: str = "22.10.1",
    priority: int = 3,
    threadid: int = 140191011657408,
    accountcode: str = "",
) -> bytes:
    """An environment exactly as Asterisk 22.10.1 writes it for ``AGI(agi://...)``.

    Same lines, order and framing as the recordings; ``calleridname=None`` gives
    ``unknown`` as Asterisk sends for a withheld name. ``script`` is the path and
    ``?did=<did>`` is appended, as in the recorded dialplan.
    """
    network_script = f"{script}?did={did}"
    lines = [
        ("network", "yes"),
        ("network_script", network_script),
        ("request", f"agi://{host}:{port}/{network_script}"),
        ("channel", channel or f"Local/{did}@{context}-00000000;2"),
        ("language", language),
        ("type", "Local"),
        ("uniqueid", uniqueid),
        ("version", version),
        ("callerid", callerid or "unknown"),
        ("calleridname", calleridname or "unknown"),
        ("callingpres", "0"),
        ("callingani2", "0"),
        ("callington", "0"),
        ("callingtns", "0"),
        ("dnid", "unknown"),
        ("rdnis", "unknown"),
        ("context", context),
        ("extension", did),
        ("priority", str(priority)),
        ("enhanced", "0.0"),
        ("accountcode", accountcode),
        ("threadid", str(threadid)),
    ]
    text = "".join(f"agi_{name}: {value}\n" for name, value in lines) + "\n"
    return text.encode("utf-8")


# --- recordings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedFrame:
    """One write in a recorded session: seconds since it opened, direction, bytes."""

    t: float
    dir: str
    data: bytes


@dataclass(frozen=True)
class Recording:
    """A recorded FastAGI session (``tests/fixtures/asterisk-22/agi/*.json``)."""

    name: str
    frames: tuple[RecordedFrame, ...]

    @property
    def environment(self) -> bytes:
        """The environment Asterisk sent (the first Asterisk frame)."""
        return next(f.data for f in self.frames if f.dir == ASTERISK)

    def sent(self, direction: str) -> bytes:
        """Every byte written in one direction, concatenated."""
        return b"".join(f.data for f in self.frames if f.dir == direction)

    @property
    def commands(self) -> list[bytes]:
        """The command lines the router wrote, in order."""
        return [f.data for f in self.frames if f.dir == ROUTER]


def load_recording(path: str | Path) -> Recording:
    """Read a recording JSON file: a list of ``{"t", "dir", "data"}`` objects."""
    file = Path(path)
    raw: list[dict[str, Any]] = json.loads(file.read_text(encoding="utf-8"))
    frames = tuple(
        RecordedFrame(float(item["t"]), str(item["dir"]), str(item["data"]).encode("utf-8"))
        for item in raw
    )
    return Recording(file.stem, frames)


# --- the peer -------------------------------------------------------------------------------


@dataclass
class PeerResult:
    """What happened in one session, seen from Asterisk's side."""

    #: Every write, in order: (direction, bytes).
    transcript: list[tuple[str, bytes]] = field(default_factory=list)
    #: Seconds since connecting, one per transcript entry.
    times: list[float] = field(default_factory=list)
    #: Variables set with SET VARIABLE, last value wins.
    variables: dict[str, str] = field(default_factory=dict)
    #: Milliseconds from the environment fully written to the server's close.
    decision_ms: float | None = None
    #: True when the server closed the socket (rather than us, or a timeout).
    closed_by_server: bool = False
    #: Why the session did not end normally ("timeout", "refused", ...), else None.
    error: str | None = None

    def sent(self, direction: str) -> bytes:
        """Every byte written in one direction, concatenated."""
        return b"".join(data for d, data in self.transcript if d == direction)

    @property
    def commands(self) -> list[bytes]:
        """The command lines the server wrote, in order."""
        return [data for d, data in self.transcript if d == ROUTER]


class AsteriskAgiPeer:
    """Plays Asterisk's side of one FastAGI session against ``host:port``.

    Replies as Asterisk 22 does: ``SET VARIABLE`` → ``200 result=1`` (stored);
    ``GET VARIABLE`` → ``200 result=1 (value)`` or ``200 result=0``; ``GET FULL
    VARIABLE`` → ``200 result=1 (expanded)`` (``${NAME}`` from the variables, with
    ``CALLERID(num)``/``CALLERID(name)`` from the environment); ``VERBOSE`` →
    ``200 result=1``; ``NOOP`` → ``200 result=0``; a wrong argument count → a 520
    usage block; anything else (``EXEC`` included) → ``510 Invalid or unknown command``.

    Options: ``hangup_after_s`` writes ``HANGUP`` that long after the environment;
    ``dead_after_hangup`` then answers ``511`` (a dead channel) instead of carrying on;
    ``close_after_s`` closes our side; ``env_cut`` writes only that many bytes of the
    environment and closes; ``env_chunk`` writes the environment in pieces;
    ``trying_first`` sends ``100 result=0 Trying...`` before each reply;
    ``reply_delay_s`` waits before each reply; ``timeout_s`` bounds the whole run.
    """

    def __init__(
        self,
        host: str,
        port: int,
        environment: bytes,
        *,
        variables: Mapping[str, str] | None = None,
        hangup_after_s: float | None = None,
        dead_after_hangup: bool = False,
        close_after_s: float | None = None,
        env_cut: int | None = None,
        env_chunk: int | None = None,
        trying_first: bool = False,
        reply_delay_s: float = 0.0,
        timeout_s: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.environment = environment
        self.channel_vars = _initial_variables(environment)
        self.channel_vars.update(variables or {})
        self.hangup_after_s = hangup_after_s
        self.dead_after_hangup = dead_after_hangup
        self.close_after_s = close_after_s
        self.env_cut = env_cut
        self.env_chunk = env_chunk
        self.trying_first = trying_first
        self.reply_delay_s = reply_delay_s
        self.timeout_s = timeout_s
        self._hung_up = False

    async def run(self) -> PeerResult:
        """Connect, send the environment, answer commands until the server closes."""
        return await self._session(self._emulate)

    @classmethod
    async def replay(
        cls, host: str, port: int, recording: Recording, *, timeout_s: float = 5.0
    ) -> PeerResult:
        """Play a recording's Asterisk side verbatim against ``host:port``.

        Asterisk frames are written in order; wherever the recording has a router
        frame, one command line is read first. Nothing is interpreted.
        """
        peer = cls(host, port, recording.environment, timeout_s=timeout_s)
        frames = list(recording.frames)
        first = next(i for i, f in enumerate(frames) if f.dir == ASTERISK)

        async def script(io: _PeerIO) -> None:
            for frame in frames[first + 1 :]:
                if frame.dir == ASTERISK:
                    await io.write(frame.data)
                elif await io.read_line() is None:
                    return
            await io.read_line()  # then wait for the server to close

        return await peer._session(script)

    # -- internals -----------------------------------------------------------------------------

    async def _session(self, body: _Body) -> PeerResult:
        result = PeerResult()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        except OSError as exc:
            result.error = f"refused: {exc}"
            return result
        io = _PeerIO(reader, writer, result, time.monotonic())
        helpers: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                if await self._send_environment(io):
                    helpers = self._start_helpers(io)
                    await body(io)
        except TimeoutError:
            result.error = "timeout"
        except ConnectionError as exc:
            result.error = f"connection: {exc}"
        finally:
            for task in helpers:
                task.cancel()
            for task in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await io.close()
        return result

    async def _send_environment(self, io: _PeerIO) -> bool:
        env = self.environment if self.env_cut is None else self.environment[: self.env_cut]
        step = self.env_chunk or len(env) or 1
        for start in range(0, len(env), step):
            await io.write(env[start : start + step])
        io.env_written_at = time.monotonic()
        if self.env_cut is not None:
            io.close_now()
            return False
        return True

    def _start_helpers(self, io: _PeerIO) -> list[asyncio.Task[None]]:
        tasks = []
        if self.hangup_after_s is not None:
            tasks.append(asyncio.create_task(self._hangup_later(io, self.hangup_after_s)))
        if self.close_after_s is not None:
            tasks.append(asyncio.create_task(self._close_later(io, self.close_after_s)))
        return tasks

    async def _hangup_later(self, io: _PeerIO, delay: float) -> None:
        await asyncio.sleep(delay)
        self._hung_up = True
        with contextlib.suppress(ConnectionError):
            await io.write(b"HANGUP\n")

    async def _close_later(self, io: _PeerIO, delay: float) -> None:
        await asyncio.sleep(delay)
        io.close_now()

    async def _emulate(self, io: _PeerIO) -> None:
        while (line := await io.read_line()) is not None:
            if self.reply_delay_s:
                await asyncio.sleep(self.reply_delay_s)
            if self.trying_first:
                await io.write(b"100 result=0 Trying...\n")
            text = line.rstrip(b"\r\n").decode("utf-8", errors="replace")
            await io.write(self.answer(text, io.result.variables))

    def answer(self, line: str, assigned: dict[str, str]) -> bytes:
        """Asterisk's reply to one command line (``assigned`` collects SET VARIABLEs)."""
        args = parse_args(line)
        words = [a.upper() for a in args[:3]]
        if self._hung_up and self.dead_after_hangup:
            return b"511 Command Not Permitted on a dead channel\n"
        if words[:2] == ["SET", "VARIABLE"]:
            if len(args) != 4:
                return _usage("SET VARIABLE <variablename> <value>")
            self.channel_vars[args[2]] = assigned[args[2]] = args[3]
            return b"200 result=1\n"
        if words == ["GET", "FULL", "VARIABLE"]:
            if len(args) not in (4, 5):
                return _usage("GET FULL VARIABLE <variablename> [<channel name>]")
            return _value(self._expand(args[3]))
        if words[:2] == ["GET", "VARIABLE"]:
            if len(args) != 3:
                return _usage("GET VARIABLE <variablename>")
            value = self.channel_vars.get(args[2])
            return b"200 result=0\n" if value is None else _value(value)
        if words[:1] == ["VERBOSE"]:
            return b"200 result=1\n"
        if words[:1] == ["NOOP"]:
            return b"200 result=0\n"
        return b"510 Invalid or unknown command\n"

    def _expand(self, expr: str) -> str:
        return _SUBST.sub(lambda m: self.channel_vars.get(m.group(1), ""), expr)


class _PeerIO:
    """The socket plus the transcript being recorded."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        result: PeerResult,
        opened_at: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.result = result
        self.opened_at = opened_at
        self.env_written_at: float | None = None
        self.closed_by_us = False

    def _note(self, direction: str, data: bytes) -> None:
        self.result.transcript.append((direction, data))
        self.result.times.append(time.monotonic() - self.opened_at)

    async def write(self, data: bytes) -> None:
        if self.closed_by_us:
            return
        self._note(ASTERISK, data)
        self.writer.write(data)
        await self.writer.drain()

    async def read_line(self) -> bytes | None:
        """The next line from the server, or None once it closed (decision time taken)."""
        if self.closed_by_us:
            return None
        try:
            line = await self.reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self._note(ROUTER, exc.partial)
            self._server_closed()
            return None
        except asyncio.LimitOverrunError:
            self.result.error = "command line too long"
            return None
        except ConnectionError:
            self._server_closed()
            return None
        self._note(ROUTER, line)
        return line

    def _server_closed(self) -> None:
        if self.closed_by_us:
            return
        self.result.closed_by_server = True
        if self.env_written_at is not None:
            self.result.decision_ms = (time.monotonic() - self.env_written_at) * 1000.0

    def close_now(self) -> None:
        self.closed_by_us = True
        self.writer.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()


def _initial_variables(environment: bytes) -> dict[str, str]:
    """Channel variables Asterisk would have, taken from an environment's callerid."""
    found: dict[str, str] = {}
    for line in environment.decode("utf-8", errors="replace").splitlines():
        name, _, value = line.partition(": ")
        if name == "agi_callerid":
            found["CALLERID(num)"] = value
        elif name == "agi_calleridname":
            found["CALLERID(name)"] = value
    return found


def _value(value: str) -> bytes:
    return f"200 result=1 ({value})\n".encode()


def _usage(usage: str) -> bytes:
    return (
        "520-Invalid command syntax.  Proper usage follows:\n"
        f" Usage: {usage}\n"
        "520 End of proper usage.\n"
    ).encode()
