"""The FastAGI protocol, free of I/O: bytes in, events out; commands in, bytes out.

Like h11 under httpcore, nothing here touches a socket. :class:`AgiParser` is fed
whatever bytes Asterisk wrote and returns events (:class:`AgiEnvironment` once, then
:class:`AgiReply` and :class:`HangupNotice` lines, then :class:`EndOfStream`). The
command builders return the exact bytes to write.

Framing, as recorded from Asterisk 22.10.1 (``tests/fixtures/asterisk-22/agi``):

* Asterisk opens with ``agi_<name>: <value>`` lines ending in a blank line.
* Every command we write is one line; Asterisk answers ``200 result=<n> [(data)]``,
  ``510 Invalid or unknown command``, ``511 Command Not Permitted on a dead channel``,
  or a multi-line ``520-...`` usage block closed by ``520 End of proper usage.``;
  some commands first say ``100 result=0 Trying...``.
* When the caller hangs up, Asterisk writes ``HANGUP`` on its own, between replies,
  and still answers commands sent after it.

Quoting (how Asterisk's ``res_agi.c`` ``parse_args`` splits a command line): words are
separated by spaces or tabs; a double quote toggles quoting (and starts a new word,
possibly empty, after whitespace); a backslash makes the next character literal,
inside or outside quotes. Asterisk reads one line per command (``\\n`` ends it; a
NUL ends the C string) into a 2048-byte buffer, and a longer line is cut and its rest
read as a *second command*. So every value we write is:

1. cleaned: CR, LF and NUL become a space (they cannot be escaped);
2. written bare only when it is a plain word ``[A-Za-z0-9_]+``; otherwise wrapped in
   double quotes with ``\\`` and ``"`` escaped by a backslash. This reproduces the
   recordings byte for byte (``ROUTE_QUEUE vip`` bare; ``"Local/7001@agents"``,
   ``"C-1001"``, ``""`` and ``"routing done"`` quoted);
3. bounded: the whole line, newline included, fits in :data:`MAX_COMMAND_BYTES`
   (the value is shortened on a character boundary, or an error is raised).

Variable names are never quoted: they must match :data:`VARIABLE_NAME` (letters,
digits, underscore, optionally a dialplan function call such as ``CALLERID(name)``).
Expressions for ``GET FULL VARIABLE`` are written bare when they hold no whitespace,
quote or backslash (``${CALLERID(name)}`` as recorded), quoted otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Final
from urllib.parse import parse_qsl

from router.errors import AgiProtocolError

#: Asterisk's ``AGI_BUF_LEN`` is 2048; ``fgets`` keeps 2047 bytes, newline included.
MAX_COMMAND_BYTES: Final = 2047
#: Lines of a ``520-`` usage block we accept before calling it a protocol error.
MAX_USAGE_LINES: Final = 200

#: A variable name we write: ``NAME``, ``__INHERITED``, or ``FUNC(arg,arg)``.
VARIABLE_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\([A-Za-z0-9_,.:\-]*\))?")
_PLAIN_WORD = re.compile(r"[A-Za-z0-9_]+")
_BARE_EXPRESSION = re.compile(r'[^\s"\\\x00]+')
_VERB = re.compile(r"[A-Z][A-Z ]*[A-Z]|[A-Z]")
#: One environment line, ``agi_<name>: <value>`` (without its line end).
_ENV_PAIR = re.compile(r"^agi_([A-Za-z0-9_]+): ?(.*)$", re.MULTILINE)
_REPLY_200 = re.compile(r"200 result=(\S*)(?: (.*))?")
_INT = re.compile(r"-?\d{1,18}")
_UNSAFE = str.maketrans({"\r": " ", "\n": " ", "\x00": " "})


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AgiEnvironment:
    """The ``agi_*`` variables Asterisk sent first, with typed accessors.

    ``vars`` maps the names without the ``agi_`` prefix (``uniqueid``, ``callerid``...)
    to their values, decoded as UTF-8 with replacement characters for bad bytes.
    """

    vars: Mapping[str, str]

    def get(self, name: str, default: str = "") -> str:
        """The value of ``agi_<name>``, or ``default`` when Asterisk did not send it."""
        return self.vars.get(name, default)

    @property
    def uniqueid(self) -> str:
        """The channel's Uniqueid (``1795338333.1``), the call id in logs."""
        return self.get("uniqueid")

    @property
    def channel(self) -> str:
        """The channel name (``Local/4008001000@inbound-00000000;2``)."""
        return self.get("channel")

    @property
    def callerid(self) -> str:
        """The caller's number as Asterisk has it (``+8613800138000``, or ``unknown``)."""
        return self.get("callerid")

    @property
    def calleridname(self) -> str:
        """The caller's name; Asterisk sends ``unknown`` when it is withheld or missing."""
        return self.get("calleridname")

    @property
    def network_script(self) -> str:
        """``agi_network_script``: script path and query (``route?did=4008001000``)."""
        return self.get("network_script")

    @property
    def request(self) -> str:
        """The full AGI URI (``agi://127.0.0.1:4573/route?did=4008001000``)."""
        return self.get("request")

    @property
    def extension(self) -> str:
        """The dialplan extension the AGI ran at (the DID in the recordings)."""
        return self.get("extension")

    @property
    def context(self) -> str:
        """The dialplan context (``inbound``)."""
        return self.get("context")

    @property
    def dnid(self) -> str:
        """The dialed number id (``unknown`` on Local channels)."""
        return self.get("dnid")

    @property
    def language(self) -> str:
        """The channel language (``en``)."""
        return self.get("language")

    @property
    def version(self) -> str:
        """The Asterisk version (``22.10.1``)."""
        return self.get("version")

    @cached_property
    def script(self) -> str:
        """The script part of ``agi_network_script`` without the query (``route``)."""
        return self.network_script.partition("?")[0].strip("/")

    @cached_property
    def query(self) -> dict[str, str]:
        """The query string of ``agi_network_script`` as a dict (``{"did": "4008001000"}``),
        parsed once (do not modify it)."""
        query = self.network_script.partition("?")[2]
        return dict(parse_qsl(query, keep_blank_values=True))


