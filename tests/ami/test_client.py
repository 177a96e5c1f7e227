"""The asyncio AMI client against the replaying test peer: login, lists, reconnects."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import pytest

from ami.client import ActionResult, AmiClient, backoff_delay
from ami.peer import AmiPeer, Recording
from ami.protocol import Message
from ami.records import CallRecord
from ami.tracker import CallTracker, extension_agent
from router.metrics import REGISTRY
from router.settings import AmiSettings
from tests.ami.helpers import dumps, parse, replay
from tests.waiting import wait_for

USER, SECRET = "router", "routersecret"  # the recording's manager.conf


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def settings(peer: AmiPeer, **kw: Any) -> AmiSettings:
    base: dict[str, Any] = {
        "host": "127.0.0.1", "port": peer.port, "username": USER, "secret": SECRET,
        "reconnect_min_s": 0.02, "reconnect_max_s": 0.1, "connect_timeout_s": 1.0,
        # The list answers queue behind the replayed events; under coverage tracing a
        # 1 s action deadline was missed and the client (rightly) reconnected.
        "action_timeout_s": 5.0,
    }
    base.update(kw)
    return AmiSettings(**base)


async def run_until_replayed(
    peer: AmiPeer, records: list[CallRecord], expected: int, **kw: Any
) -> AmiClient:
    # A generous Cdr grace: on a loaded machine a call's Cdr may come >50 ms after its
    # last hangup, and finalising before it would change the record (the test's point).
    tracker = CallTracker(records.append, agent_for_device=extension_agent, cdr_grace_s=1.0)
    client = AmiClient(settings(peer, **kw), tracker=tracker, flush_interval_s=0.02)
    await client.start()
    if kw.get("secret", SECRET) == SECRET:
        await client.wait_connected(10.0)
    await peer.wait_replayed(5.0)
    for _ in range(800):
        if len(records) >= expected:
            break
        await asyncio.sleep(0.01)
    return client


async def test_live_replay_equals_offline_replay(fixtures_dir: Path) -> None:
    """Replayed over a socket through the client, ami-basic gives the same four records as
    the offline replay; the client logged in with the configured least-privilege user and
    rebuilt its view with QueueStatus and CoreShowChannels."""
    path = fixtures_dir / "ami-basic.raw"
    records: list[CallRecord] = []
    async with AmiPeer(path, username=USER, secret=SECRET) as peer:
        client = await run_until_replayed(peer, records, 4)
        assert client.connected
        assert client.banner == "Asterisk Call Manager/11.0.0"
        assert metric("callroute_ami_connected") == 1.0
        await client.stop()
        assert metric("callroute_ami_connected") == 0.0
    assert dumps(records) == dumps(replay(parse(path.read_bytes())))
    names = [a.action for a in peer.actions]
    assert names == ["Login", "QueueStatus", "CoreShowChannels", "Getvar", "Logoff"]
    assert client.tracker is not None
    assert client.tracker.cdr_clock.server_offset == 0  # the peer's +0000
    assert peer.actions[0]["Username"] == USER


async def test_event_lists_are_correlated(fixtures_dir: Path) -> None:
    """QueueStatus and CoreShowChannels answers are gathered by ActionID into one result
    (response, list events, Complete), as Asterisk frames them; list events never reach
    on_event."""
    seen: list[Message] = []
    rec = Recording.load(fixtures_dir / "ami-basic.raw")
    async with AmiPeer(rec, username=USER, secret=SECRET, replay=False) as peer:
        client = AmiClient(settings(peer), on_event=seen.append)
        await client.start()
        await client.wait_connected(2.0)
        qs = await client.send_action("QueueStatus")
        assert qs.ok
        assert qs.response["Message"] == "Queue status will follow"
        assert [m.event for m in qs.events] == [
            "QueueParams", "QueueMember", "QueueMember", "QueueParams", "QueueMember"]
        assert qs.complete is not None
        assert qs.complete["ListItems"] == "5"
        assert {m.action_id for m in qs.events} == {qs.response.action_id}
        pong = await client.send_action("Ping")
        assert pong.response["Ping"] == "Pong"
        unknown = await client.send_action("NoSuchAction")
        assert not unknown.ok
        assert unknown.response["Message"] == "Invalid/unknown command"
        await client.stop()
    assert seen == []


async def test_reconnect_mid_call_marks_calls_incomplete(
    fixtures_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The peer drops the link in the middle of call 2 and events go by while the client
    is away (the end of call 2, the start of call 3). The client reconnects, resyncs:
    call 2 is finalised incomplete, call 3 is adopted as incomplete; calls 1 and 4 are
    intact. A log line names both calls; reconnect and incomplete metrics move."""
    path = fixtures_dir / "ami-basic.raw"
    rec = Recording.load(path)
    start_2 = next(i for i, m in enumerate(rec.parsed) if m.get("Linkedid") == "1795338363.4")
    start_3 = next(i for i, m in enumerate(rec.parsed) if m.get("Linkedid") == "1795338393.10")
    drop_at = start_2 + 40
    gap = start_3 + 10 - drop_at
    reconnects, incomplete = metric("callroute_ami_reconnects_total"), metric(
        "callroute_ami_incomplete_calls_total")
    records: list[CallRecord] = []
    caplog.set_level(logging.WARNING, logger="ami.client")
    async with AmiPeer(rec, username=USER, secret=SECRET, drop_after=drop_at,
                       gap_events=gap) as peer:
        client = await run_until_replayed(peer, records, 4)
        await client.stop()
    assert peer.drops == 1
    assert peer.logins == 2
    assert client.reconnects == 1
    assert metric("callroute_ami_reconnects_total") == reconnects + 1
    assert metric("callroute_ami_incomplete_calls_total") == incomplete + 2
    by_id = {r.linkedid: r for r in records}
    assert sorted(by_id) == ["1795338333.0", "1795338363.4", "1795338393.10", "1795338423.18"]
    assert len(records) == 4
    assert sorted(lid for lid, r in by_id.items() if r.incomplete) == [
        "1795338363.4", "1795338393.10"]
    clean = {r.linkedid: r for r in replay(parse(path.read_bytes()))}
    for lid in ("1795338333.0", "1795338423.18"):
        assert by_id[lid] == clean[lid]
    call3 = by_id["1795338393.10"]
    assert (call3.answered_by, call3.queue, call3.outcome) == (
        "Local/7002@agents", "support", "answered")
    assert any("may be incomplete" in r.message and "1795338363.4" in r.message
               and "1795338393.10" in r.message for r in caplog.records)


