"""The FastAGI protocol module: environment limits, EOF, replies, command escaping."""

from __future__ import annotations

import pytest

from dialplan import protocol
from dialplan.peer import build_environment
from dialplan.protocol import (
    MAX_COMMAND_BYTES,
    AgiEnvironment,
    AgiParser,
    AgiReply,
    EndOfStream,
    HangupNotice,
    parse_args,
)
from router.errors import AgiProtocolError

ENV = build_environment("13900139000", "Han Meimei", "4008001000", "1795338363.5")


def parsed(data: bytes, **limits: int) -> tuple[AgiParser, list[object]]:
    parser = AgiParser(**limits)
    return parser, list(parser.feed(data))


def replies(data: bytes) -> list[object]:
    """Events after a valid environment, then EOF."""
    parser = AgiParser()
    events = parser.feed(ENV + data)
    return [*events[1:], *parser.feed_eof()]


# --- environment ----------------------------------------------------------------------------


def test_environment_byte_by_byte_equals_whole() -> None:
    """Feeding the environment one byte at a time gives the same single event."""
    parser = AgiParser()
    events = [e for i in range(len(ENV)) for e in parser.feed(ENV[i : i + 1])]
    assert events == AgiParser().feed(ENV)
    assert isinstance(events[0], AgiEnvironment)
    assert parser.environment == events[0]


def test_crlf_environment() -> None:
    """CRLF line endings are read like LF ones (no stray CR in values)."""
    _, events = parsed(ENV.replace(b"\n", b"\r\n"))
    env = events[0]
    assert isinstance(env, AgiEnvironment)
    assert env.calleridname == "Han Meimei"
    assert env.get("accountcode") == ""
    assert env.query == {"did": "4008001000"}


def test_script_and_query_parsing() -> None:
    """script is the path without query or slashes; query is url-decoded."""
    data = b"agi_network_script: /route/?did=400%2B1&x=&y=a+b\n\n"
    env = AgiParser().feed(data)[0]
    assert isinstance(env, AgiEnvironment)
    assert env.script == "route"
    assert env.query == {"did": "400+1", "x": "", "y": "a b"}


def test_non_utf8_is_replaced_not_fatal() -> None:
    """Invalid UTF-8 in a value becomes U+FFFD instead of raising."""
    env = AgiParser().feed(b"agi_calleridname: Li \xff\xfeLei\nagi_uniqueid: 1.2\n\n")[0]
    assert isinstance(env, AgiEnvironment)
    assert env.calleridname == "Li \ufffd\ufffdLei"


@pytest.mark.parametrize(
    ("data", "limits", "message"),
    [
        (b"agi_x: " + b"a" * 300, {"max_line_bytes": 256}, "line longer than 256"),
        (b"agi_x: " + b"a" * 300 + b"\n\n", {"max_line_bytes": 256}, "line longer than 256"),
        (b"agi_x: aaaa\n" * 200, {"max_env_bytes": 1024}, "larger than 1024 bytes"),
        (b"agi_x: a\n" * 20, {"max_env_lines": 16}, "more than 16 lines"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {}, r"not an agi_\* environment line"),
        (b"\n", {}, "empty environment"),
    ],
)
def test_environment_limits(data: bytes, limits: dict[str, int], message: str) -> None:
    """Oversized lines, environments, too many lines and garbage raise AgiProtocolError."""
    parser = AgiParser(**limits)
    with pytest.raises(AgiProtocolError, match=message):
        parser.feed(data)
    with pytest.raises(AgiProtocolError, match=message):  # and it stays broken
        parser.feed(b"agi_y: 1\n\n")


def test_limit_is_hit_without_buffering_everything() -> None:
    """A 10 MB blob without newline fails at the first feed past the line limit."""
    parser = AgiParser(max_line_bytes=4096)
    parser.feed(b"a" * 4096)
    with pytest.raises(AgiProtocolError):
        parser.feed(b"a" * 10_000_000)


