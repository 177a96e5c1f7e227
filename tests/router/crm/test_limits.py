"""The CRM's rate limits: every header style real CRMs use, read from loopback answers;
the gate pauses, queues and holds back; a burst of new callers never opens the breaker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from router.crm.config import CrmSettings
from router.crm.http import CrmHttp
from router.crm.limits import Limits, RateGate, RateLimitSettings, read_limits
from router.crm.rest import RestConnector
from router.errors import CrmRateLimited
from router.lookup.breaker import State
from router.lookup.cache import CacheEntry
from router.metrics import REGISTRY
from router.models import Customer
from tests.crm_server import serving
from tests.router.lookup.cache_crm import make_lookup, num, redis_fixture  # noqa: F401

NOW = 1_800_000_000.0


def test_read_limits_of_each_style() -> None:
    """Retry-After (seconds, HTTP-date), X-RateLimit-* (reset as delta, epoch s, epoch
    ms), RateLimit-*, HubSpot's rolling window and daily quota, Salesforce's org quota."""
    date = format_datetime(datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=4),
                           usegmt=True)
    cases: list[tuple[dict[str, str], Limits]] = [
        ({"Retry-After": "3"}, Limits(retry_after=3.0, style="retry-after")),
        ({"Retry-After": date}, Limits(retry_after=4.0, style="retry-after")),
        ({"X-RateLimit-Limit": "80", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "2"},
         Limits(remaining=0, limit=80, reset_in=2.0, style="ratelimit")),
        ({"X-RateLimit-Remaining": "5", "X-RateLimit-Reset": str(int(NOW + 30))},
         Limits(remaining=5, reset_in=30.0, style="ratelimit")),
        ({"RateLimit-Remaining": "0", "RateLimit-Reset": str(int((NOW + 1.5) * 1000))},
         Limits(remaining=0, reset_in=1.5, style="ratelimit")),
        ({"X-HubSpot-RateLimit-Max": "100", "X-HubSpot-RateLimit-Remaining": "0",
          "X-HubSpot-RateLimit-Interval-Milliseconds": "10000"},
         Limits(remaining=0, limit=100, reset_in=10.0, style="hubspot")),
        ({"X-HubSpot-RateLimit-Remaining": "40", "X-HubSpot-RateLimit-Secondly-Remaining": "0"},
         Limits(remaining=0, reset_in=1.0, style="hubspot")),
        ({"X-HubSpot-RateLimit-Remaining": "40", "X-HubSpot-RateLimit-Daily-Remaining": "0"},
         Limits(remaining=40, exhausted=True, style="hubspot")),
        ({"Sforce-Limit-Info": "api-usage=18/5000"},
         Limits(remaining=4982, limit=5000, style="salesforce")),
        ({"Sforce-Limit-Info": "api-usage=5000/5000; per-app-api-usage=3/250(appName=x)"},
         Limits(remaining=0, limit=5000, exhausted=True, style="salesforce")),
        ({}, Limits()),
        ({"X-RateLimit-Remaining": "soon"}, Limits()),
    ]
    for headers, want in cases:
        assert read_limits(headers, NOW) == want, headers
    settings = RateLimitSettings(default_retry_s=0.7, exhausted_pause_s=120)
    assert Limits(remaining=3).wait(settings, limited=False) is None
    assert Limits(remaining=0, reset_in=2).wait(settings, limited=False) == 2
    assert Limits().wait(settings, limited=True) == 0.7
    assert Limits(exhausted=True).wait(settings, limited=False) == 120
    assert Limits(retry_after=99999).wait(settings, limited=True) == settings.max_pause_s


@pytest.mark.parametrize(("headers", "limited", "want"), [
    ({"Retry-After": "0"}, True, 0.5),
    ({"Retry-After": "-30"}, True, 0.5),
    ({"Retry-After": "Wed, 01 Jan 2020 00:00:00 GMT"}, True, 0.5),
    ({"Retry-After": "999999"}, True, 3600.0),
    ({"Retry-After": "1e400"}, True, 3600.0),
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "0"}, True, 0.5),
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(NOW - 60))}, True, 0.5),
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "999999"}, False, 3600.0),
    ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int((NOW + 9e6) * 1000))},
     False, 3600.0),
    ({"X-HubSpot-RateLimit-Remaining": "0",
      "X-HubSpot-RateLimit-Interval-Milliseconds": "0"}, True, 0.5),
])
def test_a_pause_from_any_header_is_between_the_floor_and_the_cap(
        headers: dict[str, str], limited: bool, want: float) -> None:
    """A rate limit saying 0, a negative value or a past date pauses min_pause_s (the
    reads are not sent again at once, in a loop); an absurd Retry-After or reset (days,
    an epoch years ahead) pauses max_pause_s, not days."""
    settings = RateLimitSettings()
    assert read_limits(headers, NOW).wait(settings, limited=limited) == want


def test_the_floor_cannot_be_set_over_the_cap() -> None:
    """crm.limits.min_pause_s over max_pause_s is a config error naming both."""
    with pytest.raises(ValueError, match="min_pause_s 10 is over max_pause_s 5"):
        RateLimitSettings(min_pause_s=10, max_pause_s=5)


async def test_a_crm_answering_retry_after_0_in_a_loop_is_not_hammered() -> None:
    """A CRM that answers every lookup 429 with Retry-After: 0: the lookup is sent again
    only after min_pause_s each time, until its queue bound (1.2 s): 4 requests, not a
    tight loop of hundreds."""
    crm = LimitedCrm("retry-after", limited=10_000, pause_s=0)
    async with limited_crm(crm):
        http = CrmHttp(settings(crm.url, lookup_queue_s=1.2))
        try:
            with pytest.raises(CrmRateLimited) as limited:
                await http.request("lookup", "GET", "/api/customers",
                                   params={"phone": "+8613800138000"})
        finally:
            await http.aclose()
    assert len(crm.arrivals) == 4
    gaps = [b - a for a, b in zip(crm.arrivals, crm.arrivals[1:], strict=False)]
    assert min(gaps) >= 0.45
    assert limited.value.retry_after == 0.5


async def test_an_absurd_retry_after_holds_requests_for_the_cap_not_for_days() -> None:
    """Retry-After: 999999 on a post: CrmRateLimited carries max_pause_s (the outbox
    schedules the record's retry then), and a lookup meanwhile is held back at once,
    unsent (the caller gets the default route within its deadline)."""
    crm = LimitedCrm("retry-after", limited=1, pause_s=999999)
    async with limited_crm(crm):
        http = CrmHttp(settings(crm.url, max_pause_s=120))
        try:
            with pytest.raises(CrmRateLimited) as limited:
                await http.request("activity", "POST", "/api/activities", json_body={})
            started = time.monotonic()
            with pytest.raises(CrmRateLimited, match="held back"):
                await http.request("lookup", "GET", "/api/customers")
            assert time.monotonic() - started < 0.1
        finally:
            await http.aclose()
    assert limited.value.retry_after == 120
    assert 119 <= http.gate.pause_left <= 120
    assert len(crm.arrivals) == 1


@dataclass
class LimitedCrm:
    """A loopback CRM whose first ``limited`` answers are rate limits in one style."""

    style: str
    limited: int = 1
    pause_s: float = 0.5
    url: str = ""
    arrivals: list[float] = field(default_factory=list)

    def limit_answer(self) -> web.Response:
        p = self.pause_s
        if self.style == "retry-after":
            return web.json_response({"error": "rate"}, status=429,
                                     headers={"Retry-After": f"{p:g}"})
        if self.style == "retry-after-date":
            when = datetime.now(UTC) + timedelta(seconds=p)
            return web.json_response({"error": "rate"}, status=429,
                                     headers={"Retry-After": format_datetime(when, usegmt=True)})
        if self.style == "x-ratelimit":  # Pipedrive: reset in seconds from now
            return web.json_response(
                {"success": False, "error": "Request over limit"}, status=429,
                headers={"X-RateLimit-Limit": "80", "X-RateLimit-Remaining": "0",
                         "X-RateLimit-Reset": f"{p:g}"})
        if self.style == "hubspot":  # no Retry-After: the window says how long
            return web.json_response(
                {"status": "error", "message": "You have reached your secondly limit.",
                 "errorType": "RATE_LIMIT", "policyName": "SECONDLY"}, status=429,
                headers={"X-HubSpot-RateLimit-Max": "10", "X-HubSpot-RateLimit-Remaining": "0",
                         "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(p * 1000))})
        # Salesforce: the org's quota is used up -> 403 REQUEST_LIMIT_EXCEEDED
        return web.json_response(
            [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}],
            status=403, headers={"Sforce-Limit-Info": "api-usage=5001/5000"})

    async def handle(self, request: web.Request) -> web.Response:
        self.arrivals.append(time.monotonic())
        if self.limited > 0:
            self.limited -= 1
            return self.limit_answer()
        phone = request.query.get("phone", "")
        return web.json_response({"results": [{"id": f"C{phone[-4:]}", "name": "Known"}]})


@asynccontextmanager
async def limited_crm(crm: Any) -> AsyncIterator[Any]:
    """Serve ``crm.handle`` for every path on 127.0.0.1."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", crm.handle)
    async with serving(app) as crm.url:
        yield crm