async def test_drop_without_gap_keeps_the_call_but_flags_it(fixtures_dir: Path) -> None:
    """A drop that loses no event still flags the call in progress as incomplete (the
    client cannot know), with every field otherwise as in the clean replay."""
    path = fixtures_dir / "ami-basic.raw"
    rec = Recording.load(path)
    agent_connect = next(i for i, m in enumerate(rec.parsed) if m.event == "AgentConnect")
    records: list[CallRecord] = []
    async with AmiPeer(rec, username=USER, secret=SECRET, drop_after=agent_connect) as peer:
        client = await run_until_replayed(peer, records, 4)
        await client.stop()
    clean = {r.linkedid: r for r in replay(parse(path.read_bytes()))}
    call2 = next(r for r in records if r.linkedid == "1795338363.4")
    assert call2.incomplete
    assert call2.model_copy(update={"incomplete": False}) == clean["1795338363.4"]


async def test_login_failure_is_retried_with_backoff(
    caplog: pytest.LogCaptureFixture
) -> None:
    """A wrong secret gets Asterisk's `Authentication failed`; the client logs a clear
    error, stays disconnected and retries; once the secret is right it logs in."""
    caplog.set_level(logging.ERROR, logger="ami.client")
    async with AmiPeer(None, username=USER, secret="other") as peer:
        client = AmiClient(settings(peer))
        await client.start()
        for _ in range(300):
            if peer.failed_logins >= 3:
                break
            await asyncio.sleep(0.01)
        assert peer.failed_logins >= 3
        assert not client.connected
        assert client.last_error is not None
        assert "rejected" in client.last_error
        assert "Authentication failed" in client.last_error
        assert any("rejected" in r.message for r in caplog.records)
        peer.secret = SECRET
        await client.wait_connected(2.0)
        assert client.connected
        await client.stop()