@pytest.mark.parametrize("cut", [0, 1, 50, len(ENV) - 1])
def test_eof_before_environment_complete(cut: int) -> None:
    """EOF before the blank line is a protocol error naming how far it got."""
    parser = AgiParser()
    parser.feed(ENV[:cut])
    with pytest.raises(AgiProtocolError, match="closed before the environment"):
        parser.feed_eof()


def test_eof_after_environment_and_twice() -> None:
    """EOF after the environment is a clean EndOfStream, reported once; feeding after
    EOF is an error."""
    parser = AgiParser()
    parser.feed(ENV)
    assert parser.feed_eof() == [EndOfStream()]
    assert parser.feed_eof() == []
    with pytest.raises(AgiProtocolError):
        parser.feed(b"200 result=1\n")


def test_eof_mid_reply_line() -> None:
    """EOF in the middle of a reply line is an error, not a silent end."""
    parser = AgiParser()
    parser.feed(ENV + b"200 res")
    with pytest.raises(AgiProtocolError, match="middle of a reply"):
        parser.feed_eof()


# --- replies --------------------------------------------------------------------------------


def test_200_replies() -> None:
    """200 replies give result and data; data keeps spaces and parentheses."""
    events = replies(
        b"200 result=1\n200 result=0\n200 result=-1\n"
        b"200 result=1 (Han (Mei) mei )\n200 result=1 ()\n200 result=0 endpos=1234\n"
    )
    assert events[:-1] == [
        AgiReply(200, 1, None, "200 result=1"),
        AgiReply(200, 0, None, "200 result=0"),
        AgiReply(200, -1, None, "200 result=-1"),
        AgiReply(200, 1, "Han (Mei) mei ", "200 result=1 (Han (Mei) mei )"),
        AgiReply(200, 1, "", "200 result=1 ()"),
        AgiReply(200, 0, None, "200 result=0 endpos=1234"),
    ]


def test_100_trying_is_intermediate() -> None:
    """A 100 line produces no event; the following 200 is the reply."""
    assert replies(b"100 result=0 Trying...\n200 result=1\n") == [
        AgiReply(200, 1, None, "200 result=1"),
        EndOfStream(),
    ]


def test_510_511() -> None:
    """510 and 511 are final replies without a result."""
    events = replies(
        b"510 Invalid or unknown command\n511 Command Not Permitted on a dead channel\n"
    )
    assert [(e.code, e.result) for e in events if isinstance(e, AgiReply)] == [
        (510, None), (511, None)
    ]


def test_520_multiline_usage() -> None:
    """A 520- usage block, in any chunking, becomes one reply holding every line."""
    block = (
        b"520-Invalid command syntax.  Proper usage follows:\n"
        b" Usage: SET VARIABLE <variablename> <value>\n"
        b"200 result=1 looks like a reply but is usage text\n"
        b"520 End of proper usage.\n"
    )
    parser = AgiParser()
    parser.feed(ENV)
    events = [e for i in range(0, len(block), 7) for e in parser.feed(block[i : i + 7])]
    assert len(events) == 1
    reply = events[0]
    assert isinstance(reply, AgiReply)
    assert reply.code == 520
    assert reply.text.splitlines()[1] == " Usage: SET VARIABLE <variablename> <value>"
    assert reply.text.endswith("520 End of proper usage.")


def test_520_block_is_bounded() -> None:
    """A usage block that never ends is cut off at max_usage_lines."""
    parser = AgiParser(max_usage_lines=10)
    parser.feed(ENV)
    with pytest.raises(AgiProtocolError, match="usage block"):
        parser.feed(b"520-x\n" + b"more\n" * 20)


def test_hangup_then_reply() -> None:
    """HANGUP is its own event and the reply after it is still delivered (session 04)."""
    assert replies(b"HANGUP\n200 result=1\n") == [
        HangupNotice(), AgiReply(200, 1, None, "200 result=1"), EndOfStream()
    ]


@pytest.mark.parametrize(
    "line", [b"hello\n", b"200 ok\n", b"200 result\n", b"404 nope\n", b"HANGUP now\n"]
)
def test_garbage_reply_lines(line: bytes) -> None:
    """Lines Asterisk never sends are protocol errors."""
    parser = AgiParser()
    parser.feed(ENV)
    with pytest.raises(AgiProtocolError):
        parser.feed(line)


