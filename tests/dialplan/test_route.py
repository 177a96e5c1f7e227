"""The route handler end to end: Asterisk's side (the test peer) → FastAGI server →
normaliser → CRM over HTTP through the Redis cache → rules → channel variables."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from dialplan.peer import AsteriskAgiPeer, PeerResult, build_environment, load_recording
from dialplan.route import Router, make_route_handler
from dialplan.server import AgiServer
from router.app import build_router
from router.rules.presence import Presence
from router.samplecrm import make_app, seed_customers, start_sample_crm, state_of
from router.settings import Settings, load_settings
from tests.redis_server import free_port
from tests.waiting import wait_for

ROOT = Path(__file__).parents[2]
OPEN = datetime(2026, 11, 23, 10, 30, tzinfo=ZoneInfo("Asia/Shanghai"))


@dataclass
class Stack:
    """A running call path and the CRM behind it."""

    settings: Settings
    router: Router
    agi: AgiServer
    crm: web.Application
    presence: Presence

    async def call(self, callerid: str, name: str | None = None, did: str = "4008001000",
                   **peer: Any) -> PeerResult:
        env = build_environment(callerid, name, did, port=self.agi.port)
        return await AsteriskAgiPeer("127.0.0.1", self.agi.port, env, **peer).run()


def make_settings(crm_url: str, redis_url: str, **routing: Any) -> Settings:
    """examples/config.yaml pointed at a test CRM and Redis."""
    base = load_settings(ROOT / "examples" / "config.yaml")
    return base.model_copy(update={
        "crm": base.crm.model_copy(update={"base_url": crm_url}),
        "redis": base.redis.model_copy(update={"url": redis_url}),
        "routing": base.routing.model_copy(update=routing),
    })


async def _stack(redis_url: str, customers: list[dict[str, Any]] | None = None,
                 **routing: Any) -> AsyncIterator[Stack]:
    app = make_app(customers, token="demo-token")
    runner, url = await start_sample_crm("127.0.0.1", 0, app)
    settings = make_settings(url, redis_url, **routing)
    presence = Presence()
    try:
        async with build_router(settings, presence) as router:
            router.clock = lambda: OPEN
            agi = AgiServer(settings.agi.model_copy(update={"port": 0}))
            agi.route("route", make_route_handler(router))
            await agi.start()
            try:
                yield Stack(settings, router, agi, app, presence)
            finally:
                await agi.stop(1.0)
    finally:
        await runner.cleanup()


@pytest.fixture
async def stack(redis_url: str) -> AsyncIterator[Stack]:
    """The call path with the example rules and the seeded sample CRM."""
    async for s in _stack(redis_url):
        yield s


async def test_recorded_call_1_gets_the_recorded_variables(stack: Stack,
                                                            fixtures_dir: Path) -> None:
    """Recording 1's environment, verbatim, gets the routing the recording shows:
    owner 7001 then queue vip, customer C-1001, tier gold, and the caller's name."""
    rec = load_recording(fixtures_dir / "agi" / "agi-session-01-+8613800138000.json")
    result = await AsteriskAgiPeer("127.0.0.1", stack.agi.port, rec.environment).run()
    v = result.variables
    assert result.error is None
    assert result.closed_by_server
    assert v["ROUTE_TARGET"] == "Local/7001@agents"
    assert v["ROUTE_QUEUE"] == "vip"
    assert v["CRM_CUSTOMER_ID"] == "C-1001"
    assert v["CRM_TIER"] == "gold"
    assert v["CRM_OWNER"] == "7001"
    assert v["ROUTE_RULE"] == "vip-owner"
    assert v["ROUTE_REASON"] == "rule"
    assert v["ROUTE_ACTION"] == "dial"
    assert v["ROUTE_TIMEOUT"] == "15"
    assert v["CALLERID(name)"] == "Li Lei"
    # the commands went out as the recording's do: SET VARIABLE NAME "value"
    assert b'SET VARIABLE ROUTE_TARGET "Local/7001@agents"\n' in result.commands