@dataclass(frozen=True)
class AgiReply:
    """One final reply to a command.

    ``code`` is 200, 510, 511 or 520; ``result`` the ``result=`` number (None when the
    line has none); ``data`` the text in parentheses (``None`` when absent); ``text``
    the whole reply (all lines of a 520 block joined by ``\\n``).
    """

    code: int
    result: int | None
    data: str | None
    text: str

    @property
    def ok(self) -> bool:
        """True for a 200 reply."""
        return self.code == 200


@dataclass(frozen=True)
class HangupNotice:
    """The ``HANGUP`` line Asterisk writes by itself when the caller hangs up."""


@dataclass(frozen=True)
class EndOfStream:
    """Asterisk closed its side of the socket (after the environment was complete)."""


AgiEvent = AgiEnvironment | AgiReply | HangupNotice | EndOfStream


# --- the parser -----------------------------------------------------------------------------


class _Lines:
    """Splits bytes into ``\\n``-terminated lines with a hard per-line limit."""

    __slots__ = ("buffer", "max_line_bytes")

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self.buffer = b""

    def push(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the lines it completes, without ``\\n`` (``\\r`` kept).

        Raises :class:`AgiProtocolError` when a line (complete or not) is too long.
        """
        buffer = self.buffer + data if self.buffer else data
        end = buffer.rfind(b"\n")
        if end < 0:
            lines: list[bytes] = []
            self.buffer = buffer
        else:
            lines = buffer[:end].split(b"\n")
            self.buffer = buffer[end + 1 :]
            if max(map(len, lines)) > self.max_line_bytes:
                raise AgiProtocolError(f"line longer than {self.max_line_bytes} bytes")
        if len(self.buffer) > self.max_line_bytes:
            raise AgiProtocolError(f"line longer than {self.max_line_bytes} bytes")
        return lines

    @property
    def pending(self) -> int:
        return len(self.buffer)


def _bad_env_line(lines: list[bytes]) -> AgiProtocolError:
    """The error naming the first of ``lines`` that is not an ``agi_*`` line."""
    for line in lines:
        text = _text(line)
        if _ENV_PAIR.fullmatch(text) is None:
            return AgiProtocolError(f"not an agi_* environment line: {text[:80]!r}")
    return AgiProtocolError("not an agi_* environment")  # pragma: no cover - findall agrees


def _text(line: bytes) -> str:
    """A line as text: trailing CR dropped, bad UTF-8 replaced (never raises)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    return line.decode("utf-8", errors="replace")


class AgiParser:
    """The whole inbound side of one FastAGI session as a state machine.

    Feed it bytes with :meth:`feed` (any chunking gives the same events) and the end of
    the stream with :meth:`feed_eof`. It yields one :class:`AgiEnvironment`, then
    :class:`AgiReply` / :class:`HangupNotice` events, then :class:`EndOfStream`.
    Limits are hard: a line over ``max_line_bytes``, an environment over
    ``max_env_bytes`` or ``max_env_lines``, a garbage line, or EOF before the
    environment is complete raise :class:`AgiProtocolError`; once raised, the parser
    stays broken and raises the same error again.
    """

    def __init__(
        self,
        *,
        max_env_bytes: int = 16384,
        max_env_lines: int = 128,
        max_line_bytes: int = 4096,
        max_usage_lines: int = MAX_USAGE_LINES,
    ) -> None:
        self.max_env_bytes = max_env_bytes
        self.max_env_lines = max_env_lines
        self.max_usage_lines = max_usage_lines
        self._lines = _Lines(max_line_bytes)
        self._env: dict[str, str] = {}
        self._env_bytes = 0
        self._env_lines = 0
        self._environment: AgiEnvironment | None = None
        self._usage: list[str] | None = None
        self._error: AgiProtocolError | None = None
        self._eof = False

    @property
    def environment(self) -> AgiEnvironment | None:
        """The environment once complete, else None."""
        return self._environment

    def feed(self, data: bytes) -> list[AgiEvent]:
        """Take more bytes; return the events they complete."""
        if data == _OK_LINE and self._between_replies():
            return [_OK_REPLY]  # the answer to nearly every command, parsed once
        self._check_usable()
        if self._eof:
            raise self._fail(AgiProtocolError("data fed after end of stream"))
        events: list[AgiEvent] = []
        try:
            lines = self._lines.push(data)
            if self._environment is None:
                env, lines = self._env_lines_of(lines)
                if env is not None:
                    events.append(env)
            for line in lines:
                event = self._reply_line(_text(line))
                if event is not None:
                    events.append(event)
        except AgiProtocolError as exc:
            raise self._fail(exc) from None
        return events

    def feed_eof(self) -> list[AgiEvent]:
        """Asterisk closed the socket: return ``[EndOfStream()]`` or raise.

        Raises :class:`AgiProtocolError` when the environment, a line, or a 520 block
        was left incomplete.
        """
        self._check_usable()
        if self._eof:
            return []
        self._eof = True
        if self._environment is None:
            raise self._fail(
                AgiProtocolError(
                    f"connection closed before the environment was complete "
                    f"({self._env_lines} lines read)"
                )
            )
        if self._lines.pending or self._usage is not None:
            raise self._fail(AgiProtocolError("connection closed in the middle of a reply"))
        return [EndOfStream()]

    # -- internals ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._error is not None:
            raise self._error

    def _between_replies(self) -> bool:
        """The environment is done and no line or 520 block is half read."""
        return (self._environment is not None and not self._lines.buffer
                and self._usage is None and self._error is None and not self._eof)

    def _fail(self, exc: AgiProtocolError) -> AgiProtocolError:
        self._error = exc
        return exc

    def _env_lines_of(self, lines: list[bytes]) -> tuple[AgiEnvironment | None, list[bytes]]:
        """Take environment lines from ``lines``: the environment if the blank line that
        ends it is among them, and the lines after it.

        The lines are checked against the limits, decoded and matched as one block (one
        regex pass in C rather than a few calls per line: the environment is most of the
        bytes of a call); a line that does not match is then looked for, to name it."""
        end = next((i for i, line in enumerate(lines) if line in (b"", b"\r")), None)
        body = lines if end is None else lines[:end]
        self._env_bytes += sum(map(len, body)) + len(body) + (0 if end is None else 1)
        if self._env_bytes > self.max_env_bytes:
            raise AgiProtocolError(f"environment larger than {self.max_env_bytes} bytes")
        self._env_lines += len(body)
        if self._env_lines > self.max_env_lines:
            raise AgiProtocolError(f"environment has more than {self.max_env_lines} lines")
        if body:
            block = b"\n".join(body).decode("utf-8", errors="replace")
            if "\r" in block:  # CRLF line ends (Asterisk writes LF): drop one CR per line
                block = "\n".join(line[:-1] if line.endswith("\r") else line
                                  for line in block.split("\n"))
            pairs = _ENV_PAIR.findall(block)
            if len(pairs) != len(body):
                raise _bad_env_line(body)
            self._env.update(pairs)
        if end is None:
            return None, []
        if not self._env:
            raise AgiProtocolError("empty environment (blank line first)")
        self._environment = AgiEnvironment(vars=dict(self._env))
        return self._environment, lines[end + 1 :]

    def _reply_line(self, text: str) -> AgiEvent | None:
        if self._usage is not None:
            return self._usage_line(text)
        if text == "HANGUP":
            return HangupNotice()
        if text.startswith("520-"):
            self._usage = [text]
            return None
        return parse_reply_line(text)

    def _usage_line(self, text: str) -> AgiReply | None:
        assert self._usage is not None
        self._usage.append(text)
        if text.startswith("520 "):
            reply = AgiReply(code=520, result=None, data=None, text="\n".join(self._usage))
            self._usage = None
            return reply
        if len(self._usage) > self.max_usage_lines:
            raise AgiProtocolError(f"520 usage block longer than {self.max_usage_lines} lines")
        return None


@lru_cache(maxsize=256)
def parse_reply_line(text: str) -> AgiReply | None:
    """Parse one single-line reply; None for an intermediate ``100`` line.

    Raises :class:`AgiProtocolError` for anything that is not a reply Asterisk sends.
    Remembered for the last 256 lines (replies are immutable; most are ``200 result=1``).
    """
    if text.startswith("200 "):
        match = _REPLY_200.fullmatch(text)
        if match is None:
            raise AgiProtocolError(f"malformed 200 reply: {text[:80]!r}")
        raw = match.group(1)
        result = int(raw) if _INT.fullmatch(raw) else None
        return AgiReply(200, result, _paren_data(match.group(2)), text)
    if text.startswith("100 ") or text == "100":
        return None
    if text[:4] in ("510 ", "511 ", "520 "):
        return AgiReply(int(text[:3]), None, None, text)
    raise AgiProtocolError(f"not an AGI reply: {text[:80]!r}")


#: The reply to a successful ``SET VARIABLE`` (and most commands), and its event.
_OK_LINE: Final = b"200 result=1\n"
_OK_REPLY: Final = AgiReply(200, 1, None, "200 result=1")


def _paren_data(rest: str | None) -> str | None:
    """The value between the first ``(`` and the last ``)`` (it may hold both)."""
    if not rest or not rest.startswith("("):
        return None
    end = rest.rfind(")")
    return rest[1:end] if end > 0 else None


# --- command builders -----------------------------------------------------------------------


def clean(value: str) -> str:
    """``value`` with CR, LF and NUL replaced by spaces (they cannot be escaped)."""
    return value.translate(_UNSAFE)


def quote(value: str) -> str:
    """One AGI argument: bare if a plain ``[A-Za-z0-9_]+`` word, else quoted and escaped."""
    value = clean(value)
    if _PLAIN_WORD.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _expression(expr: str) -> str:
    expr = clean(expr)
    return expr if _BARE_EXPRESSION.fullmatch(expr) else quote(expr)


def check_variable_name(name: str) -> str:
    """Return ``name`` if it is a variable name we may write, else raise AgiProtocolError."""
    if not VARIABLE_NAME.fullmatch(name):
        raise AgiProtocolError(
            f"invalid variable name {name[:40]!r}: use letters, digits and _ "
            "(optionally FUNC(args))"
        )
    return name


def _line(words: list[str]) -> bytes:
    data = (" ".join(words) + "\n").encode("utf-8", errors="replace")
    if len(data) > MAX_COMMAND_BYTES:
        raise AgiProtocolError(
            f"command of {len(data)} bytes exceeds Asterisk's {MAX_COMMAND_BYTES}-byte line"
        )
    return data


def command(verb: str, *args: str) -> bytes:
    """A generic command: ``verb`` (upper-case words) then each arg through :func:`quote`."""
    if not _VERB.fullmatch(verb):
        raise AgiProtocolError(f"invalid AGI command verb {verb[:40]!r}")
    return _line([verb, *(quote(a) for a in args)])


def _fit(prefix: str, value: str, suffix: str = "") -> str:
    """``value`` shortened (by characters) so the quoted command line fits the limit."""
    budget = MAX_COMMAND_BYTES - len((prefix + suffix + "\n").encode("utf-8"))
    quoted = quote(value)
    if len(quoted.encode("utf-8", errors="replace")) <= budget:
        return quoted
    low, high = 0, len(value)
    while low < high:  # longest prefix whose quoted form fits
        mid = (low + high + 1) // 2
        if len(quote(value[:mid]).encode("utf-8", errors="replace")) <= budget:
            low = mid
        else:
            high = mid - 1
    return quote(value[:low])


@lru_cache(maxsize=4096)
def set_variable(name: str, value: str, *, truncate: bool = True) -> bytes:
    """``SET VARIABLE <name> <value>``; a value too long for one line is shortened
    (``truncate=True``) or refused with AgiProtocolError.

    Remembered for the last 4,096 (name, value) pairs: most calls set the same queue,
    rule and reason lines, and quoting is most of a call's command-building time."""
    prefix = f"SET VARIABLE {check_variable_name(name)} "
    arg = _fit(prefix, value) if truncate else quote(value)
    return _line([prefix + arg])


def get_variable(name: str) -> bytes:
    """``GET VARIABLE <name>``."""
    return _line(["GET VARIABLE", check_variable_name(name)])


def get_full_variable(expr: str) -> bytes:
    """``GET FULL VARIABLE <expr>``: Asterisk evaluates ``${...}`` expressions in it."""
    return _line(["GET FULL VARIABLE", _expression(expr)])


def verbose(message: str, level: int = 1) -> bytes:
    """``VERBOSE <message> <level>`` (level 1-4); a long message is shortened."""
    if not 1 <= level <= 4:
        raise AgiProtocolError(f"verbose level must be 1..4, not {level}")
    return _line([f"VERBOSE {_fit('VERBOSE ', message, f' {level}')} {level}"])


def noop(text: str = "") -> bytes:
    """``NOOP [words...]``: each whitespace-separated word of ``text`` quoted if needed."""
    return command("NOOP", *clean(text).split())


# --- Asterisk's own argument splitting (for the test peer and for tests) ----------------


def parse_args(line: str) -> list[str]:
    """Split a command line exactly as ``res_agi.c`` ``parse_args`` does.

    Whitespace (space, tab) separates words outside quotes; ``"`` toggles quoting and,
    after whitespace, starts a word (so ``""`` is an empty argument); ``\\`` makes the
    next character literal. Asterisk keeps at most 127 words.
    """
    args: list[str] = []
    current: list[str] | None = None
    quoted = escaped = False
    for char in line:
        if char == '"' and not escaped:
            quoted = not quoted
            if quoted and current is None:
                current = []
            continue
        if char in " \t" and not quoted and not escaped:
            if current is not None:
                args.append("".join(current))
                current = None
            continue
        if char == "\\" and not escaped:
            escaped = True
            continue
        if current is None:
            current = []
        current.append(char)
        escaped = False
    if current is not None:
        args.append("".join(current))
    return args[:127]
