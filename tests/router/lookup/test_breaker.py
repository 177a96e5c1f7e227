"""The CRM circuit breaker: the state machine alone, and in front of a real loopback CRM."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from router.errors import (
    CrmBadResponse,
    CrmClientError,
    CrmMappingError,
    CrmRateLimited,
    CrmServerError,
    CrmTimeout,
    CrmUnavailable,
)
from router.lookup.breaker import CircuitBreaker, State
from router.metrics import REGISTRY
from tests.router.lookup.cache_crm import FakeClock, HttpDirectory, LoopbackCrm, make_lookup, num

ALICE = "+8613800138000"
BOB = "+8613900139000"
NUMBERS = [f"+86138{i:08d}" for i in range(20)]

pytestmark = pytest.mark.usefixtures("no_gc")


def gauge() -> float:
    """The callroute_breaker_open gauge."""
    return REGISTRY.get_sample_value("callroute_breaker_open") or 0.0


def test_opens_after_consecutive_failures_and_half_opens_with_one_probe() -> None:
    """N consecutive CRM-side failures open it; after cooldown exactly one probe passes;
    success closes it. The gauge follows (1 open, 0.5 half-open, 0 closed)."""
    clock = FakeClock()
    breaker = CircuitBreaker(3, 10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure(CrmServerError("x", status=502))
    assert breaker.state is State.CLOSED
    assert breaker.allow()
    breaker.failure(CrmTimeout("slow"))
    assert breaker.state is State.OPEN
    assert gauge() == 1.0
    assert not breaker.allow()
    clock.advance(9.9)
    assert not breaker.allow()
    clock.advance(0.2)
    assert breaker.allow()  # the probe
    assert breaker.state is State.HALF_OPEN
    assert gauge() == 0.5
    assert not breaker.allow()  # only one probe at a time
    breaker.success()
    assert breaker.state is State.CLOSED
    assert gauge() == 0.0
    assert breaker.allow()


def test_failed_probe_reopens_for_a_full_cooldown() -> None:
    """A half-open probe that fails re-opens the circuit at once."""
    clock = FakeClock()
    breaker = CircuitBreaker(1, 5, clock=clock)
    breaker.allow()
    breaker.failure(CrmUnavailable("refused"))
    clock.advance(5)
    assert breaker.allow()
    breaker.failure(CrmBadResponse("garbage"))
    assert breaker.state is State.OPEN
    clock.advance(4.9)
    assert not breaker.allow()


def test_success_resets_the_consecutive_count() -> None:
    """Failures must be consecutive: a success in between starts the count again."""
    breaker = CircuitBreaker(3, 5, clock=FakeClock())
    for _ in range(5):
        breaker.failure(CrmServerError("x", status=500))
        breaker.failure(CrmServerError("x", status=500))
        breaker.success()
    assert breaker.state is State.CLOSED


def test_only_crm_side_failures_count() -> None:
    """4xx and mapping errors are our side's fault: they never open the circuit."""
    breaker = CircuitBreaker(2, 5, clock=FakeClock())
    for _ in range(10):
        assert breaker.allow()
        breaker.failure(CrmClientError("401", status=401))
        breaker.failure(CrmMappingError("no id"))
    assert breaker.state is State.CLOSED


def test_rate_limit_never_opens_the_circuit() -> None:
    """A 429 is the CRM asking us to slow down, not failing: any number of them, with or
    without Retry-After, leaves the circuit closed (the connector's rate gate paces)."""
    breaker = CircuitBreaker(2, 10, clock=FakeClock())
    for _ in range(10):
        assert breaker.allow()
        breaker.failure(CrmRateLimited("slow down", retry_after=30))
        breaker.failure(CrmRateLimited("slow down"))
    assert breaker.state is State.CLOSED
    assert breaker.consecutive == 0


def test_released_probe_frees_the_slot() -> None:
    """A probe that ends with no outcome (cancelled) lets the next caller probe."""
    clock = FakeClock()
    breaker = CircuitBreaker(1, 1, clock=clock)
    breaker.failure(CrmTimeout("t"))
    clock.advance(1)
    assert breaker.allow()
    breaker.release()
    assert breaker.allow()


