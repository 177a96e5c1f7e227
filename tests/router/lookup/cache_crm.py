"""A small CRM for the cache/lookup tests: a real aiohttp server on loopback, and a
:class:`CustomerDirectory` that talks real HTTP to it.

The server can be told to be slow, to stall, to fail with 500, to rate-limit (429 with
Retry-After), to drop the connection or to send bad JSON, and it counts the requests it
received, so tests assert what the CRM saw rather than what the client believed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from pydantic import ValidationError

from router.crm.base import ChangedPage, CustomerDirectory
from router.errors import (
    CrmBadResponse,
    CrmClientError,
    CrmMappingError,
    CrmRateLimited,
    CrmServerError,
    CrmTimeout,
    CrmUnavailable,
)
from router.keys import Keys
from router.lookup.cache import redis_client
from router.lookup.cached_lookup import CachedLookup
from router.models import CallerNumber, Customer
from router.phone import normalize
from router.settings import BreakerSettings, CacheSettings, RedisSettings
from tests.waiting import wait_for


@dataclass
class CrmBehaviour:
    """What the server does with the next requests."""

    mode: str = "ok"  # ok | stall | 500 | 429 | drop | badjson | 401 | mapping
    delay_s: float = 0.0
    retry_after: float | None = None
    fail_on_page: int | None = None


@dataclass
class LoopbackCrm:
    """The server's state: customers by E.164, behaviour and request counters."""

    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    behaviour: CrmBehaviour = field(default_factory=CrmBehaviour)
    page_size: int = 2
    lookups: Counter[str] = field(default_factory=Counter)
    active: int = 0
    peak: int = 0
    pages: list[int] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    url: str = ""

    def add(self, e164: str, cid: str, name: str, **extra: Any) -> None:
        """Register a customer reachable at ``e164``."""
        self.customers[e164] = {"id": cid, "name": name, **extra}

    @property
    def total(self) -> int:
        """Lookup requests received so far."""
        return sum(self.lookups.values())

    async def _misbehave(self, request: web.Request) -> web.StreamResponse | None:
        b = self.behaviour
        if b.delay_s:
            await asyncio.sleep(b.delay_s)
        if b.mode == "stall":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), 30)
            return web.Response(status=503)
        if b.mode == "500":
            return web.Response(status=500, text="boom")
        if b.mode == "401":
            return web.Response(status=401, text="who are you")
        if b.mode == "429":
            headers = {"Retry-After": f"{b.retry_after:g}"} if b.retry_after is not None else {}
            return web.Response(status=429, headers=headers)
        if b.mode == "badjson":
            return web.Response(status=200, text="{not json", content_type="application/json")
        if b.mode == "mapping":
            return web.json_response({"customer": {"name": "no id"}})
        if b.mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=599)
        return None

    async def lookup(self, request: web.Request) -> web.StreamResponse:
        """GET /customers?phone=E164."""
        phone = request.query.get("phone", "")
        self.lookups[phone] += 1
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            bad = await self._misbehave(request)
        finally:
            self.active -= 1
        if bad is not None:
            return bad
        record = self.customers.get(phone)
        if record is None:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response({"customer": record})

    async def changes(self, request: web.Request) -> web.StreamResponse:
        """GET /changes?cursor=N: ``page_size`` customers per page, cursor = page number."""
        page = int(request.query.get("cursor") or 0)
        self.pages.append(page)
        if self.behaviour.fail_on_page == page:
            return web.Response(status=500, text="page failed")
        phones = sorted(self.customers)
        chunk = phones[page * self.page_size:(page + 1) * self.page_size]
        more = (page + 1) * self.page_size < len(phones)
        body = {
            "entries": [{"customer": self.customers[p], "numbers": [p]} for p in chunk],
            "next": str(page + 1) if more else None,
        }
        return web.json_response(body)

    async def start(self) -> LoopbackCrm:
        """Listen on 127.0.0.1, a free port."""
        app = web.Application()
        app.router.add_get("/customers", self.lookup)
        app.router.add_get("/changes", self.changes)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def close(self) -> None:
        """Release stalled handlers and stop."""
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