def settings(url: str, **limits: Any) -> CrmSettings:
    """A connector for the loopback CRM with ``crm.limits`` overrides."""
    return CrmSettings.model_validate({"base_url": url, "limits": {
        "exhausted_pause_s": 0.5, **limits}})


STYLES = ["retry-after", "retry-after-date", "x-ratelimit", "hubspot", "salesforce"]


@pytest.mark.parametrize("style", STYLES)
async def test_a_rate_limited_lookup_waits_for_the_reset_and_goes_through(style: str) -> None:
    """Whatever the header style, a lookup that is rate limited is sent again only after
    the pause the CRM named, and then answers: two requests, the second one at least
    the pause after the first."""
    crm = LimitedCrm(style, pause_s=0.6 if style != "retry-after-date" else 1.0)
    async with limited_crm(crm):
        http = CrmHttp(settings(crm.url))
        try:
            resp = await http.request("lookup", "GET", "/api/customers",
                                      params={"phone": "+8613800138000"})
        finally:
            await http.aclose()
    assert resp.body["results"][0]["name"] == "Known"
    assert len(crm.arrivals) == 2
    gap = crm.arrivals[1] - crm.arrivals[0]
    floor = {"retry-after-date": 0.0, "salesforce": 0.45}.get(style, crm.pause_s - 0.05)
    assert gap >= floor, (style, gap)


