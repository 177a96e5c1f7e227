"""The FastAGI server under hostile and awkward clients, on real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from dialplan import protocol
from dialplan.peer import ROUTER, AsteriskAgiPeer, build_environment
from dialplan.server import AgiServer, AgiSession
from router.errors import AgiHangup, AgiProtocolError
from router.log import CallContextFilter
from router.metrics import REGISTRY
from router.runner import loop_name
from router.settings import AgiSettings
from tests.waiting import wait_for

HOST = "127.0.0.1"
UID = "1795338363.5"
ENV = build_environment("13900139000", "Han Meimei", "4008001000", UID)


def settings(**overrides: float) -> AgiSettings:
    """Small deadlines so failure paths are fast."""
    values: dict[str, float] = {
        "port": 0, "env_timeout_s": 0.3, "command_timeout_s": 0.3, "max_sessions": 8
    }
    values.update(overrides)
    return AgiSettings.model_validate(values)


def sessions(outcome: str) -> float:
    return REGISTRY.get_sample_value("callroute_agi_sessions_total", {"outcome": outcome}) or 0.0


def rejected() -> float:
    return REGISTRY.get_sample_value("callroute_agi_rejected_total") or 0.0


async def set_target(session: AgiSession) -> None:
    await session.set_variable("ROUTE_TARGET", "Local/7001@agents")


@pytest.fixture
async def server() -> AsyncIterator[AgiServer]:
    """A started server routing ``route`` to a handler that sets ROUTE_TARGET."""
    srv = AgiServer(settings())
    srv.route("route", set_target)
    await srv.start()
    yield srv
    await srv.stop(0.5)


async def peer(srv: AgiServer, env: bytes = ENV, **options: object) -> AsteriskAgiPeer:
    return AsteriskAgiPeer(HOST, srv.port, env, timeout_s=3.0, **options)  # type: ignore[arg-type]


async def raw_session(port: int, data: bytes, *, wait_s: float = 3.0) -> tuple[bytes, float]:
    """Send ``data``, then read until the server closes; return (bytes read, seconds)."""
    reader, writer = await asyncio.open_connection(HOST, port)
    start = time.monotonic()
    got = b""
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            await writer.drain()
        async with asyncio.timeout(wait_s):
            with contextlib.suppress(ConnectionError):
                while chunk := await reader.read(65536):
                    got += chunk
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return got, time.monotonic() - start


async def assert_still_serves(srv: AgiServer) -> None:
    result = await (await peer(srv)).run()
    assert result.variables == {"ROUTE_TARGET": "Local/7001@agents"}


async def test_normal_call(server: AgiServer) -> None:
    """A well-behaved call gets its variable, the server closes, outcome ok."""
    before = sessions("ok")
    result = await (await peer(server)).run()
    assert result.closed_by_server
    assert result.commands == [b'SET VARIABLE ROUTE_TARGET "Local/7001@agents"\n']
    assert result.decision_ms is not None
    assert result.decision_ms < 300
    assert sessions("ok") == before + 1


async def test_early_close_before_environment(server: AgiServer) -> None:
    """A client that connects and closes at once is counted, and nothing breaks."""
    before = sessions("bad_environment")
    result = await (await peer(server, env_cut=0)).run()
    assert result.commands == []
    await wait_for(lambda: sessions("bad_environment") > before, 5)
    assert sessions("bad_environment") == before + 1
    await assert_still_serves(server)


async def test_early_close_mid_environment(server: AgiServer) -> None:
    """Closing half way through the environment ends the session without commands."""
    before = sessions("bad_environment")
    result = await (await peer(server, env_cut=len(ENV) // 2)).run()
    assert result.commands == []
    await wait_for(lambda: sessions("bad_environment") > before, 5)
    assert sessions("bad_environment") == before + 1
    await assert_still_serves(server)


async def test_garbage_is_closed_fast(server: AgiServer) -> None:
    """An HTTP request (not AGI) is closed at once, long before the env deadline."""
    got, elapsed = await raw_session(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got == b""
    assert elapsed < 0.25


async def test_oversized_environment(server: AgiServer) -> None:
    """10 MB of environment lines is refused after the byte limit, not buffered."""
    lines = b"agi_padding: " + b"x" * 60 + b"\n"
    got, elapsed = await raw_session(server.port, lines * (10_000_000 // len(lines)))
    assert got == b""
    assert elapsed < 2.0
    await assert_still_serves(server)


async def test_one_endless_line(server: AgiServer) -> None:
    """A 10 MB line without newline is cut at max_line_bytes."""
    got, elapsed = await raw_session(server.port, b"agi_x: " + b"y" * 10_000_000)
    assert got == b""
    assert elapsed < 2.0


async def test_slow_environment_deadline(server: AgiServer) -> None:
    """A client that stalls mid-environment is closed at env_timeout_s."""
    got, elapsed = await raw_session(server.port, ENV[:40])
    assert got == b""
    assert 0.25 <= elapsed < 1.5


async def test_silent_client_deadline(server: AgiServer) -> None:
    """A client that sends nothing at all is closed at env_timeout_s."""
    before = sessions("bad_environment")
    got, elapsed = await raw_session(server.port, b"")
    assert got == b""
    assert 0.25 <= elapsed < 1.5
    assert sessions("bad_environment") == before + 1


async def test_command_reply_timeout() -> None:
    """A reply that never comes fails the command after command_timeout_s; the
    session is closed and counted as a timeout."""
    seen: list[tuple[type[BaseException], float]] = []

    async def handler(session: AgiSession) -> None:
        start = time.monotonic()
        try:
            await set_target(session)
        except AgiProtocolError as exc:
            seen.append((type(exc), time.monotonic() - start))
            raise

    async with AgiServer(settings(command_timeout_s=0.2)) as srv:
        srv.route("route", handler)
        before = sessions("timeout")
        result = await (await peer(srv, reply_delay_s=1.0)).run()
        assert result.closed_by_server
        assert len(seen) == 1
        assert seen[0][0] is AgiProtocolError
        assert 0.15 <= seen[0][1] < 0.6
        assert sessions("timeout") == before + 1


async def test_silent_peer_is_bounded_by_one_session_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A peer that sends its environment and then never answers holds its slot until the
    session deadline, not command_timeout_s per variable (11 variables x 2 s = 22 s), and
    the session counts as a timeout, with one log line, even when the handler swallows
    the failure as the route handler does."""
    items = [(f"ROUTE_VAR{i}", "x") for i in range(11)]

    async def swallowing(session: AgiSession) -> None:
        with contextlib.suppress(AgiProtocolError):
            await session.set_variables(items)

    caplog.set_level(logging.WARNING, logger="callroute.agi")
    async with AgiServer(settings(command_timeout_s=2.0, session_timeout_s=0.6)) as srv:
        srv.route("route", swallowing)
        ok, timeouts = sessions("ok"), sessions("timeout")
        got, elapsed = await raw_session(srv.port, ENV, wait_s=5.0)
        assert got == protocol.set_variable(*items[0])
        assert 0.5 <= elapsed < 1.2
        await wait_for(lambda: sessions("timeout") > timeouts, 5)
        assert sessions("timeout") == timeouts + 1
        assert sessions("ok") == ok
        assert srv.active == 0
    lines = [r.getMessage() for r in caplog.records if "timed out" in r.getMessage()]
    assert len(lines) == 1
    assert "session deadline passed" in lines[0]