async def test_unreachable_server_is_retried() -> None:
    """Nothing listening: connection refused is retried until a server appears."""
    peer = AmiPeer(None, username=USER, secret=SECRET)
    await peer.start()
    port = peer.port
    await peer.stop()
    client = AmiClient(AmiSettings(port=port, username=USER, secret=SECRET,
                                   reconnect_min_s=0.02, reconnect_max_s=0.05))
    await client.start()
    await wait_for(lambda: client.last_error is not None, 5)
    assert not client.connected
    assert "connection failed" in client.last_error
    async with AmiPeer(None, username=USER, secret=SECRET, port=port):
        await client.wait_connected(2.0)
        await client.stop()


async def test_periodic_ping_and_dead_link_detection() -> None:
    """The client pings on its interval; when pings go unanswered it drops and reconnects."""
    async with AmiPeer(None, username=USER, secret=SECRET) as peer:
        client = AmiClient(settings(peer, ping_interval_s=0.03, action_timeout_s=0.1))
        await client.start()
        await client.wait_connected(2.0)
        await wait_for(lambda: sum(a.action == "Ping" for a in peer.actions) >= 2, 5)
        peer.replay = False
        original = peer._answer

        def mute(action: Message, writer: asyncio.StreamWriter) -> bool:
            return True if action.action == "Ping" else original(action, writer)

        peer._answer = mute  # type: ignore[method-assign]
        for _ in range(200):
            if peer.logins >= 2:
                break
            await asyncio.sleep(0.01)
        assert peer.logins >= 2
        await client.stop()


def test_backoff_is_capped_exponential_with_jitter() -> None:
    """Delays grow 2x per attempt from reconnect_min_s, never exceed reconnect_max_s, and
    are jittered within [cap/2, cap]."""
    rng = random.Random(1)
    for attempt, cap in [(0, 0.5), (1, 1.0), (3, 4.0), (10, 30.0), (100, 30.0)]:
        delays = {backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(20)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1


async def test_panoramisk_speaks_to_the_peer(fixtures_dir: Path) -> None:
    """Compatibility: panoramisk's Manager (a third-party AMI client) logs in to the peer
    and receives the recording's events, so the peer speaks real AMI."""
    from panoramisk import Manager

    got: list[str] = []
    async with AmiPeer(fixtures_dir / "ami-abandon.raw", username=USER, secret=SECRET) as peer:
        manager = Manager(loop=asyncio.get_running_loop(), host="127.0.0.1", port=peer.port,
                          username=USER, secret=SECRET, ping_delay=60, reconnect_timeout=60)
        manager.register_event("*", lambda _m, event: got.append(event.event))
        await manager.connect()
        await peer.wait_replayed(5.0)
        for _ in range(200):
            if "Cdr" in got and got.count("Hangup") == 2:
                break
            await asyncio.sleep(0.01)
        assert manager.authenticated
        pong = await manager.send_action({"Action": "Ping"})
        assert pong.ping == "Pong"
        manager.close()
    assert got[0] == "FullyBooted"
    assert "QueueCallerAbandon" in got
    assert got.count("Cdr") == 2


class _Writer:
    """Stands in for the AMI socket's writer: takes the bytes, never blocks."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    async def drain(self) -> None:
        return None

    def is_closing(self) -> bool:
        return False


async def test_a_cancelled_action_stays_cancelled_when_its_answer_lands_at_once() -> None:
    """The caller of send_action is cancelled in the same loop turn as its answer
    arrives: it ends cancelled, not with the answer (asyncio.wait_for on Python 3.11
    swallowed that cancellation, and serve's start-up check logged after shutdown)."""
    client = AmiClient(AmiSettings(host="127.0.0.1", port=1, username="u", secret="s"))
    client._writer = _Writer()  # type: ignore[assignment]
    task = asyncio.create_task(client.send_action("Ping", timeout=5.0))
    await asyncio.sleep(0)  # the action is sent and waits on its answer now
    (pending,) = client._pending.values()
    assert not task.done()
    pending.future.set_result(ActionResult(Message({"Response": "Success"})))  # answer lands
    task.cancel()  # ... as the caller is told to stop
    with pytest.raises(asyncio.CancelledError):
        await task