async def test_lookup_breaker_stops_asking_a_failing_crm(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """End to end: 3 failures open the circuit; later calls get error/circuit_open without
    a CRM request; after the cooldown one probe goes out, and its success closes it."""
    clock = FakeClock()
    lookup = make_lookup(directory, redis, clock=clock, breaker_failures=3, breaker_cooldown_s=10)
    crm.behaviour.mode = "500"
    for n in NUMBERS[:3]:
        assert (await lookup.find(num(n), timeout_s=1)).error == "5xx"
    for n in NUMBERS[3:8]:
        result = await lookup.find(num(n), timeout_s=1)
        assert (result.source, result.error) == ("error", "circuit_open")
    assert crm.total == 3
    clock.advance(10)
    crm.behaviour.mode = "ok"
    crm.behaviour.delay_s = 0.05
    results = await asyncio.gather(*(lookup.find(num(n), timeout_s=1) for n in NUMBERS[8:12]))
    assert sorted(r.error or r.source for r in results) == ["circuit_open"] * 3 + ["crm"]
    assert crm.total == 4  # exactly one probe
    assert lookup.breaker.state is State.CLOSED
    assert (await lookup.find(num(NUMBERS[12]), timeout_s=1)).source == "crm"
    await lookup.aclose()


async def test_lookup_failed_probe_reopens(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """A failing half-open probe re-opens the circuit: the next calls send nothing."""
    clock = FakeClock()
    lookup = make_lookup(directory, redis, clock=clock, breaker_failures=1, breaker_cooldown_s=5)
    crm.behaviour.mode = "badjson"
    await lookup.find(num(NUMBERS[0]), timeout_s=1)
    clock.advance(5)
    assert (await lookup.find(num(NUMBERS[1]), timeout_s=1)).error == "bad_json"
    assert (await lookup.find(num(NUMBERS[2]), timeout_s=1)).error == "circuit_open"
    assert crm.total == 2
    await lookup.aclose()


async def test_unknown_callers_do_not_open_the_circuit(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """'No such customer' is an answer: many unknown callers keep the circuit closed."""
    lookup = make_lookup(directory, redis, breaker_failures=2)
    for n in NUMBERS[:6]:
        result = await lookup.find(num(n), timeout_s=1)
        assert (result.source, result.found) == ("crm", False)
    assert lookup.breaker.state is State.CLOSED
    assert crm.total == 6
    await lookup.aclose()


async def test_open_circuit_serves_stale_entries(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """While open, a cached (even stale) customer is still served, marked circuit_open,
    and no refresh is sent."""
    clock = FakeClock()
    lookup = make_lookup(directory, redis, clock=clock, breaker_failures=1,
                         breaker_cooldown_s=100)
    await lookup.find(num(ALICE), timeout_s=1)
    crm.behaviour.mode = "500"
    await lookup.find(num(BOB), timeout_s=1)
    clock.advance(61)
    result = await lookup.find(num(ALICE), timeout_s=1)
    assert (result.source, result.found, result.error) == ("stale", True, "circuit_open")
    assert crm.total == 2
    await lookup.aclose()


async def test_rate_limited_crm_keeps_the_circuit_closed(
    directory: HttpDirectory, crm: LoopbackCrm, redis: aioredis.Redis
) -> None:
    """A real 429 with Retry-After: 30 on every lookup: each caller gets error 429, the
    circuit stays closed, and once the CRM answers again the next lookup goes through."""
    clock = FakeClock()
    lookup = make_lookup(directory, redis, clock=clock, breaker_failures=2, breaker_cooldown_s=10)
    crm.behaviour.mode = "429"
    crm.behaviour.retry_after = 30
    for number in (ALICE, BOB, ALICE):
        assert (await lookup.find(num(number), timeout_s=1)).error == "429"
    assert lookup.breaker.state is State.CLOSED
    crm.behaviour.mode = "ok"
    assert (await lookup.find(num(BOB), timeout_s=1)).source == "crm"
    await lookup.aclose()