async def test_session_deadline_covers_a_slow_handler() -> None:
    """The session deadline counts from the accept: a handler still busy when it passes
    finds its session closed (the dialplan goes on with its fallback) and the session
    counts as a timeout."""
    async def slow(session: AgiSession) -> None:
        await asyncio.sleep(1.0)
        await set_target(session)

    async with AgiServer(settings(session_timeout_s=0.4)) as srv:
        srv.route("route", slow)
        before = sessions("timeout")
        result = await (await peer(srv)).run()
        assert result.closed_by_server
        assert result.commands == []
        assert result.decision_ms is not None
        assert result.decision_ms < 800
        await wait_for(lambda: sessions("timeout") > before, 5)
        assert sessions("timeout") == before + 1


async def idle_flood(port: int, count: int, opened: list[asyncio.StreamWriter],
                     pause_s: float = 0.002) -> None:
    """Open ``count`` connections that never send anything, keeping them open."""
    for _ in range(count):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(HOST, port)
            opened.append(writer)
        await asyncio.sleep(pause_s)


async def test_real_calls_are_served_during_a_flood_of_idle_connections() -> None:
    """With every slot taken by connections that never send an environment (a flood of
    idle sockets, far more than max_sessions), real calls are still served: the oldest
    idle connection is shed for each newcomer, and a session past its environment is
    never shed. Shed connections are counted."""
    async def holding(session: AgiSession) -> None:
        await asyncio.sleep(0.1)  # in flight while the flood goes on
        await set_target(session)

    opened: list[asyncio.StreamWriter] = []
    async with AgiServer(settings(max_sessions=8, env_timeout_s=5.0)) as srv:
        srv.route("route", holding)
        shed_before, refused_before = sessions("shed"), rejected()
        await idle_flood(srv.port, 16, opened, pause_s=0.0)  # every slot idle
        await asyncio.sleep(0.05)
        flood = asyncio.create_task(idle_flood(srv.port, 300, opened))
        results = []
        for _ in range(10):
            results.append(await (await peer(srv)).run())
        concurrent = await asyncio.gather(*[(await peer(srv)).run() for _ in range(3)])
        await flood
        try:
            for result in [*results, *concurrent]:
                assert result.variables == {"ROUTE_TARGET": "Local/7001@agents"}
            assert sessions("shed") - shed_before >= 300
            assert rejected() == refused_before
            assert srv.active <= 8
        finally:
            for writer in opened:
                writer.close()


