"""CachedLookup over the real REST connector and the sample CRM (its fault injection)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from router.crm.config import CrmSettings, sample_crm_section
from router.crm.rest import RestConnector
from router.lookup.breaker import State
from router.metrics import REGISTRY
from router.samplecrm import SampleCrm, make_app, seed_customers, start_sample_crm, state_of
from tests.router.lookup.cache_crm import make_lookup, num

LI_LEI = "+8613800138000"

pytestmark = pytest.mark.usefixtures("no_gc")


@dataclass
class Sample:
    """The running sample CRM, its state and a connector pointed at it."""

    runner: web.AppRunner
    state: SampleCrm
    connector: RestConnector

    def lookups(self) -> int:
        """Lookup requests the CRM received."""
        return sum(1 for r in self.state.requests if r.path == "/api/customers")


@pytest.fixture
async def sample() -> AsyncIterator[Sample]:
    """Sample CRM on loopback (no artificial delays) and a connector with a 0.2 s timeout."""
    app = make_app(seed_customers(), token="demo-token", delays={})
    runner, url = await start_sample_crm(app=app)
    section = sample_crm_section(url)
    section["timeout_s"] = 0.2
    connector = RestConnector(CrmSettings.model_validate(section))
    yield Sample(runner, state_of(app), connector)
    await connector.aclose()
    await runner.cleanup()


def crm_errors(kind: str) -> float:
    """callroute_crm_errors{op="lookup",kind}."""
    labels = {"op": "lookup", "kind": kind}
    return REGISTRY.get_sample_value("callroute_crm_errors_total", labels) or 0.0


async def test_found_and_cached(sample: Sample, redis: aioredis.Redis) -> None:
    """A known caller is found through the connector once, then served from the cache."""
    lookup = make_lookup(sample.connector, redis)
    first = await lookup.find(num("13800138000"), timeout_s=1)
    assert (first.source, first.customer and first.customer.id) == ("crm", "C-1001")
    second = await lookup.find(num(LI_LEI), timeout_s=1)
    assert second.source == "lru"
    assert sample.lookups() == 1


async def test_faults_are_classified_and_counted_once(
    sample: Sample, redis: aioredis.Redis
) -> None:
    """Each injected fault is a classified error result, counted exactly once in
    callroute_crm_errors{op="lookup",kind} (by the connector, not again by the cache)."""
    cases = [({"kind": "status", "status": 503}, "5xx"),
             ({"kind": "status", "status": 401}, "4xx"),
             ({"kind": "drop"}, "unavailable"),
             ({"kind": "bad_json"}, "bad_json"),
             ({"kind": "wrong_shape"}, "mapping"),
             ({"kind": "delay", "delay_s": 0.4}, "timeout")]
    lookup = make_lookup(sample.connector, redis, breaker_failures=100)
    for fault, kind in cases:
        sample.state.faults.clear()
        sample.state.faults.add(path="/api/customers", **fault)  # type: ignore[arg-type]
        before = crm_errors(kind)
        result = await lookup.find(num(LI_LEI), timeout_s=1)
        assert (result.source, result.error) == ("error", kind), fault
        assert crm_errors(kind) == before + 1, fault
    await lookup.aclose()


async def test_rate_limit_with_retry_after_pauses_without_opening_breaker(
    sample: Sample, redis: aioredis.Redis
) -> None:
    """429 with Retry-After: 7 pauses the CRM for 7 s in the connector's rate gate (over
    its 5 s queue bound, so later lookups are refused unsent) and leaves the circuit
    closed: the CRM received one request."""
    sample.state.faults.add("status", path="/api/customers", status=429, retry_after="7")
    lookup = make_lookup(sample.connector, redis, breaker_cooldown_s=1)
    assert (await lookup.find(num(LI_LEI), timeout_s=1)).error == "429"
    assert lookup.breaker.state is State.CLOSED
    assert sample.connector.http.gate.pause_left > 6.5
    assert (await lookup.find(num("+8613900139000"), timeout_s=1)).error == "429"
    assert sample.lookups() == 1
    assert lookup.breaker.state is State.CLOSED


async def test_single_flight_and_deadline_against_sample_crm(
    sample: Sample, redis: aioredis.Redis
) -> None:
    """100 concurrent callers from one number behind a stalled CRM: every find() is back
    by its 50 ms deadline and the CRM received one request (after one warm-up lookup:
    the connector's first request builds its HTTP session and TLS context)."""
    lookup = make_lookup(sample.connector, redis)
    await lookup.find(num("+8613900139000"), timeout_s=1)
    sample.state.requests.clear()
    sample.state.faults.add("stall", path="/api/customers")
    callers = [num(LI_LEI) for _ in range(100)]
    start = time.monotonic()
    results = await asyncio.gather(*(lookup.find(n, timeout_s=0.05) for n in callers))
    took = time.monotonic() - start
    await lookup.aclose()
    assert took < 0.08
    assert {r.source for r in results} == {"deadline"}
    assert sample.lookups() == 1
