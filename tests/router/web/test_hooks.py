"""The two small hooks the screen pop hangs on: the AMI client's event listeners and
the route handler's decision listener. Neither may disturb what it is attached to."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ami.client import AmiClient
from ami.peer import AmiPeer
from ami.protocol import Message
from ami.records import CallRecord
from ami.tracker import CallTracker, extension_agent
from dialplan.peer import AsteriskAgiPeer, build_environment
from dialplan.route import make_route_handler
from dialplan.server import AgiServer
from router.app import build_router
from router.rules.presence import Presence
from router.samplecrm import make_app, start_sample_crm
from router.settings import AmiSettings, load_settings
from router.web.decisions import DecisionStore

ROOT = Path(__file__).parents[3]


async def test_a_failing_listener_neither_stops_the_tracker_nor_the_others(
    fixtures_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Listeners get every event after the tracker; one that raises is logged per
    event, and the tracker still emits its four records and the next listener sees all.
    Resync listeners are told the channels alive after the login, even when one raises."""
    records: list[CallRecord] = []
    seen: list[str] = []
    resyncs: list[int] = []

    def broken(msg: Message) -> None:
        raise RuntimeError("listener bug")

    async with AmiPeer(fixtures_dir / "ami-basic.raw", username="router",
                       secret="routersecret") as peer:
        tracker = CallTracker(records.append, agent_for_device=extension_agent,
                              cdr_grace_s=0.5)
        client = AmiClient(AmiSettings(host="127.0.0.1", port=peer.port, username="router",
                                       secret="routersecret"),
                           tracker=tracker, flush_interval_s=0.02)
        client.listeners += [broken, lambda m: seen.append(m.event or "")]
        client.resync_listeners += [lambda ch: 1 / 0, lambda ch: resyncs.append(len(ch))]
        await client.start()
        try:
            await client.wait_connected(10.0)  # logged in and the view rebuilt
            await peer.wait_replayed(10.0)
            for _ in range(500):
                if len(records) >= 4:
                    break
                await asyncio.sleep(0.01)
        finally:
            await client.stop()
    assert len(records) == 4
    assert len(seen) == len(peer.recording.events)
    assert caplog.text.count("AMI event listener failed") == len(seen)
    assert len(resyncs) == 1  # one login, one CoreShowChannels answer
    assert "AMI resync listener failed" in caplog.text


async def test_route_handler_tells_the_listener_after_answering(redis_url: str) -> None:
    """The decision listener gets the session (with the channel's Uniqueid) and the
    outcome once the variables are set; a listener that raises costs the call nothing."""
    app = make_app(token="demo-token")
    runner, url = await start_sample_crm("127.0.0.1", 0, app)
    base = load_settings(ROOT / "examples" / "config.yaml")
    settings = base.model_copy(update={
        "crm": base.crm.model_copy(update={"base_url": url}),
        "redis": base.redis.model_copy(update={"url": redis_url}),
    })
    store = DecisionStore()
    calls: list[Any] = []

    def listener(session: Any, outcome: Any) -> None:
        calls.append(outcome)
        store.put(session, outcome)
        raise RuntimeError("listener bug")

    try:
        async with build_router(settings, Presence()) as router:
            agi = AgiServer(settings.agi.model_copy(update={"port": 0}))
            agi.route("route", make_route_handler(router, listener))
            await agi.start()
            try:
                env = build_environment("+8613800138000", "Li Lei", "4008001000",
                                        "1795338333.1", port=agi.port)
                result = await AsteriskAgiPeer("127.0.0.1", agi.port, env).run()
            finally:
                await agi.stop(1.0)
    finally:
        await runner.cleanup()
    assert result.variables["CRM_CUSTOMER_ID"] == "C-1001"
    assert "ROUTE_ACTION" in result.variables
    assert len(calls) == 1
    kept = store.get("1795338333.1")
    assert kept is not None
    assert kept.customer is not None
    assert kept.customer.name == "Li Lei"
    assert kept.caller == "+8613800138000"
    assert kept.rule == result.variables["ROUTE_RULE"]
