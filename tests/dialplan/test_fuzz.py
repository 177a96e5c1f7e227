"""Property tests: the AGI parser and the command builders under arbitrary input."""

from __future__ import annotations

import itertools
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from dialplan import protocol
from dialplan.peer import build_environment
from dialplan.protocol import AgiParser, parse_args, parse_reply_line
from router.errors import AgiProtocolError

LIMITS = {"max_env_bytes": 1024, "max_env_lines": 16, "max_line_bytes": 256}
ENV = build_environment("13900139000", "Han Meimei", "4008001000")

FRAGMENTS = st.one_of(
    st.sampled_from([
        b"agi_uniqueid: 1.2\n", b"agi_network_script: route?did=1\n", b"\n", b"\r\n",
        b"200 result=1\n", b"200 result=1 (a (b) c)\n", b"200 result=-1\r\n", b"HANGUP\n",
        b"100 result=0 Trying...\n", b"510 Invalid or unknown command\n",
        b"520-Invalid command syntax.  Proper usage follows:\n", b"520 End of proper usage.\n",
        b"511 Command Not Permitted on a dead channel\n", b"\xff\xfe", b"x" * 300,
    ]),
    st.binary(max_size=40),
)
STREAMS = st.one_of(
    st.binary(max_size=3000),
    st.lists(FRAGMENTS, max_size=40).map(b"".join),
    st.lists(FRAGMENTS, max_size=20).map(lambda parts: ENV[:600] + b"".join(parts)),
)


def outcome(chunks: list[bytes], eof: bool) -> tuple[str, list[object]]:
    """("ok"|"error", events) for one way of delivering the bytes."""
    parser = AgiParser(**LIMITS)
    events: list[object] = []
    try:
        for chunk in chunks:
            events.extend(parser.feed(chunk))
        if eof:
            events.extend(parser.feed_eof())
    except AgiProtocolError:
        return "error", []
    return "ok", events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=300, deadline=None)
@given(data=STREAMS, cuts=st.lists(st.integers(min_value=0), max_size=30), eof=st.booleans())
def test_chunking_never_changes_the_result(data: bytes, cuts: list[int], eof: bool) -> None:
    """Any bytes, in any chunks, give the same events (or the same failure) as in one
    piece, raise nothing but AgiProtocolError, and are parsed quickly."""
    start = time.monotonic()
    whole = outcome([data], eof)
    chunked = outcome(split(data, cuts), eof)
    assert chunked == whole
    assert time.monotonic() - start < 0.5


@settings(max_examples=200, deadline=None)
@given(data=st.binary(min_size=1, max_size=2000))
def test_byte_at_a_time_equals_whole(data: bytes) -> None:
    """The extreme chunking, one byte per feed, agrees with a single feed."""
    stream = ENV + data
    assert outcome([stream[i : i + 1] for i in range(len(stream))], True) == outcome(
        [stream], True
    )


@settings(max_examples=300, deadline=None)
@given(line=st.text(max_size=200))
def test_reply_line_only_raises_protocol_errors(line: str) -> None:
    """parse_reply_line on any text returns a reply/None or raises AgiProtocolError."""
    try:
        reply = parse_reply_line(line)
    except AgiProtocolError:
        return
    assert reply is None or reply.code in (200, 510, 511, 520)


@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=300))
def test_any_value_is_one_command_that_round_trips(value: str) -> None:
    """Any text as a SET VARIABLE value or VERBOSE message is exactly one line and
    Asterisk's parse_args gives it back (CR/LF/NUL as spaces)."""
    for line, expected in (
        (protocol.set_variable("CRM_NAME", value), ["SET", "VARIABLE", "CRM_NAME"]),
        (protocol.verbose(value, 3), ["VERBOSE"]),
    ):
        assert line.count(b"\n") == 1
        assert line.endswith(b"\n")
        assert b"\x00" not in line
        assert b"\r" not in line
        text = line[:-1].decode("utf-8")
        cleaned = protocol.clean(value).encode("utf-8", "replace").decode("utf-8")
        tail = ["3"] if expected == ["VERBOSE"] else []
        assert parse_args(text) == [*expected, cleaned, *tail]


@settings(max_examples=200, deadline=None)
@given(words=st.lists(st.text(min_size=1, max_size=20), max_size=8))
def test_generic_command_arguments_round_trip(words: list[str]) -> None:
    """Every argument of the generic builder comes back as one argument."""
    line = protocol.command("EXEC", *words)
    cleaned = [protocol.clean(w).encode("utf-8", "replace").decode() for w in words]
    assert parse_args(line[:-1].decode()) == ["EXEC", *cleaned]
