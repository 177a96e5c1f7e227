"""The AMI client: a thin asyncio adapter around :mod:`ami.protocol`.

It connects (with a timeout), reads the banner, logs in, correlates responses (and
event lists such as ``CoreShowChannels`` / ``QueueStatus``) by ``ActionID``, hands
every other event to ``on_event`` and to the :class:`~ami.tracker.CallTracker`,
pings periodically, and reconnects forever with capped exponential backoff and
jitter. After every (re)connect it rebuilds the view from ``QueueStatus`` and
``CoreShowChannels`` and tells the tracker, logging which calls may be incomplete, then
asks the server's UTC offset (``Getvar`` of ``STRFTIME(,,%z)``, for dating Cdr times).
An orderly :meth:`AmiClient.stop` logs off quietly: its own Logoff closing the
connection is not reported as a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ami.clock import parse_utc_offset
from ami.protocol import AmiParser, FieldValue, Message, build_action
from ami.tracker import CallTracker
from router.errors import AmiError
from router.metrics import AMI_CONNECTED, AMI_INCOMPLETE_CALLS, AMI_RECONNECTS
from router.settings import AmiSettings

log = logging.getLogger(__name__)

_READ_SIZE = 65536


@dataclass
class ActionResult:
    """An action's response and, for event lists, the list's events (without the end)."""

    response: Message
    events: list[Message] = field(default_factory=list)
    complete: Message | None = None

    @property
    def ok(self) -> bool:
        """True for ``Response: Success`` (or ``Goodbye``)."""
        return (self.response.response or "").lower() in ("success", "goodbye")


class _Pending:
    __slots__ = ("future", "on_complete", "result")

    def __init__(
        self, future: asyncio.Future[ActionResult],
        on_complete: Callable[[ActionResult], None] | None,
    ) -> None:
        self.future = future
        self.on_complete = on_complete
        self.result: ActionResult | None = None


async def reap(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` and wait for it, without swallowing our own cancellation."""
    if task is None or task.done():
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning
        return
    # A cancellation can be swallowed (e.g. by wait_for racing a completed inner future
    # on Python 3.11): cancel again until the task really ends.
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    await asyncio.gather(task, return_exceptions=True)


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter: in [cap/2, cap], cap = min(high, low*2^n)."""
    cap = min(high, low * (2 ** min(attempt, 30)))
    return rng.uniform(cap / 2, cap)


class AmiClient:
    """One AMI connection, kept up until :meth:`stop`.

    ``on_event`` receives every event that is not part of an action's answer;
    ``tracker`` (optional) also gets them, plus ``resync``/``mark_disconnected``/``flush``.
    Callables in :attr:`listeners` get each event after the tracker, each on its own (one
    that raises is logged and never keeps the event from the tracker or the others).
    """

    def __init__(
        self,
        settings: AmiSettings,
        on_event: Callable[[Message], None] | None = None,
        *,
        tracker: CallTracker | None = None,
        flush_interval_s: float = 0.1,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.on_event = on_event
        self.tracker = tracker
        self.flush_interval_s = flush_interval_s
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - reconnect jitter, not a secret
        self.connected = False
        self.logins = 0
        self.reconnects = 0
        self.last_error: str | None = None
        self.banner: str | None = None
        self._ids = itertools.count(1)
        self._pending: dict[str, _Pending] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._connected_event = asyncio.Event()
        self._failed_event = asyncio.Event()
        #: Extra consumers of every event (e.g. the screen pop), called after the tracker.
        self.listeners: list[Callable[[Message], None]] = []
        #: Told the channels alive (``CoreShowChannels``) after each (re)connect, after
        #: the tracker's own resync.
        self.resync_listeners: list[Callable[[list[Message]], object]] = []

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Start connecting in the background (returns at once)."""
        if self._run_task is not None:
            return
        self._stopping = False
        self._run_task = asyncio.create_task(self._run(), name="ami-client")
        if self.tracker is not None:
            self._flush_task = asyncio.create_task(self._flush_loop(), name="ami-flush")

    async def stop(self) -> None:
        """Log off (if connected), close the connection and stop reconnecting."""
        self._stopping = True
        if self.connected:
            with contextlib.suppress(Exception):
                await self.send_action("Logoff", timeout=0.5)
        if self._writer is not None:
            self._writer.close()  # the reader sees EOF even if a cancellation is lost
        for task in (self._run_task, self._flush_task):
            await reap(task)
        self._run_task = self._flush_task = None
        if self.tracker is not None:
            self.tracker.flush(self.clock())

    async def wait_connected(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until logged in and the view has been rebuilt."""
        async with asyncio.timeout(timeout):
            await self._connected_event.wait()

    async def first_outcome(self, timeout: float = 5.0) -> str | None:  # noqa: ASYNC109
        """Wait for the first connection attempt to settle: None once logged in (and the
        view rebuilt), else why it failed (``last_error``; "no answer" at ``timeout``).
        A refused connection or a rejected login answers at once, not at the timeout."""
        waits = [asyncio.ensure_future(self._connected_event.wait()),
                 asyncio.ensure_future(self._failed_event.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        if self._connected_event.is_set():
            return None
        return self.last_error or "no answer"

    # --- actions --------------------------------------------------------------------------
    async def send_action(
        self,
        name: str,
        fields: Mapping[str, FieldValue] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109
        on_complete: Callable[[ActionResult], None] | None = None,
        **kwargs: FieldValue,
    ) -> ActionResult:
        """Send an action and wait for its response (and its event list, if any).

        ``on_complete`` runs synchronously when the answer is complete, before any
        later event is dispatched. Raises :class:`AmiError` when not connected or
        when no answer comes within ``timeout`` (default ``action_timeout_s``).
        """
        writer = self._writer
        if writer is None or writer.is_closing():
            raise AmiError(f"cannot send {name}: the AMI connection is closed")
        action_id = f"callroute-{next(self._ids)}"
        data = build_action(name, action_id, fields, **kwargs)
        future: asyncio.Future[ActionResult] = asyncio.get_running_loop().create_future()
        self._pending[action_id] = _Pending(future, on_complete)
        try:
            writer.write(data)
            await writer.drain()
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
            # caller's cancellation when the answer lands at the same moment, and a
            # cancelled caller (e.g. serve's start-up check at shutdown) must stop here.
            async with asyncio.timeout(timeout or self.settings.action_timeout_s):
                return await asyncio.shield(future)
        except TimeoutError as exc:
            raise AmiError(f"no answer to AMI action {name} within the timeout") from exc
        except ConnectionError as exc:
            raise AmiError(f"AMI connection lost while sending {name}: {exc}") from exc
        finally:
            self._pending.pop(action_id, None)

    # --- dispatch -------------------------------------------------------------------------
    def _dispatch(self, msg: Message) -> None:
        aid = msg.action_id
        pending = self._pending.get(aid) if aid is not None else None
        if msg.event is not None:
            if pending is not None and pending.result is not None:
                if msg.is_list_end:
                    pending.result.complete = msg
                    self._resolve(pending)
                else:
                    pending.result.events.append(msg)
                return
            self._deliver(msg)
            return
        if pending is None or pending.result is not None:
            log.debug("AMI response for unknown ActionID %s ignored", aid)
            return
        pending.result = ActionResult(msg)
        if not (msg.is_list_start and (msg.response or "").lower() == "success"):
            self._resolve(pending)

    def _resolve(self, pending: _Pending) -> None:
        result = pending.result
        if result is None:
            return
        if pending.on_complete is not None:
            try:
                pending.on_complete(result)
            except Exception:
                log.exception("AMI action completion callback failed")
        if not pending.future.done():
            pending.future.set_result(result)

    def _deliver(self, msg: Message) -> None:
        try:
            if self.on_event is not None:
                self.on_event(msg)
            if self.tracker is not None:
                self.tracker.handle(msg)
        except Exception:
            log.exception("AMI event %s could not be processed; skipped", msg.event)
        for listener in self.listeners:
            try:
                listener(msg)
            except Exception:
                log.exception("AMI event listener failed on %s; skipped", msg.event)

    # --- connection loop ------------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while not self._stop_requested():
            try:
                await self._session()
            except AmiError as exc:
                self.last_error = str(exc)
                log.error("AMI %s:%s: %s", self.settings.host, self.settings.port, exc)
            except (OSError, TimeoutError) as exc:
                self.last_error = f"connection failed: {exc!r}"
                log.warning("AMI %s:%s unreachable: %r", self.settings.host,
                            self.settings.port, exc)
            finally:
                self._lost()
            if self.last_error is not None:
                self._failed_event.set()
            if self._stop_requested():
                break
            if self.last_error is None:
                attempt = 0
            delay = backoff_delay(
                attempt, self.settings.reconnect_min_s, self.settings.reconnect_max_s, self.rng
            )
            attempt += 1
            log.info("AMI reconnecting in %.2fs (attempt %d)", delay, attempt)
            await asyncio.sleep(delay)

    def _stop_requested(self) -> bool:
        return self._stopping

    def _fail_pending(self) -> None:
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(AmiError("AMI connection lost"))
                pending.future.exception()  # mark retrieved: the waiter may be gone

    def _lost(self) -> None:
        was_connected = self.connected
        self.connected = False
        self._connected_event.clear()
        AMI_CONNECTED.set(0)
        self._fail_pending()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        if was_connected and self.tracker is not None:
            calls = self.tracker.mark_disconnected()
            if calls and not self._stopping:
                log.warning("AMI connection lost with %d call(s) in progress, which may miss "
                            "events: %s", len(calls), ", ".join(calls))

    async def _session(self) -> None:
        s = self.settings
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(s.host, s.port), s.connect_timeout_s
        )
        self._writer = writer
        parser = AmiParser(max_message_bytes=s.max_message_bytes, max_line_bytes=s.max_line_bytes)
        banner_seen = asyncio.Event()
        reading = asyncio.create_task(self._read(reader, parser, banner_seen))
        pinging: asyncio.Task[None] | None = None
        try:
            await self._handshake(parser, banner_seen, reading)
            pinging = asyncio.create_task(self._ping_loop())
            await reading
        finally:
            writer.close()  # first: nothing below may skip it
            await reap(pinging)
            await reap(reading)
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handshake(
        self, parser: AmiParser, banner_seen: asyncio.Event, reading: asyncio.Task[None]
    ) -> None:
        s = self.settings
        waiter = asyncio.create_task(banner_seen.wait())
        done, _ = await asyncio.wait({waiter, reading}, timeout=s.connect_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            await reap(waiter)
            raise AmiError("no AMI banner from the server")
        self.banner = parser.banner
        if not (parser.banner or "").startswith("Asterisk Call Manager"):
            raise AmiError(f"not an AMI server (banner {parser.banner!r})")
        result = await self.send_action("Login", Username=s.username,
                                        Secret=s.secret.get_secret_value())
        if not result.ok:
            raise AmiError(
                f"AMI login as {s.username!r} rejected: {result.response.get('Message')}"
            )
        self.last_error = None
        self.connected = True
        self.logins += 1
        AMI_CONNECTED.set(1)
        if self.logins > 1:
            self.reconnects += 1
            AMI_RECONNECTS.inc()
        log.info("AMI logged in to %s:%s as %s (%s)", s.host, s.port, s.username, parser.banner)
        await self._rebuild()
        self._connected_event.set()

    async def _learn_offset(self) -> None:
        """Tell the tracker the server's UTC offset (Getvar needs write=reporting)."""
        if self.tracker is None:
            return
        try:
            result = await self.send_action("Getvar", Variable="STRFTIME(,,%z)")
        except AmiError as exc:
            log.info("AMI Getvar of the server's UTC offset failed: %s", exc)
            return
        offset = parse_utc_offset(result.response.get("Value")) if result.ok else None
        if offset is None:
            log.info("AMI: the server's UTC offset is unknown (%s); Cdr times are dated by "
                     "each call's Uniqueid", result.response.get("Message") or "no value")
        self.tracker.set_server_offset(offset)

    async def _rebuild(self) -> None:
        """Ask for QueueStatus then CoreShowChannels and resync the tracker; then the
        server's UTC offset."""
        queue = await self.send_action("QueueStatus")
        queue_events = queue.events if queue.ok else []

        def apply(result: ActionResult) -> None:
            if self.tracker is None:
                return
            affected = self.tracker.resync(result.events if result.ok else [], queue_events)
            if affected:
                AMI_INCOMPLETE_CALLS.inc(len(affected))
                log.warning("AMI %s: %d call(s) may be incomplete (events missed): %s",
                            "reconnected" if self.logins > 1 else "connected",
                            len(affected), ", ".join(affected))

        def apply_all(result: ActionResult) -> None:
            apply(result)
            for listener in self.resync_listeners:
                try:
                    listener(result.events if result.ok else [])
                except Exception:
                    log.exception("AMI resync listener failed")

        await self.send_action("CoreShowChannels", on_complete=apply_all)
        await self._learn_offset()

    async def _read(
        self, reader: asyncio.StreamReader, parser: AmiParser, banner_seen: asyncio.Event
    ) -> None:
        while True:
            try:
                data = await reader.read(_READ_SIZE)
            except ConnectionError as exc:
                log.warning("AMI read failed: %r", exc)
                data = b""
            if not data:
                parser.feed_eof()
                self._writer = None  # no new action may wait on a dead connection
                self._fail_pending()
                if self.connected and not self._stopping:
                    log.warning("AMI connection closed by %s:%s", self.settings.host,
                                self.settings.port)
                return
            for msg in parser.feed(data):
                self._dispatch(msg)
            if parser.banner is not None and not banner_seen.is_set():
                banner_seen.set()
            # StreamReader.read() returns without suspending while data is buffered: on a
            # busy AMI link this loop would otherwise keep the event loop from the FastAGI
            # sessions (and from our own handshake) for as long as Asterisk keeps talking.
            await asyncio.sleep(0)

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ping_interval_s)
            try:
                await self.send_action("Ping")
            except AmiError as exc:
                log.warning("AMI ping failed (%s): closing the connection", exc)
                if self._writer is not None:
                    self._writer.transport.abort()
                return

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            if self.tracker is not None:
                try:
                    self.tracker.flush(self.clock())
                except Exception:
                    log.exception("tracker flush failed")
