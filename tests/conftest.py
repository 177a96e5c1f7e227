"""Shared fixtures: a real Redis, the recorded Asterisk traffic."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.redis_server import RedisServer

FIXTURES = Path(__file__).parent / "fixtures" / "asterisk-22"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole run; tests get a flushed database each."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
async def redis_url(redis_server: RedisServer) -> str:
    """URL of the shared test Redis, flushed before the test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    await client.aclose()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which the test may stop and start again."""
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture
def fixtures_dir() -> Path:
    """The recorded Asterisk 22.10.1 traffic (copied from shared/fixtures)."""
    return FIXTURES