async def test_presence_skips_a_busy_owner(stack: Stack) -> None:
    """Han Meimei's owner 7009 rings first; once AMI reports 7009 in use, she goes
    straight to the vip queue."""
    first = await stack.call("13900139000", "Han Meimei")
    assert first.variables["ROUTE_TARGET"] == "Local/7009@agents"
    stack.presence.update("Local/7009@agents", "INUSE")
    second = await stack.call("13900139000", "Han Meimei")
    assert "ROUTE_TARGET" not in second.variables  # empty values are not sent
    assert second.variables["ROUTE_QUEUE"] == "vip"
    assert second.variables["CRM_CUSTOMER_ID"] == "C-1002"


async def test_unknown_caller_and_did(stack: Stack) -> None:
    """An unknown Shanghai landline on the sales DID goes to sales; on another DID to
    the default queue; neither gets customer variables."""
    sales = await stack.call("02150501234", None, did="4008002000")
    assert sales.variables["ROUTE_QUEUE"] == "sales"
    assert sales.variables["ROUTE_RULE"] == "unknown-sales-line"
    assert "CRM_CUSTOMER_ID" not in sales.variables  # unknown: nothing to set
    other = await stack.call("02150501234", None, did="4008001000")
    assert other.variables["ROUTE_QUEUE"] == "support"
    assert other.variables["ROUTE_RULE"] == "default"


async def test_anonymous_caller_is_not_looked_up(stack: Stack) -> None:
    """A withheld number gets the default route and causes no CRM request."""
    before = len(state_of(stack.crm).requests)
    result = await stack.call("anonymous")
    assert result.variables["ROUTE_QUEUE"] == "support"
    assert len(state_of(stack.crm).requests) == before


async def test_deadline_gives_default_route_in_time(stack: Stack) -> None:
    """The CRM takes 3 s for Slow Case: the call gets the default route with
    ROUTE_REASON=deadline within the 300 ms deadline (+ margin), and the lookup goes on
    in the background to fill the cache."""
    result = await stack.call("13700137000", "Slow Case")
    assert result.variables["ROUTE_REASON"] == "deadline"
    assert result.variables["ROUTE_QUEUE"] == "support"
    assert result.decision_ms is not None
    assert result.decision_ms < 300 + 150
    assert stack.router.lookup.background >= 1  # type: ignore[attr-defined]


async def test_crm_down_gives_default_route(redis_url: str) -> None:
    """With nothing listening at the CRM's address the call still gets the default
    route, quickly, with a reason saying the CRM failed."""
    settings = make_settings(f"http://127.0.0.1:{free_port()}", redis_url)
    async with build_router(settings) as router:
        outcome = await router.decide("13800138000", "4008001000", at=OPEN)
    assert outcome.decision.reason == "crm-error"
    assert outcome.decision.queue == "support"
    assert outcome.elapsed_ms < 300


async def test_redis_down_still_routes(own_redis: Any) -> None:
    """With Redis stopped the caller is still identified through the CRM."""
    app = make_app(token="demo-token")
    runner, url = await start_sample_crm("127.0.0.1", 0, app)
    own_redis.stop()
    try:
        settings = make_settings(url, own_redis.url)
        async with build_router(settings) as router:
            router.clock = lambda: OPEN
            outcome = await router.decide("+8613800138000", "4008001000")
        assert outcome.lookup.customer is not None
        assert outcome.decision.variables["CRM_CUSTOMER_ID"] == "C-1001"
    finally:
        await runner.cleanup()


async def test_hostile_crm_name_cannot_inject_commands(redis_url: str) -> None:
    """A CRM name holding quotes, backslashes and newlines is sent as one escaped
    argument: Asterisk sees exactly one command per variable, none of them injected."""
    evil = 'Bob" \\\nEXEC Dial PJSIP/9999\r\nHANGUP'
    customers = seed_customers()
    customers[0] = {**customers[0], "name": evil}
    async for s in _stack(redis_url, customers):
        result = await s.call("+8613800138000", "x")
        names = [c.split(b" ")[2] for c in result.commands]
        assert all(c.startswith(b"SET VARIABLE ") for c in result.commands)
        assert len(names) == len(set(names)) == len(result.variables)
        assert b"EXEC" not in b"".join(c for c in result.commands
                                       if not c.startswith(b"SET VARIABLE CALLERID(name)"))
        name = result.variables["CALLERID(name)"]
        assert "\n" not in name
        assert "\r" not in name
        assert name.startswith('Bob" \\')


