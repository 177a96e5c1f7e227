"""The Asterisk Manager Interface wire protocol, without I/O.

Bytes in, :class:`Message` objects out (:class:`AmiParser`); actions in, bytes out
(:func:`build_action`). Framing, as Asterisk 22 writes it on the socket:

* one banner line, ``Asterisk Call Manager/11.0.0`` (no blank line after it);
* then messages: ``Key: Value`` lines ended by CRLF, a message ended by a blank line.
  Values may be empty (``AccountCode: ``), keys may repeat (``ChanVariable``).

Bare LF line ends are tolerated. A malformed or oversized message is counted in
``AMI_BAD_MESSAGES{reason}`` and skipped; the parser resynchronises at the next
blank line and never raises on input. End of stream is explicit: :meth:`AmiParser.feed_eof`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from router.errors import AmiProtocolError
from router.metrics import AMI_BAD_MESSAGES, AMI_EVENTS

#: Reasons a message is skipped (label values of AMI_BAD_MESSAGES).
REASON_TOO_LARGE = "too_large"
REASON_LINE_TOO_LONG = "line_too_long"
REASON_MALFORMED = "malformed"
REASON_NO_TYPE = "no_type"
REASON_TRUNCATED = "truncated"
REASON_BANNER = "banner"


class Message:
    """One AMI message: an event, a response, or (on the peer side) an action.

    ``headers`` maps each key to its first value; ``repeats`` holds every value of
    keys that occur more than once (see :meth:`getall`).
    """

    __slots__ = ("action", "action_id", "event", "headers", "repeats", "response")

    def __init__(
        self, headers: dict[str, str], repeats: dict[str, list[str]] | None = None
    ) -> None:
        self.headers = headers
        self.repeats = repeats
        self.event: str | None = headers.get("Event")
        self.response: str | None = headers.get("Response")
        self.action: str | None = headers.get("Action")
        self.action_id: str | None = headers.get("ActionID")

    def get(self, key: str, default: str | None = None) -> str | None:
        """The (first) value of header ``key``."""
        return self.headers.get(key, default)

    def __getitem__(self, key: str) -> str:
        return self.headers[key]

    def __contains__(self, key: object) -> bool:
        return key in self.headers

    def getall(self, key: str) -> list[str]:
        """Every value of header ``key``, in order (empty when absent)."""
        if self.repeats is not None and key in self.repeats:
            return list(self.repeats[key])
        value = self.headers.get(key)
        return [] if value is None else [value]

    @property
    def is_list_end(self) -> bool:
        """True for the event closing an event list (``EventList: Complete``)."""
        return self.headers.get("EventList", "").lower() == "complete"

    @property
    def is_list_start(self) -> bool:
        """True for a response announcing an event list (``EventList: start``)."""
        return self.headers.get("EventList", "").lower() == "start"

    def __repr__(self) -> str:
        kind = self.event or self.response or self.action
        return f"Message({kind!r}, action_id={self.action_id!r}, {len(self.headers)} headers)"


def parse_block(text: str, max_line: int) -> Message | str:
    """Parse one message (LF separated lines, no trailing blank line).

    Returns the Message, or the reason (a string) it must be skipped.
    """
    lines = text.split("\n")
    if len(text) > max_line and any(len(line) > max_line for line in lines):
        return REASON_LINE_TOO_LONG
    try:
        headers = dict(line.split(": ", 1) for line in lines)
    except ValueError:
        return _parse_slow(lines)
    if len(headers) != len(lines):
        return _parse_slow(lines)
    if "Event" not in headers and "Response" not in headers and "Action" not in headers:
        return REASON_NO_TYPE
    return Message(headers)


def _parse_slow(lines: list[str]) -> Message | str:
    """Line by line: tolerate ``Key:`` without a space, collect repeated keys."""
    headers: dict[str, str] = {}
    repeats: dict[str, list[str]] | None = None
    for raw in lines:
        line = raw.rstrip("\r")
        key, sep, value = line.partition(":")
        if not sep or not key or key != key.strip() or "\x00" in key:
            return REASON_MALFORMED
        value = value[1:] if value.startswith(" ") else value
        if key in headers:
            if repeats is None:
                repeats = {}
            repeats.setdefault(key, [headers[key]]).append(value)
        else:
            headers[key] = value
    if "Event" not in headers and "Response" not in headers and "Action" not in headers:
        return REASON_NO_TYPE
    return Message(headers, repeats)


class AmiParser:
    """Incremental AMI parser: ``feed(bytes) -> list[Message]``, ``feed_eof()``.

    ``expect_banner`` is True on the client side (Asterisk sends the banner line
    first) and False on the server side. ``banner`` holds the banner once read.
    """

    def __init__(
        self,
        *,
        max_message_bytes: int = 65536,
        max_line_bytes: int = 8192,
        expect_banner: bool = True,
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_line_bytes = max_line_bytes
        self.banner: str | None = None
        self._need_banner = expect_banner
        self._buf = b""
        self._held_cr = False
        self._skipping = False
        self._eof = False
        self.bad_messages = 0
        self.messages = 0

    def _bad(self, reason: str) -> None:
        self.bad_messages += 1
        AMI_BAD_MESSAGES.labels(reason=reason).inc()

    def _normalise(self, data: bytes) -> bytes:
        """CRLF -> LF; a CR at the very end is held back until the next chunk."""
        if self._held_cr:
            data = b"\r" + data
            self._held_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._held_cr = True
        return data.replace(b"\r\n", b"\n") if b"\r" in data else data

    def feed(self, data: bytes) -> list[Message]:
        """Consume ``data``; return the messages completed by it, in order."""
        if self._eof:
            raise AmiProtocolError("data fed after end of stream")
        if not data:
            return []
        buf = self._buf + self._normalise(data)
        if self._need_banner:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > self.max_line_bytes:
                    self._bad(REASON_BANNER)
                    self._need_banner = False
                    self._skipping = True
                    buf = b""
                self._buf = buf
                return []
            self.banner = buf[:nl].decode("utf-8", "replace").strip()
            self._need_banner = False
            buf = buf[nl + 1 :]
        if self._skipping:
            end = buf.find(b"\n\n")
            if end < 0:
                # keep a trailing LF: it may start the blank line
                self._buf = b"\n" if buf.endswith(b"\n") else b""
                return []
            self._skipping = False
            buf = buf[end + 2 :]
        parts = buf.split(b"\n\n")
        rest = parts.pop()
        if len(rest) > self.max_message_bytes:
            self._bad(REASON_TOO_LARGE)
            self._skipping = True
            rest = b"\n" if rest.endswith(b"\n") else b""
        self._buf = rest
        return self._decode(parts)

    def _decode(self, parts: Iterable[bytes]) -> list[Message]:
        out: list[Message] = []
        max_msg = self.max_message_bytes
        max_line = self.max_line_bytes
        for part in parts:
            if not part:
                continue  # extra blank lines between messages
            if part[0] == 10:  # leading LF (three line ends in a row)
                part = part.lstrip(b"\n")
                if not part:
                    continue
            if len(part) > max_msg:
                self._bad(REASON_TOO_LARGE)
                continue
            result = parse_block(part.decode("utf-8", "replace"), max_line)
            if isinstance(result, str):
                self._bad(result)
            else:
                out.append(result)
        if out:
            self.messages += len(out)
            AMI_EVENTS.inc(len(out))
        return out

    def feed_eof(self) -> list[Message]:
        """The stream ended. A partial message left over is counted as truncated."""
        if self._eof:
            return []
        self._eof = True
        rest = self._buf.strip(b"\n")
        self._buf = b""
        if rest and not self._skipping:
            self._bad(REASON_TRUNCATED)
        return []

    @property
    def at_eof(self) -> bool:
        """True once :meth:`feed_eof` was called."""
        return self._eof


FieldValue = str | int | float | Iterable[str]


def _check(text: str, what: str) -> str:
    if "\r" in text or "\n" in text:
        raise AmiProtocolError(f"{what} contains CR or LF: {text[:40]!r}")
    return text


def build_action(
    name: str,
    action_id: str,
    fields: Mapping[str, FieldValue] | None = None,
    **kwargs: FieldValue,
) -> bytes:
    """Encode an action: ``Action: name``, ``ActionID``, then each field.

    A field whose value is a list/tuple becomes one line per item (``Variable``).
    CR or LF in a name, key or value raises :class:`AmiProtocolError` (no header
    injection).
    """
    lines = [f"Action: {_check(name, 'action name')}", f"ActionID: {_check(action_id, 'ActionID')}"]
    items = dict(fields or {})
    items.update(kwargs)
    for key, value in items.items():
        _check(key, "field name")
        if ":" in key or not key:
            raise AmiProtocolError(f"invalid field name {key!r}")
        values = [value] if isinstance(value, str | int | float) else list(value)
        for item in values:
            lines.append(f"{key}: {_check(str(item), f'value of {key}')}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def encode_message(headers: Iterable[tuple[str, str]]) -> bytes:
    """Encode a response or event (peer side) from ``(key, value)`` pairs."""
    lines = [f"{_check(k, 'key')}: {_check(v, f'value of {k}')}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")
