"""The admin HTTP API over real HTTP on loopback."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router import metrics
from router.admin import AdminDeps, make_admin_app
from router.rules.presence import Presence
from tests.redis_server import RedisServer


async def _serve(app: web.Application) -> AsyncIterator[str]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def api() -> AsyncIterator[tuple[str, AdminDeps]]:
    """An admin API with a failing and a passing readiness check."""
    presence = Presence()
    presence.update("PJSIP/7001", "INUSE")

    async def ok() -> bool:
        return True

    async def explain(number: str, did: str | None, at: datetime | None) -> Mapping[str, Any]:
        return {"number": number, "did": did, "at": at.isoformat() if at else None}

    async def outbox() -> Mapping[str, Any]:
        return {"depth": 3}

    deps = AdminDeps(checks={"redis": ok}, explain=explain, presence=presence,
                     outbox_status=outbox)
    async for url in _serve(make_admin_app(deps)):
        yield url, deps


async def test_health_ready_and_metrics(api: tuple[str, AdminDeps]) -> None:
    """/healthz is 200; /readyz reflects checks; /metrics serves Prometheus text."""
    url, deps = api
    metrics.AGI_REJECTED.inc()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["checks"] == {"redis": True}

        async def broken() -> bool:
            raise RuntimeError("down")

        deps.checks["ami"] = broken
        async with http.get(f"{url}/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"] == {"redis": True, "ami": False}
        async with http.get(f"{url}/metrics") as resp:
            text = await resp.text()
            assert resp.status == 200
            assert "callroute_agi_rejected_total" in text


async def test_explain_presence_outbox(api: tuple[str, AdminDeps]) -> None:
    """The JSON endpoints pass parameters through and validate them."""
    url, _ = api
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/api/explain", params={"number": "13800138000",
                                                           "did": "4008001000",
                                                           "at": "2026-11-23T10:00:00+08:00"}) as r:
            body = await r.json()
            assert body == {"number": "13800138000", "did": "4008001000",
                            "at": "2026-11-23T10:00:00+08:00"}
        async with http.get(f"{url}/api/explain") as r:
            assert r.status == 400
        async with http.get(f"{url}/api/explain", params={"number": "1", "at": "noon"}) as r:
            assert r.status == 400
        async with http.get(f"{url}/api/presence") as r:
            assert await r.json() == {"PJSIP/7001": "INUSE"}
        async with http.get(f"{url}/api/outbox") as r:
            assert await r.json() == {"depth": 3}


async def test_token_protects_everything_but_health() -> None:
    """With a token, API routes need the bearer token; /healthz stays open."""
    async for url in _serve(make_admin_app(AdminDeps(token="t0k"))):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/healthz") as r:
                assert r.status == 200
            async with http.get(f"{url}/metrics") as r:
                assert r.status == 401
            async with http.get(f"{url}/metrics", headers={"Authorization": "Bearer bad"}) as r:
                assert r.status == 401
            async with http.get(f"{url}/metrics", headers={"Authorization": "Bearer t0k"}) as r:
                assert r.status == 200
            async with http.get(f"{url}/api/outbox", headers={"Authorization": "Bearer t0k"}) as r:
                assert r.status == 503


async def test_redis_down_is_a_503_with_one_line(own_redis: RedisServer,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """POST /api/outbox/retry while the redis-server is stopped answers 503 with what
    failed and logs one warning line, not a 500 with a traceback; with Redis back the
    same request works."""
    from redis.asyncio import Redis

    from router.keys import Keys
    from router.records.outbox_cli import retry_dead

    redis = Redis.from_url(own_redis.url, socket_connect_timeout=0.5)

    async def retry(wanted: list[str] | None) -> list[str]:
        return await retry_dead(redis, Keys(), wanted)

    own_redis.stop()
    try:
        async for url in _serve(make_admin_app(AdminDeps(outbox_retry=retry))):
            async with aiohttp.ClientSession() as http:
                with caplog.at_level(logging.WARNING):
                    async with http.post(f"{url}/api/outbox/retry", json={}) as r:
                        assert r.status == 503
                        body = await r.json()
                assert body["error"] == "unavailable"
                assert "ConnectionError" in body["detail"]
                problems = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
                assert len(problems) == 1
                assert problems[0].exc_info is None
                assert "/api/outbox/retry" in problems[0].getMessage()
                own_redis.start()
                async with http.post(f"{url}/api/outbox/retry", json={}) as r:
                    assert r.status == 200
                    assert await r.json() == {"retried": []}
    finally:
        await redis.aclose()