async def test_over_bound_connections_rejected_at_once() -> None:
    """Past max_sessions, a connection is closed immediately without a command and
    counted; the sessions in flight are unaffected."""
    release = asyncio.Event()
    entered = asyncio.Semaphore(0)

    async def holder(session: AgiSession) -> None:
        entered.release()
        await release.wait()
        await set_target(session)

    async with AgiServer(settings(max_sessions=2, env_timeout_s=2.0)) as srv:
        srv.route("route", holder)
        held = [asyncio.create_task((await peer(srv)).run()) for _ in range(2)]
        for _ in range(2):
            async with asyncio.timeout(2):
                await entered.acquire()
        before = rejected()
        got, elapsed = await raw_session(srv.port, ENV)
        assert got == b""
        assert elapsed < 0.2
        assert rejected() == before + 1
        release.set()
        results = await asyncio.gather(*held)
        assert all(r.variables == {"ROUTE_TARGET": "Local/7001@agents"} for r in results)
        assert srv.active == 0


async def test_graceful_stop_finishes_in_flight() -> None:
    """stop() stops accepting but lets a session in flight finish its commands."""
    entered = asyncio.Event()

    async def slow(session: AgiSession) -> None:
        entered.set()
        await asyncio.sleep(0.2)
        await set_target(session)

    srv = AgiServer(settings())
    srv.route("route", slow)
    await srv.start()
    port = srv.port
    call = asyncio.create_task((await peer(srv)).run())
    await asyncio.wait_for(entered.wait(), 2)
    await srv.stop(grace_s=2.0)
    result = await call
    assert result.variables == {"ROUTE_TARGET": "Local/7001@agents"}
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(HOST, port)


async def test_stop_cancels_after_grace() -> None:
    """A session still running after the grace period is cancelled and closed."""
    entered = asyncio.Event()

    async def stuck(session: AgiSession) -> None:
        entered.set()
        await asyncio.sleep(30)

    srv = AgiServer(settings())
    srv.route("route", stuck)
    await srv.start()
    before = sessions("cancelled")
    call = asyncio.create_task((await peer(srv)).run())
    await asyncio.wait_for(entered.wait(), 2)
    start = time.monotonic()
    await srv.stop(grace_s=0.1)
    assert time.monotonic() - start < 1.0
    result = await call
    assert result.closed_by_server
    assert result.commands == []
    assert sessions("cancelled") == before + 1


async def test_serve_forever_returns_after_stop() -> None:
    """serve_forever() starts the server and returns once stop() has run."""
    srv = AgiServer(settings())
    task = asyncio.create_task(srv.serve_forever())
    for _ in range(100):
        if srv._server is not None:
            break
        await asyncio.sleep(0.01)
    await srv.stop(0.1)
    await asyncio.wait_for(task, 1)