def test_reply_line_limit() -> None:
    """The line limit also applies to replies."""
    parser = AgiParser(max_line_bytes=256)
    parser.feed(ENV)
    with pytest.raises(AgiProtocolError, match="line longer"):
        parser.feed(b"200 result=1 (" + b"x" * 300 + b")\n")


def test_huge_result_number_is_not_an_int() -> None:
    """A result of thousands of digits does not hit Python's int conversion limit."""
    (reply, _) = replies(b"200 result=" + b"9" * 4000 + b"\n")
    assert isinstance(reply, AgiReply)
    assert reply.result is None


# --- command builders -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        (protocol.set_variable("ROUTE_TARGET", "Local/7001@agents"),
         b'SET VARIABLE ROUTE_TARGET "Local/7001@agents"\n'),
        (protocol.set_variable("ROUTE_QUEUE", "vip"), b"SET VARIABLE ROUTE_QUEUE vip\n"),
        (protocol.set_variable("CRM_CUSTOMER_ID", "C-1001"),
         b'SET VARIABLE CRM_CUSTOMER_ID "C-1001"\n'),
        (protocol.set_variable("ROUTE_TARGET", ""), b'SET VARIABLE ROUTE_TARGET ""\n'),
        (protocol.get_variable("CALL_DID"), b"GET VARIABLE CALL_DID\n"),
        (protocol.get_full_variable("${CALLERID(name)}"),
         b"GET FULL VARIABLE ${CALLERID(name)}\n"),
        (protocol.get_full_variable("${A} ${B}"), b'GET FULL VARIABLE "${A} ${B}"\n'),
        (protocol.verbose("routing done", 1), b'VERBOSE "routing done" 1\n'),
        (protocol.noop("bad command test"), b"NOOP bad command test\n"),
        (protocol.noop(), b"NOOP\n"),
        (protocol.command("BOGUS COMMAND"), b"BOGUS COMMAND\n"),
        (protocol.command("EXEC", "Playback", "hello-world"),
         b'EXEC Playback "hello-world"\n'),
        (protocol.set_variable("CALLERID(name)", "Li Lei"),
         b'SET VARIABLE CALLERID(name) "Li Lei"\n'),
    ],
)
def test_builders_match_recorded_format(built: bytes, expected: bytes) -> None:
    """Builders give the recorded bytes: plain words bare, everything else quoted."""
    assert built == expected


