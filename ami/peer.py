"""An Asterisk-side AMI test peer: replays a recorded AMI session to a client.

:class:`AmiPeer` listens on 127.0.0.1 (port 0 by default), sends the banner, checks
``Login`` like Asterisk (``Response: Error`` / ``Message: Authentication failed``, then
closes), and once logged in replays the events of a ``.raw`` recording byte for byte,
at full speed or paced, optionally dropping the connection after N events (and
skipping the events that "happened" while the client was away) to test reconnects.
It answers ``Ping``, ``CoreShowChannels`` (the channels alive at the current point
of the recording), ``QueueStatus`` (the recording's own answer), ``Getvar`` of
``STRFTIME(,,%z)`` (the recording Asterisk's UTC offset, ``+0000``), ``Logoff``. Each
action received is kept in :attr:`AmiPeer.actions`.

Usage::

    async with AmiPeer(path) as peer:   # user callroute, as examples/config.yaml logs in
        ... connect to peer.host, peer.port ...
        await peer.wait_replayed()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ami.protocol import AmiParser, Message, encode_message, parse_block

log = logging.getLogger(__name__)

BANNER = b"Asterisk Call Manager/11.0.0"
#: Snapshot fields of a channel, in the order Asterisk writes them.
_CHANNEL_FIELDS = (
    "Channel", "ChannelState", "ChannelStateDesc", "CallerIDNum", "CallerIDName",
    "ConnectedLineNum", "ConnectedLineName", "Language", "AccountCode", "Context", "Exten",
    "Priority", "Uniqueid", "Linkedid",
)


@dataclass
class Recording:
    """A recorded AMI session split into its parts."""

    banner: bytes
    #: Every asynchronous event, as the exact bytes of its block (without the blank line).
    events: list[bytes]
    #: The parsed form of each event, same order.
    parsed: list[Message]
    #: The recording's own QueueStatus answer: response then list events (parsed).
    queue_status: list[Message] = field(default_factory=list)

    @classmethod
    def load(cls, source: bytes | str | Path) -> Recording:
        """Split a ``.raw`` file (or its bytes) into banner, events and list answers."""
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        banner, _, rest = data.partition(b"\r\n")
        events: list[bytes] = []
        parsed: list[Message] = []
        lists: dict[str, list[Message]] = {}
        list_ids: set[str] = set()
        for block in rest.split(b"\r\n\r\n"):
            if not block.strip():
                continue
            msg = parse_block(block.decode("utf-8", "replace").replace("\r\n", "\n"), 1 << 20)
            if isinstance(msg, str):
                continue
            if msg.response is not None:
                if msg.is_list_start and msg.action_id:
                    list_ids.add(msg.action_id)
                    lists[msg.action_id] = [msg]
                continue
            if msg.action_id in list_ids:
                lists[msg.action_id or ""].append(msg)
                continue
            events.append(block)
            parsed.append(msg)
        queue_status: list[Message] = []
        for items in lists.values():
            if any(m.event == "QueueStatusComplete" for m in items):
                queue_status = items
        return cls(banner=banner, events=events, parsed=parsed, queue_status=queue_status)


class AmiPeer:
    """A fake Asterisk AMI server replaying a :class:`Recording`.

    ``pace_s`` sleeps between events (0: full speed). ``drop_after`` closes the first
    logged-in connection after that many events were sent; ``gap_events`` events are
    then skipped (they happen while the client is away: the channel state still moves
    on). ``replay`` False: answer actions only.
    """

    def __init__(
        self,
        recording: Recording | bytes | str | Path | None = None,
        *,
        username: str = "callroute",
        secret: str = "change-me-to-a-long-random-string",  # noqa: S107 - the example's
        host: str = "127.0.0.1",
        port: int = 0,
        pace_s: float = 0.0,
        drop_after: int | None = None,
        gap_events: int = 0,
        replay: bool = True,
        utc_offset: str = "+0000",
    ) -> None:
        if recording is None:
            self.recording = Recording(banner=BANNER, events=[], parsed=[])
        elif isinstance(recording, Recording):
            self.recording = recording
        else:
            self.recording = Recording.load(recording)
        self.username = username
        self.secret = secret
        self._host = host
        self._port = port
        self.pace_s = pace_s
        self.drop_after = drop_after
        self.gap_events = gap_events
        self.replay = replay
        self.utc_offset = utc_offset
        self.position = 0
        self.actions: list[Message] = []
        self.connections = 0
        self.logins = 0
        self.failed_logins = 0
        self.drops = 0
        self._channels: dict[str, dict[str, str]] = {}
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._done = asyncio.Event()
        if not self.recording.events:
            self._done.set()

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen (on an ephemeral port unless one was given)."""
        self._server = await asyncio.start_server(self._serve, self._host, self._port)

    @property
    def host(self) -> str:
        """The listening address."""
        return self._host

    @property
    def port(self) -> int:
        """The listening port (the real one when started with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("peer not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> AmiPeer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def wait_replayed(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until every event of the recording was sent (or skipped)."""
        await asyncio.wait_for(self._done.wait(), timeout)

    async def disconnect_all(self) -> None:
        """Drop every client connection now (as if Asterisk restarted)."""
        for writer in list(self._writers):
            writer.transport.abort()

    @property
    def channels(self) -> dict[str, dict[str, str]]:
        """Channels alive at the current point of the recording (Uniqueid → snapshot)."""
        return dict(self._channels)

    # --- channel state --------------------------------------------------------------------
    def _advance(self) -> None:
        """The next event of the recording happens (sent or not)."""
        msg = self.recording.parsed[self.position]
        self.position += 1
        if self.position >= len(self.recording.events):
            self._done.set()
        uid = msg.get("Uniqueid")
        if not uid:
            return
        if msg.event == "Hangup":
            self._channels.pop(uid, None)
            return
        snap = self._channels.get(uid)
        if snap is None:
            if msg.event != "Newchannel":
                return
            snap = self._channels[uid] = {"_created": str(time.monotonic())}
        for key in _CHANNEL_FIELDS:
            value = msg.get(key)
            if value is not None:
                snap[key] = value
        if msg.event == "Newexten":
            snap["Application"] = msg.get("Application") or ""
            snap["ApplicationData"] = msg.get("AppData") or ""

    # --- connections ----------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        replay: asyncio.Task[None] | None = None
        parser = AmiParser(expect_banner=False)
        try:
            writer.write(self.recording.banner + b"\r\n")
            logged_in = False
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                for action in parser.feed(data):
                    self.actions.append(action)
                    if not logged_in:
                        ok = self._login(action, writer)
                        if ok is None:
                            continue
                        if not ok:
                            await writer.drain()
                            return
                        logged_in = True
                        if self.replay and replay is None:
                            replay = asyncio.create_task(self._replay(writer))
                        continue
                    if not self._answer(action, writer):
                        await writer.drain()
                        return
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            if replay is not None:
                replay.cancel()
                await asyncio.gather(replay, return_exceptions=True)
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    def _login(self, action: Message, writer: asyncio.StreamWriter) -> bool | None:
        """Handle an action before login: True logged in, False refused (close), None other."""
        aid = action.action_id
        if (action.action or "").lower() != "login":
            writer.write(_reply("Error", aid, Message="Permission denied"))
            return None
        if action.get("Username") == self.username and action.get("Secret") == self.secret:
            self.logins += 1
            writer.write(_reply("Success", aid, Message="Authentication accepted"))
            return True
        self.failed_logins += 1
        writer.write(_reply("Error", aid, Message="Authentication failed"))
        return False

    def _answer(self, action: Message, writer: asyncio.StreamWriter) -> bool:
        """Answer one action of a logged-in client; False to close the connection."""
        name = (action.action or "").lower()
        aid = action.action_id
        if name == "ping":
            writer.write(_reply("Success", aid, Ping="Pong", Timestamp=f"{time.time():.6f}"))
        elif name == "logoff":
            writer.write(_reply("Goodbye", aid, Message="Thanks for all the fish."))
            return False
        elif name == "coreshowchannels":
            writer.write(self._core_show_channels(aid))
        elif name == "queuestatus":
            writer.write(self._queue_status(aid))
        elif name == "getvar" and action.get("Variable") == "STRFTIME(,,%z)":
            writer.write(_reply("Success", aid, Variable="STRFTIME(,,%z)",
                                Value=self.utc_offset))
        else:
            writer.write(_reply("Error", aid, Message="Invalid/unknown command"))
        return True

    def _core_show_channels(self, aid: str | None) -> bytes:
        out = [_reply("Success", aid, EventList="start", Message="Channels will follow")]
        now = time.monotonic()
        for snap in self._channels.values():
            pairs = [("Event", "CoreShowChannel")]
            if aid is not None:
                pairs.append(("ActionID", aid))
            pairs += [(k, snap[k]) for k in _CHANNEL_FIELDS if k in snap]
            pairs += [
                ("Application", snap.get("Application", "")),
                ("ApplicationData", snap.get("ApplicationData", "")),
                ("Duration", _duration(now - float(snap["_created"]))),
                ("BridgeId", ""),
            ]
            out.append(encode_message(pairs))
        tail = [("Event", "CoreShowChannelsComplete")]
        if aid is not None:
            tail.append(("ActionID", aid))
        tail += [("EventList", "Complete"), ("ListItems", str(len(self._channels)))]
        out.append(encode_message(tail))
        return b"".join(out)

    def _queue_status(self, aid: str | None) -> bytes:
        items = self.recording.queue_status
        if not items:
            items = [Message({"Response": "Success", "EventList": "start",
                              "Message": "Queue status will follow"}),
                     Message({"Event": "QueueStatusComplete", "EventList": "Complete",
                              "ListItems": "0"})]
        out = []
        for msg in items:
            pairs = [(k, v) for k, v in msg.headers.items() if k != "ActionID"]
            if aid is not None:
                # keep Asterisk's position of the header when the recording has one
                keys = list(msg.headers)
                pos = keys.index("ActionID") if "ActionID" in keys else 1
                pairs.insert(pos, ("ActionID", aid))
            out.append(encode_message(pairs))
        return b"".join(out)

    async def _replay(self, writer: asyncio.StreamWriter) -> None:
        sent = 0
        events = self.recording.events
        while self.position < len(events):
            if self.drop_after is not None and self.drops == 0 and sent >= self.drop_after:
                self.drops += 1
                await writer.drain()
                for _ in range(min(self.gap_events, len(events) - self.position)):
                    self._advance()
                writer.close()  # after what was written so far has gone out
                return
            writer.write(events[self.position] + b"\r\n\r\n")
            self._advance()
            sent += 1
            if self.pace_s > 0:
                await writer.drain()
                await asyncio.sleep(self.pace_s)
            elif sent % 64 == 0:
                await writer.drain()
        await writer.drain()


def _reply(response: str, action_id: str | None, **fields: str) -> bytes:
    pairs = [("Response", response)]
    if action_id is not None:
        pairs.append(("ActionID", action_id))
    pairs += list(fields.items())
    return encode_message(pairs)


def _duration(seconds: float) -> str:
    s = max(0, int(seconds))
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
