"""The FastAGI server: a thin asyncio adapter around :mod:`dialplan.protocol`.

Asterisk connects once per call (``AGI(agi://host:port/route?did=...)``), sends its
``agi_*`` environment, then waits for commands. The server reads the environment
under a deadline and size limits, hands an :class:`AgiSession` to the handler routed
for the script name, and always closes the socket afterwards: Asterisk then goes on
with the dialplan (its fallback applies when nothing was set).

Guarantees: a bound on concurrent sessions; one deadline per session
(``session_timeout_s``, from accept to close, over the environment, the decision and
every command) besides the environment's own; no input (early close, garbage,
megabytes, silence) can crash the server or stall the event loop; handler exceptions
are logged and contained; every log line of a session carries its ``uniqueid``;
``stop()`` drains in-flight sessions within a grace period.

Capacity under a flood: at ``max_sessions``, a new connection closes the oldest one
that has not yet sent a complete environment (counted as ``outcome="shed"``): Asterisk
sends its environment at once, so such a connection is idle or hostile, and a real call
arriving during a flood of idle connections is still served. Only when every slot holds
a session past its environment is a new connection refused (closed at once, counted in
``callroute_agi_rejected``). A peer that stops answering holds its slot until the
session deadline, and the session counts as ``outcome="timeout"``.

Shape: each connection is an :class:`asyncio.Protocol` (:class:`AgiConnection`) that
feeds the bytes it receives to an :class:`~dialplan.protocol.AgiParser` and hands the
events to its session. A batch of commands (:meth:`AgiSession.commands`) runs from
those callbacks: each reply writes the next command at once, and the handler's task
wakes up once, when the whole batch is answered. There is no reader task, no stream
buffer and no per-command future: on the call path every wake-up of a task costs more
than the bytes it moves. The handler runs in its own task, created once the
environment is complete, in a context where the call's ``uniqueid`` is bound for
logging (as are the connection's own callbacks).

Deadlines (the environment's, each batch's) are not timers: the server sweeps its
connections every :func:`sweep_interval` and fails what is overdue, so a deadline fires at
most one interval late. A timer per call would cost more than the rest of the protocol
work: on uvloop each one is a libuv handle to create, stop and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import cast

from dialplan import protocol
from dialplan.protocol import (
    AgiEnvironment,
    AgiEvent,
    AgiParser,
    AgiReply,
    EndOfStream,
    HangupNotice,
)
from router.errors import AgiHangup, AgiProtocolError, ListenError
from router.log import call_id
from router.metrics import AGI_ACTIVE, AGI_REJECTED, AGI_SESSIONS, child
from router.settings import AgiSettings

log = logging.getLogger("callroute.agi")

Handler = Callable[["AgiSession"], Awaitable[None]]
CLOSE_TIMEOUT_S = 1.0


def sweep_interval(settings: AgiSettings) -> float:
    """How often the server checks deadlines: a tenth of the shortest, 10 to 100 ms."""
    shortest = min(settings.env_timeout_s, settings.command_timeout_s)
    return min(0.1, max(0.01, shortest / 10))


class _Batch:
    """Command lines in flight: the next one is written when the previous is answered."""

    __slots__ = ("deadline", "future", "lines", "replies")

    def __init__(
        self, lines: Sequence[bytes], future: asyncio.Future[list[AgiReply]], deadline: float
    ) -> None:
        self.lines = lines
        self.replies: list[AgiReply] = []
        self.future = future
        #: loop time by which every reply must be in
        self.deadline = deadline


class AgiSession:
    """One call's FastAGI conversation, as the route handler sees it.

    Commands are sent one at a time, each after the previous reply; a command (or a
    batch of ``n``) waits for its replies at most ``command_timeout_s`` (``n`` times
    that), and never past the session's ``deadline`` (loop time), when the session is
    failed and closed whatever it is doing. What Asterisk writes is parsed as it
    arrives, so :attr:`hungup` turns true as soon as ``HANGUP`` (or EOF) arrives, even
    while the handler is busy elsewhere.
    After ``HANGUP`` commands may still be sent (Asterisk answers them); after EOF
    they raise :class:`AgiHangup`.
    """

    def __init__(
        self,
        env: AgiEnvironment,
        transport: asyncio.WriteTransport,
        *,
        command_timeout_s: float,
        started_at: float,
        closer: Callable[[], None] | None = None,
        deadline: float = float("inf"),
    ) -> None:
        self.env = env
        self.started_at = started_at
        self.command_timeout_s = command_timeout_s
        #: loop time by which the whole session must be over
        self.deadline = deadline
        self.hungup = False
        #: True once a command went unanswered for ``command_timeout_s``, or the session
        #: deadline passed.
        self.timed_out = False
        self._transport = transport
        self._lock = asyncio.Lock()
        self._batch: _Batch | None = None
        self._hangup_event = asyncio.Event()
        self._eof = False
        self._broken: AgiProtocolError | None = None
        self._closer = closer

    @property
    def script(self) -> str:
        """The script name the session was routed by (``route``)."""
        return self.env.script

    @property
    def query(self) -> dict[str, str]:
        """The query parameters of the AGI URL (``{"did": "4008001000"}``)."""
        return self.env.query

    def close(self) -> None:
        """End the session now: Asterisk goes on with the dialplan while the handler
        finishes its bookkeeping (the server closes the connection anyway when the
        handler returns; this only does it sooner)."""
        if self._closer is not None:
            self._closer()

    # -- commands ------------------------------------------------------------------------------

    async def command(self, data: bytes) -> AgiReply:
        """Send one command line (from :mod:`dialplan.protocol`) and return its reply.

        Raises :class:`AgiHangup` when Asterisk closed the socket, and
        :class:`AgiProtocolError` on a malformed reply or no reply in time (the session
        cannot be used after that).
        """
        return (await self.commands([data]))[0]

    async def commands(self, lines: Sequence[bytes]) -> list[AgiReply]:
        """Send command lines one after another, each after the previous reply, under
        one deadline of ``command_timeout_s`` per command; a ``511`` (dead channel)
        reply ends the batch early. The cheap path for a handler that sets many
        variables: the task waits once for the whole batch. Errors as for
        :meth:`command`."""
        if not lines:
            return []
        async with self._lock:
            self._check_usable()
            loop = asyncio.get_running_loop()
            deadline = min(loop.time() + self.command_timeout_s * len(lines), self.deadline)
            batch = _Batch(lines, loop.create_future(), deadline)
            self._batch = batch
            try:
                self._transport.write(lines[0])
                return await batch.future
            finally:
                self._batch = None

    async def set_variables(self, items: Iterable[tuple[str, str]]) -> None:
        """``SET VARIABLE`` for each (name, value), in order, through :meth:`commands`;
        raises AgiHangup on 511, AgiProtocolError if a reply is not 200."""
        lines = [protocol.set_variable(name, value) for name, value in items]
        for reply in await self.commands(lines):
            self._expect_ok(reply)

    async def set_variable(self, name: str, value: str) -> None:
        """``SET VARIABLE``; raises AgiHangup on 511, AgiProtocolError if not 200."""
        self._expect_ok(await self.command(protocol.set_variable(name, value)))

    async def get_variable(self, name: str) -> str | None:
        """``GET VARIABLE``: the value, or None when the variable is not set."""
        reply = self._expect_ok(await self.command(protocol.get_variable(name)))
        return reply.data if reply.result == 1 else None

    async def get_full_variable(self, expr: str) -> str | None:
        """``GET FULL VARIABLE``: the evaluated expression, or None if Asterisk says 0."""
        reply = self._expect_ok(await self.command(protocol.get_full_variable(expr)))
        return reply.data if reply.result == 1 else None

    async def verbose(self, message: str, level: int = 1) -> None:
        """``VERBOSE``: a line in the Asterisk console/log."""
        self._expect_ok(await self.command(protocol.verbose(message, level)))

    async def noop(self, text: str = "") -> None:
        """``NOOP``: a round trip that does nothing."""
        self._expect_ok(await self.command(protocol.noop(text)))

    async def wait_hungup(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for ``HANGUP``/EOF; return :attr:`hungup`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._hangup_event.wait()
        return self.hungup

    # -- events from the connection ------------------------------------------------------------

    def on_event(self, event: AgiEvent) -> None:
        """Take one event parsed from Asterisk's bytes (called by the connection).

        Raises :class:`AgiProtocolError` for a reply nobody asked for.
        """
        if isinstance(event, AgiReply):
            self.on_reply(event)
        elif isinstance(event, HangupNotice):
            self._mark_hungup("HANGUP line")
        elif isinstance(event, EndOfStream):
            self.on_closed("connection closed", AgiHangup("Asterisk closed the connection"))

    def on_broken(self, exc: AgiProtocolError) -> None:
        """Asterisk sent something the parser rejects: the session is unusable."""
        log.warning("protocol error from Asterisk: %s", exc)
        self._broken = exc
        self._finish(exc)

    def on_closed(self, why: str, exc: AgiProtocolError) -> None:
        """The connection is gone (EOF or an error): pending commands fail with ``exc``."""
        self._eof = True
        self._mark_hungup(why)
        self._finish(exc)

    # -- internals -----------------------------------------------------------------------------

    def on_reply(self, reply: AgiReply) -> None:
        """A reply: the next command of the batch goes out, or the batch is answered.

        Raises :class:`AgiProtocolError` for a reply nobody asked for.
        """
        batch = self._batch
        if batch is None or batch.future.done():
            raise AgiProtocolError(f"reply without a command: {reply.text[:80]!r}")
        batch.replies.append(reply)
        if reply.code == 511:
            self._mark_hungup("511 reply")
        elif len(batch.replies) < len(batch.lines):
            self._transport.write(batch.lines[len(batch.replies)])
            return
        batch.future.set_result(batch.replies)

    def check_deadline(self, now: float) -> None:
        """Fail the batch in flight if its deadline (loop time) has passed; past the
        session deadline, fail the session and close it."""
        if now >= self.deadline:
            self._session_timeout()
            return
        batch = self._batch
        if batch is not None and now >= batch.deadline:
            self._on_timeout()

    def _on_timeout(self) -> None:
        batch = self._batch
        if batch is None or batch.future.done():
            return
        self.timed_out = True
        index = len(batch.replies)
        sent = batch.lines[index] if index < len(batch.lines) else b""
        self._broken = AgiProtocolError(
            f"no reply within {self.command_timeout_s}s to {sent[:60]!r}"
        )
        log.warning("FastAGI session timed out: %s", self._broken)
        batch.future.set_exception(self._broken)

    def _session_timeout(self) -> None:
        if self._broken is not None and self.timed_out:
            return
        self.timed_out = True
        batch = self._batch
        waiting = ""
        if batch is not None and not batch.future.done():
            index = len(batch.replies)
            sent = batch.lines[index] if index < len(batch.lines) else b""
            waiting = f", waiting for the reply to {sent[:60]!r}"
        self._broken = AgiProtocolError(f"session deadline passed{waiting}")
        log.warning("FastAGI session timed out: %s; closing it", self._broken)
        self._finish(self._broken)
        self.close()

    def _finish(self, exc: AgiProtocolError) -> None:
        batch = self._batch
        if batch is not None and not batch.future.done():
            batch.future.set_exception(exc)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise self._broken
        if self._eof:
            raise AgiHangup("Asterisk closed the connection")

    def _expect_ok(self, reply: AgiReply) -> AgiReply:
        if reply.code == 511:
            raise AgiHangup(f"channel is dead: {reply.text}")
        if reply.code != 200:
            raise AgiProtocolError(f"command failed: {reply.text[:120]!r}")
        return reply

    def _mark_hungup(self, why: str) -> None:
        if not self.hungup:
            self.hungup = True
            log.info("caller hung up (%s)", why)
        self._hangup_event.set()


class AgiConnection(asyncio.Protocol):
    """One FastAGI connection: bytes to the parser, events to the session.

    Before the environment is complete it enforces the environment deadline and the
    parser's limits (a violation closes the connection and is counted as
    ``bad_environment``); then it starts the handler's task and forwards every later
    event to the :class:`AgiSession`.
    """

    def __init__(self, server: AgiServer) -> None:
        self._server = server
        self._settings = server.settings
        self._transport: asyncio.Transport | None = None
        self._parser = AgiParser(
            max_env_bytes=self._settings.max_env_bytes,
            max_env_lines=self._settings.max_env_lines,
            max_line_bytes=self._settings.max_line_bytes,
        )
        self._env_deadline = 0.0
        self._deadline = 0.0
        self._session: AgiSession | None = None
        self._context: contextvars.Context | None = None
        self._done = False  # counted and closing: nothing more to do

    # -- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's do not subclass asyncio.Transport)
        self._transport = cast(asyncio.Transport, transport)
        if not self._server.admit(self):
            self._done = True
            transport.close()
            return
        now = self._server.loop_time()
        self._deadline = now + self._settings.session_timeout_s
        self._env_deadline = min(now + self._settings.env_timeout_s, self._deadline)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        try:
            events = self._parser.feed(data)
        except AgiProtocolError as exc:
            self._protocol_error(exc)
            return
        if events:
            self._dispatch(events)

    def eof_received(self) -> bool:
        if not self._done:
            try:
                events = self._parser.feed_eof()
            except AgiProtocolError as exc:
                self._protocol_error(exc)
            else:
                self._dispatch(events)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.release(self)
        if self._done:
            return
        why = f"connection lost: {exc}" if exc else "connection closed"
        if self._session is None:
            self._bad_environment(f"{why} while reading the environment")
        else:
            self._in_context(self._session.on_closed, why, AgiHangup(why))

    # -- internals -----------------------------------------------------------------------------

    def _dispatch(self, events: list[AgiEvent]) -> None:
        if self._session is None:
            env = events[0]
            if not isinstance(env, AgiEnvironment):  # the parser yields the env first
                return
            self._start(env)
            events = events[1:]
            if not events:
                return
        self._in_context(self._forward, events)

    def _forward(self, events: list[AgiEvent]) -> None:
        session = self._session
        assert session is not None
        try:
            for event in events:
                session.on_event(event)
        except AgiProtocolError as exc:
            session.on_broken(exc)

    def _protocol_error(self, exc: AgiProtocolError) -> None:
        if self._session is None:
            self._bad_environment(str(exc))
            self.close()
        else:
            self._in_context(self._session.on_broken, exc)

    def _start(self, env: AgiEnvironment) -> None:
        """The environment is complete: run the handler in a task of its own."""
        assert self._transport is not None
        self._session = AgiSession(
            env,
            self._transport,
            command_timeout_s=self._settings.command_timeout_s,
            started_at=time.monotonic(),
            closer=self.close,
            deadline=self._deadline,
        )
        self._context = contextvars.copy_context()
        self._context.run(call_id.set, env.uniqueid or "-")
        self._server.start_session(self, self._session, self._context)

    def check_deadlines(self, now: float) -> None:
        """Called by the server's sweep: close an overdue environment, fail an overdue
        command batch."""
        if self._session is not None:
            self._in_context(self._session.check_deadline, now)
        elif not self._done and now >= self._env_deadline:
            self._env_timeout()

    def _env_timeout(self) -> None:
        if self._session is None and not self._done:
            self._bad_environment(
                f"no complete environment within {self._settings.env_timeout_s}s"
            )
            self.close()

    def shed(self) -> None:
        """Closed to make room for a new connection: it had not sent its environment."""
        self._done = True
        child(AGI_SESSIONS, "shed").inc()
        self.close()

    def _bad_environment(self, why: str) -> None:
        self._done = True
        AGI_SESSIONS.labels(outcome="bad_environment").inc()
        log.warning("bad FastAGI connection: %s", why)

    def _in_context(self, func: Callable[..., None], *args: object) -> None:
        if self._context is None:
            func(*args)
        else:
            self._context.run(func, *args)

    @property
    def started(self) -> bool:
        """True once the environment is complete and the handler's task runs."""
        return self._session is not None

    def close(self) -> None:
        """Close the socket after what was written has been sent (idempotent)."""
        self._done = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