INJECTIONS = [
    'Li Lei"\nEXEC System rm',
    "Li\\\" Lei",
    "trailing backslash\\",
    '"',
    '\\"\\\\"',
    "a\rEXEC Dial",
    "nul\x00EXEC Dial",
    "crlf\r\nSET VARIABLE ROUTE_TARGET evil",
    "tab\tand  spaces",
    "\u674e\u96f7 \U0001f600",
    "",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_is_one_command_that_round_trips(value: str) -> None:
    """A hostile value makes exactly one line whose 4th argument, split with
    Asterisk's parse_args rules, is the value with CR/LF/NUL turned into spaces."""
    line = protocol.set_variable("CRM_NAME", value)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert b"\r" not in line
    assert b"\x00" not in line
    args = parse_args(line[:-1].decode("utf-8"))
    assert args == ["SET", "VARIABLE", "CRM_NAME", protocol.clean(value)]


@pytest.mark.parametrize("value", INJECTIONS)
def test_verbose_and_expressions_round_trip(value: str) -> None:
    """VERBOSE messages and GET FULL VARIABLE expressions survive parse_args intact."""
    args = parse_args(protocol.verbose(value, 2)[:-1].decode())
    assert args == ["VERBOSE", protocol.clean(value), "2"]
    if value:
        expr = parse_args(protocol.get_full_variable(value)[:-1].decode())
        assert expr == ["GET", "FULL", "VARIABLE", protocol.clean(value)]


@pytest.mark.parametrize(
    "name", ["", "A B", "X\nEXEC", 'X"', "1ABC", "A;B", "A(b c)", "ÄB", "A)"]
)
def test_bad_variable_names_rejected(name: str) -> None:
    """Names outside the Asterisk variable charset are refused, never written."""
    with pytest.raises(AgiProtocolError, match="invalid variable name"):
        protocol.set_variable(name, "x")
    with pytest.raises(AgiProtocolError, match="invalid variable name"):
        protocol.get_variable(name)


@pytest.mark.parametrize("verb", ["", "exec", "EXEC\nNOOP", "A\"B", "SET  "])
def test_bad_verbs_rejected(verb: str) -> None:
    """The generic builder only takes upper-case word verbs."""
    with pytest.raises(AgiProtocolError):
        protocol.command(verb)


def test_long_value_truncated_to_asterisk_buffer() -> None:
    """A value too long for Asterisk's 2048-byte buffer is shortened so the line fits
    (else Asterisk would run the rest as a second command); or refused on request."""
    value = 'é"\\' * 2000
    line = protocol.set_variable("CRM_NAME", value)
    assert len(line) <= MAX_COMMAND_BYTES
    assert line.count(b"\n") == 1
    (_, _, _, kept) = parse_args(line[:-1].decode())
    assert value.startswith(kept)
    assert len(kept) > 500
    with pytest.raises(AgiProtocolError, match="exceeds"):
        protocol.set_variable("CRM_NAME", value, truncate=False)
    assert len(protocol.verbose("x" * 5000)) <= MAX_COMMAND_BYTES


def test_verbose_level_checked() -> None:
    """VERBOSE levels outside 1..4 are refused."""
    with pytest.raises(AgiProtocolError):
        protocol.verbose("x", 5)


@pytest.mark.parametrize(
    ("line", "args"),
    [
        ('SET VARIABLE X ""', ["SET", "VARIABLE", "X", ""]),
        ("a\\ b c", ["a b", "c"]),
        ('"a"b "c d"', ["ab", "c d"]),
        ('x"y z"', ["xy z"]),
        ("  lead\t\ttab  ", ["lead", "tab"]),
        ('"esc \\" q" \\\\', ['esc " q', "\\"]),
        ("trail\\", ["trail"]),
        ('open "quote never closed', ["open", "quote never closed"]),
    ],
)
def test_parse_args_follows_res_agi(line: str, args: list[str]) -> None:
    """parse_args reproduces res_agi.c's splitting, quirks included."""
    assert parse_args(line) == args


def test_parse_args_keeps_at_most_127_words() -> None:
    """Like Asterisk (MAX_ARGS 128), extra words are dropped."""
    assert len(parse_args(" ".join(["w"] * 200))) == 127


def test_ok_reply_fast_path_gives_the_same_events_as_the_full_parse() -> None:
    """A whole ``200 result=1`` line (the common reply) is the same event whether it comes
    alone, byte by byte, after half a line, or inside a 520 block, and it is never taken
    before the environment is complete."""
    whole = AgiParser()
    whole.feed(ENV)
    fast = whole.feed(b"200 result=1\n")
    split = AgiParser()
    split.feed(ENV)
    slow = [e for byte in b"200 result=1\n" for e in split.feed(bytes([byte]))]
    assert fast == slow == [AgiReply(200, 1, None, "200 result=1")]
    partial = AgiParser()
    partial.feed(ENV)
    assert partial.feed(b"200 resu") == []
    with pytest.raises(AgiProtocolError, match="malformed 200 reply"):
        partial.feed(b"200 result=1\n")  # completes the line "200 resu200 result=1"
    usage = AgiParser()
    usage.feed(ENV)
    assert usage.feed(b"520-Invalid command syntax.\n") == []
    assert usage.feed(b"200 result=1\n") == []  # a line of the usage block, not a reply
    (block,) = usage.feed(b"520 End of proper usage.\n")
    assert isinstance(block, AgiReply)
    assert block.code == 520
    assert "200 result=1" in block.text
    fresh = AgiParser()
    with pytest.raises(AgiProtocolError):
        fresh.feed(b"200 result=1\n")  # not an agi_* line: no shortcut before the env
