"""A small CRM on loopback for the outbox tests, and a RecordSink doing real HTTP to it.

:class:`FakeCrm` honours ``Idempotency-Key`` on POST /api/activities, /api/leads and
/api/tasks (the same key twice creates one object and answers ``duplicate: true``),
logs every request it receives, and injects faults on demand: HTTP errors (with
headers, e.g. 429 + Retry-After) for the next N requests, a stall on chosen keys
(the object is created, then the answer is held until released), and a slow answer
(``delay_s`` after creating, for every request).
:class:`HttpSink` maps HTTP outcomes to :mod:`router.errors` like a real connector.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from router.crm.base import PostResult
from router.errors import (
    CrmBadResponse,
    CrmClientError,
    CrmRateLimited,
    CrmServerError,
    CrmTimeout,
    CrmUnavailable,
)
from tests.waiting import wait_for

PATHS = {"activities": "call", "leads": "lead", "tasks": "task"}


@dataclass
class Received:
    """One request the CRM received."""

    kind: str
    key: str
    at: float
    body: dict[str, Any]


@dataclass
class FakeCrm:
    """The loopback CRM (start it with :meth:`start`, stop with :meth:`stop`)."""

    port: int = 0
    received: list[Received] = field(default_factory=list)
    created: dict[tuple[str, str], str] = field(default_factory=dict)
    faults: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    kind_faults: dict[str, list[int]] = field(default_factory=dict)
    stall_keys: set[str] = field(default_factory=set)
    delay_s: float = 0.0
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/{kind}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        kind = PATHS.get(request.match_info["kind"])
        key = request.headers.get("Idempotency-Key", "")
        if kind is None or not key:
            return web.json_response({"error": "bad request"}, status=400)
        body = await request.json()
        self.received.append(Received(kind, key, time.monotonic(), body))
        if self.kind_faults.get(kind):
            return web.json_response({"error": "injected"}, status=self.kind_faults[kind].pop(0))
        if self.faults:
            status, headers = self.faults.pop(0)
            return web.json_response({"error": "injected"}, status=status, headers=headers)
        duplicate = (kind, key) in self.created
        if not duplicate:
            self.created[(kind, key)] = f"{kind}-{next(self._ids)}"
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if key in self.stall_keys:
            self.stalled.set()
            await self.release.wait()
        return web.json_response({"id": self.created[(kind, key)], "duplicate": duplicate})

    def count(self, kind: str = "call") -> Counter[str]:
        """Requests received per idempotency key for one kind."""
        return Counter(r.key for r in self.received if r.kind == kind)

    def objects(self, kind: str = "call") -> set[str]:
        """Idempotency keys of the objects created for one kind."""
        return {key for (k, key) in self.created if k == kind}


class HttpSink:
    """A RecordSink posting to :class:`FakeCrm` over real HTTP."""

    def __init__(self, base_url: str, timeout_s: float = 2.0) -> None:
        self.base_url = base_url
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))

    async def _post(self, path: str, record: Mapping[str, Any], key: str) -> PostResult:
        try:
            async with self.session.post(
                f"{self.base_url}/api/{path}", json=dict(record),
                headers={"Idempotency-Key": key},
            ) as resp:
                if resp.status == 429:
                    after = resp.headers.get("Retry-After")
                    raise CrmRateLimited("429", retry_after=float(after) if after else None)
                if resp.status >= 500:
                    raise CrmServerError(f"HTTP {resp.status}", status=resp.status)
                if resp.status >= 400:
                    raise CrmClientError(f"HTTP {resp.status}", status=resp.status)
                try:
                    data = await resp.json()
                except (aiohttp.ContentTypeError, ValueError) as exc:
                    raise CrmBadResponse("not JSON") from exc
        except TimeoutError as exc:
            raise CrmTimeout("timeout") from exc
        except aiohttp.ClientError as exc:
            raise CrmUnavailable(str(exc)) from exc
        return PostResult(remote_id=str(data["id"]), duplicate=bool(data["duplicate"]))

    async def post_call(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        return await self._post("activities", record, idempotency_key)

    async def create_lead(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        return await self._post("leads", record, idempotency_key)

    async def create_task(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        return await self._post("tasks", record, idempotency_key)

    async def aclose(self) -> None:
        await self.session.close()


def outbox_settings(**overrides: Any) -> Any:
    """OutboxSettings with fast test timings (overridable)."""
    from router.settings import OutboxSettings

    values: dict[str, Any] = {
        "backoff_base_s": 0.02, "backoff_max_s": 0.1, "poll_interval_s": 0.02,
        "claim_idle_s": 0.5, "rate_per_s": 10_000.0, "rate_burst": 1000.0,
        "max_attempts": 50, "spool_drain_interval_s": 0.05,
    }
    values.update(overrides)
    return OutboxSettings(**values)


def call_record(n: int | str, **fields: Any) -> dict[str, Any]:
    """A call record like ami.records.CallRecord.model_dump(mode="json")."""
    record: dict[str, Any] = {
        "record_key": f"call-{n}", "linkedid": f"1700000000.{n}", "caller": "+8613800138000",
        "customer_id": "C1", "outcome": "answered", "answered_by_agent": "1001",
        "recording": f"/var/spool/asterisk/monitor/{n}.wav",
    }
    record.update(fields)
    return record


async def wait_until(predicate: Any, limit_s: float = 10.0) -> None:
    """Poll ``predicate()`` until true; the test fails after ``limit_s`` seconds."""
    await wait_for(predicate, limit_s)


class Harness:
    """An Outbox and delivery workers on one Redis and one FakeCrm, cleaned up by close()."""

    def __init__(self, redis_url: str, crm: FakeCrm, spool_dir: Any, **settings: Any) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from router.keys import Keys
        from router.records.outbox import Outbox
        from router.records.spool import Spool

        self.settings = outbox_settings(**settings)
        self.keys = Keys(prefix="t:")
        # a stopped Redis refuses at once; the connect timeout only has to outlast a
        # loaded machine opening dozens of connections at once (0.2 s spooled records)
        self.redis = Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=1.0, socket_connect_timeout=1.0,
            retry=Retry(NoBackoff(), 1),
        )
        self.crm = crm
        self.spool = Spool(spool_dir, max_records=10_000, max_bytes=50_000_000)
        self.outbox = Outbox(self.redis, self.keys, self.settings, self.spool)
        self.sinks: list[HttpSink] = []
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def worker(self, consumer: str = "w1", **overrides: Any) -> Any:
        """A DeliveryWorker (not started) with its own HTTP sink."""
        from router.records.delivery import DeliveryWorker

        sink = HttpSink(self.crm.url, timeout_s=2.0)
        self.sinks.append(sink)
        settings = self.settings.model_copy(update=overrides)
        return DeliveryWorker(self.redis, sink, keys=self.keys, settings=settings,
                              consumer=consumer)

    def start(self, consumer: str = "w1", **overrides: Any) -> Any:
        """Start a worker in the background; returns it."""
        worker = self.worker(consumer, **overrides)
        self.tasks.append(asyncio.create_task(worker.run(self.stop, grace_s=1.0)))
        return worker

    def start_drainer(self) -> None:
        """Run the spool drainer in the background."""
        self.tasks.append(asyncio.create_task(self.outbox.run_drainer(self.stop)))

    async def stop_workers(self) -> None:
        """Stop the background workers and drainer (the harness stays usable)."""
        self.stop.set()
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks), 10)
        self.tasks.clear()
        self.stop = asyncio.Event()

    async def close(self) -> None:
        self.stop.set()
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks), 10)
        for sink in self.sinks:
            await sink.aclose()
        await self.redis.aclose()


@pytest.fixture(name="crm")
async def crm_fixture() -> AsyncIterator[FakeCrm]:
    """A running FakeCrm on loopback."""
    server = FakeCrm()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(name="h")
async def harness_fixture(redis_url: str, crm: FakeCrm, tmp_path: Path) -> AsyncIterator[Harness]:
    """An outbox + worker harness on the test Redis, delivering to ``crm``."""
    harness = Harness(redis_url, crm, tmp_path / "spool")
    yield harness
    await harness.close()