class HttpDirectory:
    """A :class:`CustomerDirectory` over real HTTP to :class:`LoopbackCrm`."""

    def __init__(self, base_url: str, timeout_s: float = 2.0) -> None:
        self.base_url = base_url
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def _get(self, path: str, params: dict[str, str]) -> Any:
        try:
            async with self.session.get(self.base_url + path, params=params) as resp:
                text = await resp.text()
                status = resp.status
                retry = resp.headers.get("Retry-After")
        except TimeoutError as exc:
            raise CrmTimeout("CRM did not answer in time") from exc
        except aiohttp.ClientError as exc:
            raise CrmUnavailable(f"CRM unreachable: {exc}") from exc
        if status == 404:
            return None
        if status == 429:
            raise CrmRateLimited("rate limited", retry_after=float(retry) if retry else None)
        if status >= 500:
            raise CrmServerError(f"CRM said {status}", status=status)
        if status >= 400:
            raise CrmClientError(f"CRM said {status}", status=status)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise CrmBadResponse("not JSON") from exc

    async def find_by_number(self, number: CallerNumber) -> Customer | None:
        """GET /customers?phone=..."""
        assert number.e164 is not None
        body = await self._get("/customers", {"phone": number.e164})
        if body is None:
            return None
        try:
            return Customer.model_validate(body["customer"])
        except (KeyError, TypeError, ValidationError) as exc:
            raise CrmMappingError("customer does not fit") from exc

    async def changed_since(self, cursor: str | None) -> ChangedPage:
        """GET /changes?cursor=..."""
        body = await self._get("/changes", {"cursor": cursor or "0"})
        entries = [(Customer.model_validate(e["customer"]), list(e["numbers"]))
                   for e in body["entries"]]
        return ChangedPage(entries=entries, next_cursor=body["next"])

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self.session.close()


# --- shared test helpers ------------------------------------------------------------------

class FakeClock:
    """A wall clock the test moves by hand (entry ages, breaker cooldown)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


KEYS = Keys(prefix="callroute:", secret=b"test-secret")


def num(raw: str) -> CallerNumber:
    """A caller number normalised for region CN."""
    return normalize(raw, "CN")


def make_lookup(
    directory: CustomerDirectory,
    redis: aioredis.Redis,
    *,
    clock: FakeClock | None = None,
    redis_settings: RedisSettings | None = None,
    **cache: Any,
) -> CachedLookup:
    """A CachedLookup with test-friendly settings (``cache`` overrides CacheSettings)."""
    breaker = {k[8:]: cache.pop(k) for k in list(cache) if k.startswith("breaker_")}
    return CachedLookup(
        directory, redis, KEYS,
        CacheSettings(**{"positive_ttl_s": 60, "negative_ttl_s": 10, "stale_max_age_s": 600,
                         **cache}),
        BreakerSettings(**{"failures": 3, "cooldown_s": 10, **breaker}),
        redis_settings=redis_settings or RedisSettings(down_backoff_s=0.2),
        clock=clock,
    )


@pytest.fixture(name="crm")
async def crm_fixture() -> AsyncIterator[LoopbackCrm]:
    """A running LoopbackCrm with three known customers."""
    server = LoopbackCrm()
    server.add("+8613800138000", "C1", "Alice", tier="gold")
    server.add("+8613900139000", "C2", "Bob")
    server.add("+8613700137000", "C2", "Bob")
    await server.start()
    yield server
    await server.close()


@pytest.fixture(name="directory")
async def directory_fixture(crm: LoopbackCrm) -> AsyncIterator[HttpDirectory]:
    """An HttpDirectory pointed at ``crm`` (1 s client timeout)."""
    client = HttpDirectory(crm.url, timeout_s=1.0)
    yield client
    await client.aclose()


@pytest.fixture(name="redis")
async def redis_fixture(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the shared, flushed test Redis with the production timeouts."""
    client = redis_client(RedisSettings(url=redis_url))
    yield client
    await client.aclose()


@pytest.fixture(name="no_gc")
def no_gc_fixture() -> Iterator[None]:
    """No cyclic GC during the test: a full collection of the pytest process takes 40-90 ms,
    which would make the deadline assertions (budget + 20 ms) measure the collector.
    (The service should ``gc.freeze()`` after start-up for the same reason.)"""
    gc.collect()
    gc.disable()
    yield
    gc.enable()


async def eventually(check: Callable[[], bool], limit_s: float = 3.0) -> None:
    """Wait (bounded) until ``check()`` holds; fail the test if it never does."""
    await wait_for(check, limit_s)


async def listening(*lookups: CachedLookup) -> None:
    """Start the lookups' feeds and wait until each is subscribed."""
    for lookup in lookups:
        lookup.cache.feed.start()
    await eventually(lambda: all(lk.cache.feed.since is not None for lk in lookups))