class AgiServer:
    """The FastAGI server: routes each session by script name to a handler.

    >>> server = AgiServer(settings.agi)
    >>> server.route("route", handle_route)
    >>> await server.start(); ...; await server.stop()
    """

    def __init__(self, settings: AgiSettings | None = None) -> None:
        self.settings = settings or AgiSettings()
        self._routes: dict[str, Handler] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[AgiConnection] = set()
        #: connections still reading their environment, oldest first (shed first)
        self._waiting_env: dict[AgiConnection, None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._overload = _Throttled()
        self._stopped = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None

    def route(self, script: str, handler: Handler) -> None:
        """Send sessions whose ``agi_network_script`` path is ``script`` to ``handler``."""
        self._routes[script.strip("/")] = handler

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port: 0``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the AGI server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def active(self) -> int:
        """Connections being served right now."""
        return len(self._connections)

    async def start(self) -> None:
        """Bind and start accepting connections; :class:`ListenError` when the address
        cannot be bound (the port is in use...)."""
        self._stopped.clear()
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: AgiConnection(self),
                self.settings.host,
                self.settings.port,
                backlog=max(128, self.settings.max_sessions),
            )
        except OSError as exc:
            raise ListenError.from_os_error(
                exc, "agi.port", self.settings.host, self.settings.port) from exc
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep(), name="agi-deadlines")
        log.info("FastAGI server listening on %s:%d", self.settings.host, self.port)

    async def serve_forever(self) -> None:
        """Start if needed, then wait until :meth:`stop` has finished."""
        if self._server is None:
            await self.start()
        await self._stopped.wait()

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop accepting, let in-flight sessions finish for ``grace_s``, cancel the rest."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if not conn.started:
                conn.close()  # still sending its environment: the dialplan falls back
        if self._tasks:
            log.info("stopping: waiting up to %.1fs for %d sessions", grace, len(self._tasks))
            _, late = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("stopping: cancelled %d sessions after the grace period", len(late))
                await asyncio.wait(late, timeout=CLOSE_TIMEOUT_S)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        """Make SIGTERM and SIGINT run a graceful :meth:`stop`."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_from_signal, sig)

    def _stop_from_signal(self, sig: signal.Signals) -> None:
        log.info("received %s: stopping", sig.name)
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self.stop())

    async def __aenter__(self) -> AgiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- per connection (called by AgiConnection) ----------------------------------------------

    def loop_time(self) -> float:
        """The event loop's clock, which deadlines are kept in."""
        return asyncio.get_running_loop().time()

    async def _sweep(self) -> None:
        """Every :func:`sweep_interval`: fail what is past its deadline."""
        interval = sweep_interval(self.settings)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for conn in list(self._connections):
                try:
                    conn.check_deadlines(now)
                except Exception:  # one broken connection must not stop the sweep
                    log.exception("deadline check failed")

    def admit(self, conn: AgiConnection) -> bool:
        """A new connection. At ``max_sessions``, the oldest connection still without a
        complete environment is shed to make room; when there is none, False (counted)."""
        if len(self._connections) >= self.settings.max_sessions:
            victim = next(iter(self._waiting_env), None)
            if victim is None:
                AGI_REJECTED.inc()
                self._overload.note(
                    "refused", "FastAGI at max_sessions (%d), every session past its "
                    "environment: %d connection(s) refused in the last %.1fs",
                    self.settings.max_sessions)
                return False
            self.release(victim)
            victim.shed()
            self._overload.note(
                "shed", "FastAGI at max_sessions (%d): %d connection(s) that had not sent "
                "their environment closed to make room in the last %.1fs",
                self.settings.max_sessions)
        self._connections.add(conn)
        self._waiting_env[conn] = None
        AGI_ACTIVE.inc()
        return True

    def release(self, conn: AgiConnection) -> None:
        """A connection is gone."""
        if conn in self._connections:
            self._connections.discard(conn)
            self._waiting_env.pop(conn, None)
            AGI_ACTIVE.dec()

    def start_session(
        self, conn: AgiConnection, session: AgiSession, context: contextvars.Context
    ) -> None:
        """Run the handler for ``session`` in a task, in the call's logging context."""
        self._waiting_env.pop(conn, None)
        task = asyncio.get_running_loop().create_task(
            self._run(conn, session), context=context
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: AgiConnection, session: AgiSession) -> None:
        outcome = "cancelled"
        try:
            outcome = await self._run_handler(session)
        finally:
            conn.close()  # Asterisk goes on with the dialplan as soon as we close
            child(AGI_SESSIONS, outcome).inc()

    async def _run_handler(self, session: AgiSession) -> str:
        handler = self._routes.get(session.script)
        if handler is None:
            log.warning("unknown AGI script %r: closing (the dialplan falls back)", session.script)
            return "unknown_script"
        try:
            await handler(session)
        except AgiHangup as exc:
            log.info("session ended by hangup: %s", exc)
            return "hangup"
        except AgiProtocolError as exc:
            if session.timed_out:
                return "timeout"  # logged when it timed out
            log.warning("session failed: %s", exc)
            return "protocol_error"
        except Exception:
            log.exception("route handler failed (the dialplan falls back)")
            return "handler_error"
        # a handler may swallow the failure of its commands (the route handler does: the
        # dialplan falls back); a session that ran out of time still counts as a timeout
        return "timeout" if session.timed_out else "ok"


class _Throttled:
    """Counts overload events by kind and logs each kind at most once a second."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._counts: dict[str, int] = {}
        self._since: dict[str, float] = {}

    def note(self, kind: str, message: str, limit: int) -> None:
        now = time.monotonic()
        count = self._counts.get(kind, 0) + 1
        since = self._since.setdefault(kind, now - self.every_s)
        if now - since >= self.every_s:
            log.warning(message, limit, count, now - since)
            count = 0
            self._since[kind] = now
        self._counts[kind] = count
