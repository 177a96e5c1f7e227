"""The pure AMI protocol: framing, limits, resynchronisation, action encoding."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ami.protocol import AmiParser, Message, build_action
from router.errors import AmiProtocolError
from router.metrics import REGISTRY


def bad(reason: str) -> float:
    return REGISTRY.get_sample_value("callroute_ami_bad_messages_total", {"reason": reason}) or 0.0


def headers(messages: list[Message]) -> list[dict[str, str]]:
    return [m.headers for m in messages]


def test_recording_parses_completely(fixtures_dir: Path) -> None:
    """Every message of ami-basic.raw is read, with the banner, and nothing is rejected."""
    data = (fixtures_dir / "ami-basic.raw").read_bytes()
    parser = AmiParser()
    messages = parser.feed(data)
    parser.feed_eof()
    assert parser.banner == "Asterisk Call Manager/11.0.0"
    assert parser.bad_messages == 0
    assert len(messages) == data.count(b"\r\n\r\n")
    assert messages[0].response == "Success"
    assert messages[0].action_id == "login-1"
    assert messages[0]["Message"] == "Authentication accepted"
    assert messages[-1].response == "Goodbye"
    newchannel = messages[3]
    assert newchannel.event == "Newchannel"
    assert newchannel["AccountCode"] == ""
    assert newchannel["Linkedid"] == "1795338333.0"
    assert sum(m.event == "Cdr" for m in messages) == 17


def test_chunking_does_not_matter(fixtures_dir: Path) -> None:
    """Feeding the bytes in random chunk sizes (splitting CR from LF) gives the same messages."""
    data = (fixtures_dir / "ami-basic.raw").read_bytes()
    whole = AmiParser().feed(data)
    rng = random.Random(7)
    for _ in range(3):
        parser = AmiParser()
        out: list[Message] = []
        i = 0
        while i < len(data):
            n = rng.randint(1, 97)
            out += parser.feed(data[i : i + n])
            i += n
        assert headers(out) == headers(whole)


def test_bare_lf_and_missing_space_are_tolerated() -> None:
    """Bare LF line ends and ``Key:`` with no space after the colon still parse."""
    parser = AmiParser()
    out = parser.feed(b"Asterisk Call Manager/11.0.0\nEvent: Hangup\nCause:16\nCause-txt: x\n\n")
    assert parser.banner == "Asterisk Call Manager/11.0.0"
    assert headers(out) == [{"Event": "Hangup", "Cause": "16", "Cause-txt": "x"}]


def test_repeated_keys_are_all_kept() -> None:
    """A key that repeats (ChanVariable) keeps every value; ``headers`` has the first."""
    parser = AmiParser(expect_banner=False)
    (msg,) = parser.feed(b"Event: X\r\nChanVariable: A=1\r\nChanVariable: B=2\r\n\r\n")
    assert msg["ChanVariable"] == "A=1"
    assert msg.getall("ChanVariable") == ["A=1", "B=2"]
    assert msg.getall("Missing") == []


def test_oversized_message_is_counted_skipped_and_parser_resyncs() -> None:
    """A message over max_message_bytes, even split over many chunks, is skipped; the next
    message is read normally."""
    before = bad("too_large")
    parser = AmiParser(max_message_bytes=1024, expect_banner=False)
    big = b"Event: Big\r\n" + b"".join(b"K%d: %s\r\n" % (i, b"v" * 50) for i in range(200))
    out: list[Message] = []
    stream = big + b"\r\n" + b"Event: Small\r\nA: 1\r\n\r\n"
    for i in range(0, len(stream), 300):
        out += parser.feed(stream[i : i + 300])
    assert headers(out) == [{"Event": "Small", "A": "1"}]
    assert bad("too_large") == before + 1


def test_long_line_and_garbage_are_skipped() -> None:
    """A too-long line, a line without a colon and a block with no Event/Response are
    each counted under their reason and skipped."""
    before = (bad("line_too_long"), bad("malformed"), bad("no_type"))
    parser = AmiParser(max_line_bytes=300, expect_banner=False)
    out = parser.feed(
        b"Event: A\r\nX: " + b"y" * 400 + b"\r\n\r\n"
        b"\x00\xff garbage without colon\r\n\r\n"
        b"Foo: bar\r\n\r\n"
        b"Event: Ok\r\n\r\n"
    )
    assert headers(out) == [{"Event": "Ok"}]
    after = (bad("line_too_long"), bad("malformed"), bad("no_type"))
    assert after == (before[0] + 1, before[1] + 1, before[2] + 1)


def test_eof_with_partial_message_is_counted() -> None:
    """EOF in the middle of a message counts it as truncated; feeding after EOF is an error."""
    before = bad("truncated")
    parser = AmiParser(expect_banner=False)
    assert parser.feed(b"Event: Half\r\nA: 1\r\n") == []
    assert parser.feed_eof() == []
    assert parser.at_eof
    assert bad("truncated") == before + 1
    with pytest.raises(AmiProtocolError):
        parser.feed(b"more")


def test_build_action_encodes_and_refuses_injection() -> None:
    """Actions are CRLF framed with ActionID; list values repeat the key; CR/LF anywhere
    is refused so no header can be injected."""
    data = build_action("Originate", "a-1", Channel="Local/1@x", Variable=["A=1", "B=2"])
    assert data == (
        b"Action: Originate\r\nActionID: a-1\r\nChannel: Local/1@x\r\n"
        b"Variable: A=1\r\nVariable: B=2\r\n\r\n"
    )
    for fields in ({"Secret": "x\r\nAction: Logoff"}, {"Secret": "x\ny"}):
        with pytest.raises(AmiProtocolError):
            build_action("Login", "a-2", fields)
    with pytest.raises(AmiProtocolError):
        build_action("Login", "id\r\n")
    with pytest.raises(AmiProtocolError):
        build_action("Login", "a-3", {"Bad: key": "v"})
    (msg,) = AmiParser(expect_banner=False).feed(build_action("Ping", "p-1"))
    assert msg.action == "Ping"
    assert msg.action_id == "p-1"