async def test_only_non_empty_variables_are_sent_route_action_last(stack: Stack) -> None:
    """An unknown caller costs four SET VARIABLE round trips, not one per variable, and
    ROUTE_ACTION is the last one, so it is only there when the decision is complete."""
    result = await stack.call("02150501234", None, did="4008001000")
    names = [c.split(b" ")[2] for c in result.commands]
    assert names == [b"ROUTE_QUEUE", b"ROUTE_RULE", b"ROUTE_REASON", b"ROUTE_ACTION"]


async def test_caller_hanging_up_mid_session(stack: Stack) -> None:
    """Asterisk writing HANGUP at once does not break the handler or the server."""
    result = await stack.call("+8613800138000", "Li Lei", hangup_after_s=0.0)
    assert result.error is None
    again = await stack.call("+8613800138000", "Li Lei")
    assert again.variables["CRM_CUSTOMER_ID"] == "C-1001"


async def test_cached_answer_is_fast_and_skips_the_crm(stack: Stack) -> None:
    """The second call from a number is answered from the cache with no CRM request."""
    await stack.call("13600136000")
    before = len(state_of(stack.crm).requests)
    outcome = await stack.router.decide("13600136000", "4008001000")
    assert outcome.lookup.source in {"lru", "redis"}
    assert len(state_of(stack.crm).requests) == before
    assert outcome.decision.rule == "churn-risk"


async def test_concurrent_calls(stack: Stack) -> None:
    """Fifty simultaneous calls all get routed."""
    numbers = ["+8613800138000", "13900139000", "02150501234", "13600136000", "anonymous"]
    results = await asyncio.gather(*(stack.call(numbers[i % 5]) for i in range(50)))
    assert all("ROUTE_ACTION" in r.variables for r in results)


async def test_explain_dict_has_the_documented_keys(stack: Stack) -> None:
    """The explain object carries number, customer, rule, variables and the trace."""
    from dialplan.explain import format_text, outcome_to_dict

    outcome = await stack.router.decide("138 0013 8000", "4008001000")
    data = outcome_to_dict(outcome)
    assert {"number", "customer", "rule", "variables", "trace", "lookup"} <= set(data)
    assert data["number"]["e164"] == "+8613800138000"
    assert data["customer"]["id"] == "C-1001"
    assert data["rule"] == "vip-owner"
    assert data["trace"][0]["rule"] == "blocked"
    assert not data["trace"][0]["matched"]
    json.dumps(data)
    text = format_text(outcome)
    assert "MATCH vip-owner" in text
    assert "ROUTE_QUEUE=vip" in text


def agi_sessions(outcome: str) -> float:
    from router.metrics import REGISTRY

    return REGISTRY.get_sample_value("callroute_agi_sessions_total", {"outcome": outcome}) or 0.0


async def test_asterisk_that_stops_answering_is_a_timeout_not_ok(stack: Stack) -> None:
    """An Asterisk that sends the environment and then answers no SET VARIABLE: the route
    handler's session ends at the session deadline (not after command_timeout_s per
    variable) and counts as outcome="timeout", not "ok"."""
    agi = AgiServer(stack.settings.agi.model_copy(update={"port": 0, "session_timeout_s": 0.6}))
    agi.route("route", make_route_handler(stack.router))
    await agi.start()
    try:
        ok, timeouts = agi_sessions("ok"), agi_sessions("timeout")
        reader, writer = await asyncio.open_connection("127.0.0.1", agi.port)
        started = asyncio.get_running_loop().time()
        writer.write(build_environment("13800138000", "Li Lei", "4008001000", port=agi.port))
        async with asyncio.timeout(5):
            got = await reader.read()  # until the server closes
        elapsed = asyncio.get_running_loop().time() - started
        writer.close()
        assert got.startswith(b"SET VARIABLE ")
        assert got.count(b"\n") == 1  # the first command, never answered
        assert 0.5 <= elapsed < 1.2
        await wait_for(lambda: agi_sessions("timeout") > timeouts, 5)
        assert agi_sessions("timeout") == timeouts + 1
        assert agi_sessions("ok") == ok
    finally:
        await agi.stop(1.0)
