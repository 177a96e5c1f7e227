"""The FastAGI server: a thin asyncio adapter around :mod:`dialplan.protocol`.

Asterisk connects once per call (``AGI(agi://host:port/route?did=...)``), sends its
``agi_*`` environment, then waits for commands. The server reads the environment
under a deadline and size limits, hands an :class:`AgiSession` to the handler routed
for the script name, and always closes the socket afterwards: Asterisk then goes on
with the dialplan (its fallback applies when nothing was set).

Guarantees: a bound on concurrent sessions (over it, a connection is closed at once,
without a command, and counted); deadlines on the environment and on every reply; no
input (early close, garbage, megabytes, silence) can crash the server or stall the
event loop; handler exceptions are logged and contained; every log line of a session
carries its ``uniqueid``; ``stop()`` drains in-flight sessions within a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence

from dialplan import protocol
from dialplan.protocol import (
    AgiEnvironment,
    AgiEvent,
    AgiParser,
    AgiReply,
    EndOfStream,
    HangupNotice,
)
from router.errors import AgiHangup, AgiProtocolError
from router.log import bind_call
from router.metrics import AGI_ACTIVE, AGI_REJECTED, AGI_SESSIONS
from router.settings import AgiSettings

log = logging.getLogger("callroute.agi")

Handler = Callable[["AgiSession"], Awaitable[None]]
READ_CHUNK = 65536
CLOSE_TIMEOUT_S = 1.0


class AgiSession:
    """One call's FastAGI conversation, as the route handler sees it.

    Commands are sent one at a time; each waits for its reply at most
    ``command_timeout_s``. A background reader keeps parsing what Asterisk writes so
    that :attr:`hungup` turns true as soon as ``HANGUP`` (or EOF) arrives, even while
    the handler is busy elsewhere. After ``HANGUP`` commands may still be sent
    (Asterisk answers them); after EOF they raise :class:`AgiHangup`.
    """

    def __init__(
        self,
        env: AgiEnvironment,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        parser: AgiParser,
        *,
        command_timeout_s: float,
        started_at: float,
    ) -> None:
        self.env = env
        self.started_at = started_at
        self.command_timeout_s = command_timeout_s
        self.hungup = False
        #: True once a command went unanswered for ``command_timeout_s``.
        self.timed_out = False
        self._reader = reader
        self._writer = writer
        self._parser = parser
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[AgiReply] | None = None
        self._hangup_event = asyncio.Event()
        self._eof = False
        self._broken: AgiProtocolError | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def script(self) -> str:
        """The script name the session was routed by (``route``)."""
        return self.env.script

    @property
    def query(self) -> dict[str, str]:
        """The query parameters of the AGI URL (``{"did": "4008001000"}``)."""
        return self.env.query

    # -- lifecycle (used by the server) -------------------------------------------------------

    def start_reading(self, first_events: list[AgiEvent]) -> None:
        """Apply events that arrived with the environment, then read in the background."""
        try:
            for event in first_events:
                self._on_event(event)
        except AgiProtocolError as exc:
            log.warning("protocol error from Asterisk: %s", exc)
            self._broken = exc
            return
        self._reader_task = asyncio.create_task(self._read_loop(), name="agi-reader")

    async def close(self) -> None:
        """Stop the reader and close the socket (idempotent)."""
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(AgiHangup("session closed"))
        await close_writer(self._writer)

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
        one lock and one deadline of ``command_timeout_s`` per command: the cheap path
        for a handler that sets many variables. Errors as for :meth:`command`."""
        replies: list[AgiReply] = []
        if not lines:
            return replies
        async with self._lock:
            self._check_usable()
            try:
                async with asyncio.timeout(self.command_timeout_s * len(lines)):
                    for data in lines:
                        reply = await self._roundtrip(data)
                        replies.append(reply)
                        if reply.code == 511:
                            self._mark_hungup("511 reply")
                            break
            except TimeoutError as exc:
                self.timed_out = True
                sent = lines[len(replies)] if len(replies) < len(lines) else b""
                self._broken = AgiProtocolError(
                    f"no reply within {self.command_timeout_s}s to {sent[:60]!r}"
                )
                raise self._broken from exc
            except (ConnectionError, RuntimeError) as exc:
                self._eof = self.hungup = True
                raise AgiHangup(f"connection lost while sending: {exc}") from exc
            finally:
                self._pending = None
        return replies

    async def _roundtrip(self, data: bytes) -> AgiReply:
        future: asyncio.Future[AgiReply] = asyncio.get_running_loop().create_future()
        self._pending = future
        self._writer.write(data)
        if self._writer.transport.get_write_buffer_size():
            await self._writer.drain()
        return await future

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

    # -- internals -----------------------------------------------------------------------------

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

    def _on_event(self, event: AgiEvent) -> None:
        if isinstance(event, HangupNotice):
            self._mark_hungup("HANGUP line")
        elif isinstance(event, EndOfStream):
            self._eof = True
            self._mark_hungup("connection closed")
            self._fail_pending(AgiHangup("Asterisk closed the connection"))
        elif isinstance(event, AgiReply):
            if self._pending is None or self._pending.done():
                raise AgiProtocolError(f"reply without a command: {event.text[:80]!r}")
            self._pending.set_result(event)

    def _fail_pending(self, exc: AgiProtocolError) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(exc)

    async def _read_loop(self) -> None:
        try:
            while not self._eof:
                data = await self._reader.read(READ_CHUNK)
                events = self._parser.feed(data) if data else self._parser.feed_eof()
                for event in events:
                    self._on_event(event)
        except AgiProtocolError as exc:
            log.warning("protocol error from Asterisk: %s", exc)
            self._broken = exc
            self._fail_pending(exc)
        except ConnectionError as exc:
            self._eof = True
            self._mark_hungup(f"connection error: {exc}")
            self._fail_pending(AgiHangup(str(exc)))


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a stream, waiting briefly for the transport; never raises."""
    writer.close()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await writer.wait_closed()


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
        self._sessions: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None

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
        return len(self._sessions)

    async def start(self) -> None:
        """Bind and start accepting connections."""
        self._stopped.clear()
        self._server = await asyncio.start_server(
            self._on_connect,
            self.settings.host,
            self.settings.port,
            limit=self.settings.max_line_bytes * 2,
            backlog=max(128, self.settings.max_sessions),
        )
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
        if self._sessions:
            log.info("stopping: waiting up to %.1fs for %d sessions", grace, len(self._sessions))
            _, late = await asyncio.wait(set(self._sessions), timeout=grace)
            for task in late:
                task.cancel()
            if late:
                log.warning("stopping: cancelled %d sessions after the grace period", len(late))
                await asyncio.wait(late, timeout=CLOSE_TIMEOUT_S)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
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

    # -- per connection ------------------------------------------------------------------------

    async def _on_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._sessions) >= self.settings.max_sessions:
            AGI_REJECTED.inc()
            log.warning(
                "refused a FastAGI connection: %d sessions in flight (max_sessions)",
                len(self._sessions),
            )
            await close_writer(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        AGI_ACTIVE.inc()
        try:
            outcome = await self._serve(reader, writer)
        except asyncio.CancelledError:
            AGI_SESSIONS.labels(outcome="cancelled").inc()
            raise
        else:
            AGI_SESSIONS.labels(outcome=outcome).inc()
        finally:
            AGI_ACTIVE.dec()
            self._sessions.discard(task)
            await close_writer(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
        parser = AgiParser(
            max_env_bytes=self.settings.max_env_bytes,
            max_env_lines=self.settings.max_env_lines,
            max_line_bytes=self.settings.max_line_bytes,
        )
        try:
            env, extra = await self._read_environment(reader, parser)
        except AgiProtocolError as exc:
            log.warning("bad FastAGI connection: %s", exc)
            return "bad_environment"
        with bind_call(env.uniqueid or "-"):
            handler = self._routes.get(env.script)
            if handler is None:
                log.warning("unknown AGI script %r: closing (the dialplan falls back)", env.script)
                return "unknown_script"
            session = AgiSession(
                env,
                reader,
                writer,
                parser,
                command_timeout_s=self.settings.command_timeout_s,
                started_at=time.monotonic(),
            )
            try:
                session.start_reading(extra)
                return await self._run_handler(handler, session)
            finally:
                await session.close()

    async def _read_environment(
        self, reader: asyncio.StreamReader, parser: AgiParser
    ) -> tuple[AgiEnvironment, list[AgiEvent]]:
        try:
            async with asyncio.timeout(self.settings.env_timeout_s):
                while True:
                    data = await reader.read(READ_CHUNK)
                    events = parser.feed(data) if data else parser.feed_eof()
                    if events and isinstance(events[0], AgiEnvironment):
                        return events[0], events[1:]
        except TimeoutError as exc:
            raise AgiProtocolError(
                f"no complete environment within {self.settings.env_timeout_s}s"
            ) from exc
        except ConnectionError as exc:
            raise AgiProtocolError(f"connection lost while reading the environment: {exc}") from exc

    async def _run_handler(self, handler: Handler, session: AgiSession) -> str:
        try:
            await handler(session)
        except AgiHangup as exc:
            log.info("session ended by hangup: %s", exc)
            return "hangup"
        except AgiProtocolError as exc:
            log.warning("session failed: %s", exc)
            return "timeout" if session.timed_out else "protocol_error"
        except Exception:
            log.exception("route handler failed (the dialplan falls back)")
            return "handler_error"
        return "ok"