@pytest.mark.parametrize("style", STYLES)
async def test_a_post_is_not_resent_and_carries_the_wait(style: str) -> None:
    """A rate-limited post is not sent again by the connector (the outbox retries it):
    CrmRateLimited carries the CRM's wait, and the gate pauses the other requests (a
    lookup that would wait longer than its queue bound is held back, unsent)."""
    crm = LimitedCrm(style, pause_s=2.0)
    async with limited_crm(crm):
        http = CrmHttp(settings(crm.url, exhausted_pause_s=2.0, lookup_queue_s=1.0))
        try:
            with pytest.raises(CrmRateLimited) as limited:
                await http.request("activity", "POST", "/api/activities", json_body={})
            with pytest.raises(CrmRateLimited, match="held back"):
                await http.request("lookup", "GET", "/api/customers",
                                   params={"phone": "+8613800138000"})
        finally:
            await http.aclose()
    assert len(crm.arrivals) == 1
    assert limited.value.retry_after is not None
    assert 0.9 <= limited.value.retry_after <= 2.0
    assert http.gate.pause_left > 0.5


async def test_a_success_saying_nothing_is_left_pauses_until_the_reset() -> None:
    """A 200 with X-RateLimit-Remaining: 0 and a reset 0.5 s away: the next request waits
    for the reset instead of earning a 429."""
    arrivals: list[float] = []

    async def handle(_: web.Request) -> web.Response:
        arrivals.append(time.monotonic())
        return web.json_response({"results": []}, headers={
            "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "0.5"})

    holder = type("H", (), {"handle": staticmethod(handle), "url": ""})()
    async with limited_crm(holder):
        http = CrmHttp(settings(holder.url))
        try:
            for _ in range(2):
                await http.request("lookup", "GET", "/api/customers")
        finally:
            await http.aclose()
    assert arrivals[1] - arrivals[0] >= 0.45


async def test_lookups_are_paced_at_the_configured_rate() -> None:
    """lookups_per_s 20 with a burst of 5: 15 lookups take at least (15 - 5) / 20 s."""
    gate = RateGate(RateLimitSettings(lookups_per_s=20, lookups_burst=5))
    started = time.monotonic()
    await asyncio.gather(*(gate.admit("lookup") for _ in range(15)))
    assert time.monotonic() - started >= 0.45
    await gate.admit("activity")  # posts are not paced here (the outbox bucket is theirs)


@dataclass
class WindowCrm:
    """A CRM allowing ``limit`` requests per ``window_s`` (fixed windows), HubSpot-style
    headers on every answer, 429 beyond; it knows some customers."""

    limit: int = 10
    window_s: float = 0.5
    url: str = ""
    started: float = field(default_factory=time.monotonic)
    count: dict[int, int] = field(default_factory=dict)
    served: int = 0
    refused: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        slot = int((time.monotonic() - self.started) / self.window_s)
        used = self.count[slot] = self.count.get(slot, 0) + 1
        left = max(0, self.limit - used)
        reset_ms = int(((slot + 1) * self.window_s - (time.monotonic() - self.started)) * 1000)
        headers = {"X-HubSpot-RateLimit-Max": str(self.limit),
                   "X-HubSpot-RateLimit-Remaining": str(left),
                   "X-HubSpot-RateLimit-Interval-Milliseconds": str(max(reset_ms, 1))}
        if used > self.limit:
            self.refused += 1
            return web.json_response({"status": "error", "errorType": "RATE_LIMIT",
                                      "policyName": "TEN_SECONDLY_ROLLING"},
                                     status=429, headers=headers)
        self.served += 1
        await asyncio.sleep(0.005)
        phone = request.query.get("phone", "")
        return web.json_response({"results": [{"id": f"C{phone[-6:]}", "name": f"N{phone[-6:]}"}]},
                                 headers=headers)


def breaker_opened() -> float:
    return REGISTRY.get_sample_value("callroute_breaker_open") or 0.0


@pytest.mark.parametrize("paced", [False, True])
async def test_a_burst_of_new_callers_never_opens_the_breaker(
    redis: aioredis.Redis, paced: bool
) -> None:
    """40 new callers at once against a CRM allowing 10 requests per 0.5 s: the breaker
    never opens (watched on every answer), the lookups queue behind the CRM's limit and
    all 40 customers end up cached; paced at the CRM's rate, the CRM refuses none."""
    crm = WindowCrm()
    numbers = [f"+86138{n:08d}" for n in range(40)]
    async with limited_crm(crm):
        limits = {"lookups_per_s": 18, "lookups_burst": 1} if paced else {}
        connector = RestConnector(settings(crm.url, lookup_queue_s=8, **limits))
        lookup = make_lookup(connector, redis, breaker_failures=2, breaker_cooldown_s=30)
        states: list[State] = []

        async def call(number: str) -> Any:
            result = await lookup.find(num(number), timeout_s=0.3)
            states.append(lookup.breaker.state)
            return result

        try:
            first = await asyncio.gather(*(call(n) for n in numbers))
            await lookup.drain(15)
            second = [await call(n) for n in numbers]
        finally:
            await lookup.aclose()
            await connector.aclose()
    assert set(states) == {State.CLOSED}
    assert {r.error for r in first} <= {None, "deadline"}
    assert all(r.found and r.source in {"lru", "redis"} for r in second)
    assert crm.served == 40
    if paced:
        assert crm.refused == 0


async def test_a_stale_entry_is_served_at_once_while_the_crm_rate_limits(
    redis: aioredis.Redis,
) -> None:
    """A caller whose entry is stale gets it at once (source stale) while the CRM answers
    429; the breaker stays closed."""
    crm = LimitedCrm("retry-after", limited=100, pause_s=30)
    async with limited_crm(crm):
        connector = RestConnector(settings(crm.url))
        clock_now = [time.time()]

        def clock() -> float:
            return clock_now[0]

        lookup = make_lookup(connector, redis, clock=_Clock(clock))
        try:
            number = num("+8613800138000")
            assert number.e164 is not None
            await lookup.cache.put(number.e164, CacheEntry(Customer(id="C9", name="Old"),
                                                           clock()))
            clock_now[0] += 120  # past the 60 s TTL, within stale_max_age_s
            started = time.monotonic()
            result = await lookup.find(number, timeout_s=0.3)
            elapsed = time.monotonic() - started
            await lookup.drain(2)
        finally:
            await lookup.aclose()
            await connector.aclose()
    assert (result.source, result.customer and result.customer.name) == ("stale", "Old")
    assert elapsed < 0.1
    assert lookup.breaker.state is State.CLOSED
    assert len(crm.arrivals) == 1


class _Clock:
    """Adapts a callable to the FakeClock interface make_lookup expects."""

    def __init__(self, fn: Callable[[], float]) -> None:
        self.fn = fn

    def __call__(self) -> float:
        return self.fn()
