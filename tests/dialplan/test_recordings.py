"""The FastAGI code against every byte recorded from a real Asterisk 22.10.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dialplan import protocol
from dialplan.peer import (
    ASTERISK,
    ROUTER,
    AsteriskAgiPeer,
    Recording,
    build_environment,
    load_recording,
)
from dialplan.protocol import AgiEnvironment, AgiParser, AgiReply, EndOfStream, HangupNotice
from dialplan.server import AgiServer, AgiSession
from router.settings import AgiSettings

Step = Callable[[AgiSession], Awaitable[object]]

# What the README says each recorded call was: (file prefix, caller, name, DID, uniqueid).
CALLS = [
    ("agi-session-01", "+8613800138000", "Li Lei", "4008001000", "1795338333.1"),
    ("agi-session-02", "13900139000", "Han Meimei", "4008001000", "1795338363.5"),
    ("agi-session-03", "02150501234", "unknown", "4008002000", "1795338393.11"),
    ("agi-session-04", "13700137000", "Slow Case", "4008001000", "1795338423.19"),
    ("agi-session-05", "13600136000", "Impatient", "4008001000", "1795338618.97"),
]


def recording(fixtures_dir: Path, prefix: str) -> Recording:
    (path,) = (fixtures_dir / "agi").glob(f"{prefix}-*.json")
    return load_recording(path)


def parse_asterisk_side(rec: Recording) -> list[object]:
    """Feed every Asterisk frame, as recorded, to one parser; return all events."""
    parser = AgiParser()
    events: list[object] = []
    for frame in rec.frames:
        if frame.dir == ASTERISK:
            events.extend(parser.feed(frame.data))
    events.extend(parser.feed_eof())
    return events


@pytest.mark.parametrize(("prefix", "caller", "name", "did", "uniqueid"), CALLS)
def test_environment_fields(
    fixtures_dir: Path, prefix: str, caller: str, name: str, did: str, uniqueid: str
) -> None:
    """Each recorded environment parses into the caller, name, DID and ids Asterisk sent."""
    env = parse_asterisk_side(recording(fixtures_dir, prefix))[0]
    assert isinstance(env, AgiEnvironment)
    assert env.callerid == caller
    assert env.calleridname == name
    assert env.uniqueid == uniqueid
    assert env.extension == did
    assert env.script == "route"
    assert env.query == {"did": did}
    assert env.network_script == f"route?did={did}"
    assert env.request == f"agi://127.0.0.1:4573/route?did={did}"
    assert env.channel.startswith(f"Local/{did}@inbound-")
    assert (env.context, env.language, env.version, env.dnid) == (
        "inbound", "en", "22.10.1", "unknown"
    )
    assert env.get("accountcode") == ""
    assert len(env.vars) == 22


@pytest.mark.parametrize("prefix", [c[0] for c in CALLS])
def test_replies_parse(fixtures_dir: Path, prefix: str) -> None:
    """After the environment every recorded Asterisk line is a reply or HANGUP, one per
    command the router sent (HANGUP extra), and the stream ends cleanly."""
    rec = recording(fixtures_dir, prefix)
    events = parse_asterisk_side(rec)[1:]
    replies = [e for e in events if isinstance(e, AgiReply)]
    assert len(replies) == len(rec.commands)
    assert isinstance(events[-1], EndOfStream)
    hangups = [e for e in events if isinstance(e, HangupNotice)]
    assert len(hangups) == (1 if prefix == "agi-session-04" else 0)


def test_session_02_and_03_reply_details(fixtures_dir: Path) -> None:
    """GET VARIABLE values come back as data; NOOP is result 0; BOGUS is a 510."""
    two = [e for e in parse_asterisk_side(recording(fixtures_dir, "agi-session-02"))
           if isinstance(e, AgiReply)]
    assert [r.data for r in two] == [None, None, "4008001000", "Han Meimei", None]
    three = [e for e in parse_asterisk_side(recording(fixtures_dir, "agi-session-03"))
             if isinstance(e, AgiReply)]
    assert [(r.code, r.result) for r in three] == [(200, 1), (200, 1), (200, 0), (510, None)]


@pytest.mark.parametrize(("prefix", "caller", "name", "did", "uniqueid"), CALLS)
def test_build_environment_matches_recording(
    fixtures_dir: Path, prefix: str, caller: str, name: str, did: str, uniqueid: str
) -> None:
    """build_environment() writes the recorded environment byte for byte."""
    rec = recording(fixtures_dir, prefix)
    recorded = AgiParser().feed(rec.environment)[0]
    assert isinstance(recorded, AgiEnvironment)
    built = build_environment(
        caller,
        None if name == "unknown" else name,
        did,
        uniqueid,
        channel=recorded.channel,
        threadid=int(recorded.get("threadid")),
    )
    assert built == rec.environment


# --- replays: our server, the recorded handler steps, the recorded Asterisk replies -----


async def _expect(got: Awaitable[object], want: object) -> None:
    assert await got == want


def _steps(prefix: str) -> list[Step]:
    """The handler of each recorded session, written with the session API."""
    sv = AgiSession.set_variable
    if prefix == "agi-session-01":
        return [
            lambda s: sv(s, "ROUTE_TARGET", "Local/7001@agents"),
            lambda s: sv(s, "ROUTE_QUEUE", "vip"),
            lambda s: sv(s, "CRM_CUSTOMER_ID", "C-1001"),
            lambda s: sv(s, "CRM_TIER", "gold"),
        ]
    if prefix == "agi-session-02":
        return [
            lambda s: sv(s, "ROUTE_TARGET", "Local/7009@agents"),
            lambda s: sv(s, "ROUTE_QUEUE", "vip"),
            lambda s: _expect(s.get_variable("CALL_DID"), "4008001000"),
            lambda s: _expect(s.get_full_variable("${CALLERID(name)}"), "Han Meimei"),
            lambda s: s.verbose("routing done", 1),
        ]
    if prefix == "agi-session-03":
        return [
            lambda s: sv(s, "ROUTE_TARGET", "Local/7008@agents"),
            lambda s: sv(s, "ROUTE_QUEUE", "support"),
            lambda s: s.noop("bad command test"),
            lambda s: _expect(
                s.command(protocol.command("BOGUS COMMAND")),
                AgiReply(510, None, None, "510 Invalid or unknown command"),
            ),
        ]
    if prefix == "agi-session-04":
        return [
            lambda s: _expect(s.wait_hungup(2.0), True),
            lambda s: sv(s, "ROUTE_TARGET", "Local/7001@agents"),
        ]
    return [
        lambda s: sv(s, "ROUTE_QUEUE", "empty"),
        lambda s: sv(s, "ROUTE_TARGET", ""),
    ]


@pytest.fixture
async def server() -> AsyncIterator[AgiServer]:
    """A FastAGI server on a free loopback port."""
    srv = AgiServer(AgiSettings(port=0, command_timeout_s=1.0))
    await srv.start()
    yield srv
    await srv.stop(0.5)


@pytest.mark.parametrize("prefix", [c[0] for c in CALLS])
async def test_replay_byte_for_byte(server: AgiServer, fixtures_dir: Path, prefix: str) -> None:
    """Replaying the recorded Asterisk side, our server writes exactly the recorded
    router bytes (session 04: HANGUP first, the command after it still answered)."""
    rec = recording(fixtures_dir, prefix)
    failures: list[BaseException] = []

    async def handler(session: AgiSession) -> None:
        try:
            for step in _steps(prefix):
                await step(session)
        except BaseException as exc:  # surfaced in the test, not just logged
            failures.append(exc)
            raise

    server.route("route", handler)
    result = await AsteriskAgiPeer.replay("127.0.0.1", server.port, rec, timeout_s=5.0)
    assert failures == []
    assert result.error is None
    assert result.closed_by_server
    assert result.sent(ROUTER) == rec.sent(ROUTER)
    assert result.sent(ASTERISK) == rec.sent(ASTERISK)


@pytest.mark.parametrize("prefix", [c[0] for c in CALLS])
async def test_peer_answers_like_asterisk(
    server: AgiServer, fixtures_dir: Path, prefix: str
) -> None:
    """The emulating peer (not replaying) answers the recorded commands with exactly
    the bytes Asterisk wrote, and records the variables the server set."""
    rec = recording(fixtures_dir, prefix)

    async def handler(session: AgiSession) -> None:
        for step in _steps(prefix):
            await step(session)

    server.route("route", handler)
    peer = AsteriskAgiPeer(
        "127.0.0.1",
        server.port,
        rec.environment,
        variables={"CALL_DID": "4008001000"},
        hangup_after_s=0.05 if prefix == "agi-session-04" else None,
    )
    result = await peer.run()
    assert result.closed_by_server
    assert result.sent(ASTERISK) == rec.sent(ASTERISK)
    assert result.sent(ROUTER) == rec.sent(ROUTER)
    set_lines = [protocol.parse_args(c.decode()[:-1]) for c in rec.commands
                 if c.startswith(b"SET VARIABLE")]
    assert result.variables == {args[2]: args[3] for args in set_lines}
    assert result.decision_ms is not None