async def test_handler_exception_contained(
    server: AgiServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A failing handler is logged with its traceback; the server keeps serving."""

    async def broken(session: AgiSession) -> None:
        raise RuntimeError("bug in the handler")

    server.route("broken", broken)
    before = sessions("handler_error")
    env = build_environment("1", "x", "4008001000", UID, script="broken")
    with caplog.at_level(logging.ERROR, logger="callroute.agi"):
        result = await (await peer(server, env)).run()
    assert result.closed_by_server
    assert sessions("handler_error") == before + 1
    assert any(r.exc_info and "bug in the handler" in str(r.exc_info[1]) for r in caplog.records)
    await assert_still_serves(server)


async def test_unknown_script(server: AgiServer, caplog: pytest.LogCaptureFixture) -> None:
    """An unrouted script is closed without commands and logged with the call id."""
    caplog.handler.addFilter(CallContextFilter())
    env = build_environment("1", "x", "4008001000", "42.7", script="nosuch")
    with caplog.at_level(logging.WARNING, logger="callroute.agi"):
        result = await (await peer(server, env)).run()
    assert result.closed_by_server
    assert result.commands == []
    (record,) = [r for r in caplog.records if "unknown AGI script" in r.getMessage()]
    assert getattr(record, "call_id", None) == "42.7"


async def test_log_lines_carry_uniqueid(caplog: pytest.LogCaptureFixture) -> None:
    """Every log line of a session, handler lines included, carries its uniqueid (and
    the caller number arrives masked)."""
    caplog.handler.addFilter(CallContextFilter())
    handler_log = logging.getLogger("callroute.test_handler")

    async def chatty(session: AgiSession) -> None:
        handler_log.info("deciding for %s", session.env.callerid)
        await session.wait_hungup(1.0)

    async with AgiServer(settings()) as srv:
        srv.route("route", chatty)
        with caplog.at_level(logging.INFO):
            await (await peer(srv, hangup_after_s=0.02)).run()
    mine = [r for r in caplog.records if r.name in ("callroute.agi", "callroute.test_handler")
            and "listening" not in r.getMessage()]
    assert {r.getMessage() for r in mine} >= {
        "deciding for 139****9000", "caller hung up (HANGUP line)"
    }
    assert {getattr(r, "call_id", None) for r in mine} == {UID}


async def test_hangup_then_command_still_answered() -> None:
    """After HANGUP the session says hungup, yet a command still gets its 200 (as
    Asterisk does in recording 04) and the variable is set."""
    flags: list[bool] = []

    async def after_hangup(session: AgiSession) -> None:
        flags.append(await session.wait_hungup(2.0))
        await set_target(session)

    async with AgiServer(settings()) as srv:
        srv.route("route", after_hangup)
        result = await (await peer(srv, hangup_after_s=0.05)).run()
    assert flags == [True]
    assert result.variables == {"ROUTE_TARGET": "Local/7001@agents"}
    assert result.sent("asterisk->router").endswith(b"HANGUP\n200 result=1\n")


async def test_511_dead_channel_raises_hangup() -> None:
    """A 511 reply marks the session hung up and set_variable raises AgiHangup."""
    caught: list[BaseException] = []

    async def handler(session: AgiSession) -> None:
        await session.wait_hungup(2.0)
        try:
            await set_target(session)
        except AgiHangup as exc:
            caught.append(exc)
            raise

    async with AgiServer(settings()) as srv:
        srv.route("route", handler)
        before = sessions("hangup")
        await (await peer(srv, hangup_after_s=0.02, dead_after_hangup=True)).run()
    assert len(caught) == 1
    assert sessions("hangup") == before + 1


async def test_eof_during_command_raises_hangup() -> None:
    """Asterisk closing the socket while a command waits raises AgiHangup at once
    (not after the command timeout)."""
    caught: list[tuple[BaseException, float]] = []

    async def handler(session: AgiSession) -> None:
        start = time.monotonic()
        try:
            await set_target(session)
        except AgiHangup as exc:
            caught.append((exc, time.monotonic() - start))
        with pytest.raises(AgiHangup):
            await session.noop()

    async with AgiServer(settings(command_timeout_s=2.0)) as srv:
        srv.route("route", handler)
        await (await peer(srv, reply_delay_s=0.5, close_after_s=0.05)).run()
        await wait_for(lambda: caught, 5)
    assert len(caught) == 1
    assert caught[0][1] < 0.4


async def test_trying_100_before_replies() -> None:
    """``100 Trying`` lines before replies are skipped; GET VARIABLE reads the value."""
    values: list[str | None] = []

    async def handler(session: AgiSession) -> None:
        await set_target(session)
        values.append(await session.get_variable("ROUTE_TARGET"))
        values.append(await session.get_variable("NOT_SET"))
        values.append(await session.get_full_variable("${CALLERID(name)}!"))

    async with AgiServer(settings()) as srv:
        srv.route("route", handler)
        await (await peer(srv, trying_first=True)).run()
    assert values == ["Local/7001@agents", None, "Han Meimei!"]


async def test_unsolicited_reply_breaks_session() -> None:
    """A reply with no command pending is a protocol error: the session is closed."""
    errors: list[BaseException] = []

    async def handler(session: AgiSession) -> None:
        await asyncio.sleep(0.1)
        try:
            await set_target(session)
        except AgiProtocolError as exc:
            errors.append(exc)
            raise

    async with AgiServer(settings()) as srv:
        srv.route("route", handler)
        got, _ = await raw_session(srv.port, ENV + b"200 result=1\n")
    assert got == b""
    assert len(errors) == 1
    assert "without a command" in str(errors[0])


async def test_event_loop_never_stalls() -> None:
    """While bad clients hammer the server, a 5 ms ticker keeps ticking and good
    calls still get their answer."""
    async with AgiServer(settings(max_sessions=64)) as server:
        server.route("route", set_target)
        await _hammer(server)


async def _hammer(server: AgiServer) -> None:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    bad = [
        raw_session(server.port, b"\xff" * 100_000),
        raw_session(server.port, b"agi_x: " + b"y" * 3_000_000),
        raw_session(server.port, ENV[:10]),
        raw_session(server.port, b""),
        raw_session(server.port, b"HANGUP\n" * 200_000),
        raw_session(server.port, ENV + b"garbage\n"),
    ] * 3
    good = [(await peer(server)).run() for _ in range(5)]
    _, results = await asyncio.gather(asyncio.gather(*bad), asyncio.gather(*good))
    stop.set()
    await tick
    assert max(gaps) < 0.15
    for result in results:
        assert result.sent(ROUTER) == b'SET VARIABLE ROUTE_TARGET "Local/7001@agents"\n'


async def test_sigterm_stops_gracefully() -> None:
    """After install_signal_handlers(), SIGTERM runs stop(): serve_forever returns."""
    srv = AgiServer(settings(shutdown_grace_s=0.2))
    await srv.start()
    srv.install_signal_handlers()
    loop = asyncio.get_running_loop()
    try:
        task = asyncio.create_task(srv.serve_forever())
        await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 2)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def test_runs_on_the_loop_its_id_names(request: pytest.FixtureRequest) -> None:
    """Each async test here runs once per event loop (tests/dialplan/conftest.py), on
    the loop its id names: the server is proven on uvloop and on asyncio's own loop."""
    assert loop_name(asyncio.get_running_loop()) == request.node.callspec.id


async def test_handler_can_close_before_returning(caplog: pytest.LogCaptureFixture) -> None:
    """session.close() hands the channel back to Asterisk at once (the peer sees the
    close while the handler still runs its bookkeeping); the session still counts as ok
    and is not mistaken for a caller hanging up."""
    finished = asyncio.Event()
    closed_first: list[bool] = []

    async def handler(session: AgiSession) -> None:
        await set_target(session)
        session.close()
        await asyncio.sleep(0.3)  # bookkeeping after the answer
        finished.set()

    async with AgiServer(settings()) as srv:
        srv.route("route", handler)
        before = sessions("ok")
        with caplog.at_level(logging.INFO, logger="callroute.agi"):
            result = await (await peer(srv)).run()
            closed_first.append(not finished.is_set())
            await asyncio.wait_for(finished.wait(), 2)
            await asyncio.sleep(0.05)
        assert result.closed_by_server
        assert result.variables == {"ROUTE_TARGET": "Local/7001@agents"}
        assert closed_first == [True]
        assert sessions("ok") == before + 1
        assert not [r for r in caplog.records if "hung up" in r.getMessage()]
