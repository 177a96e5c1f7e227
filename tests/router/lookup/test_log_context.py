"""Log lines of the cache's shared background work carry no call id: the invalidation feed,
the coalesced Redis reads and the written-behind writes are started from inside a call's
lookup, but serve every call after it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from router.log import CallContextFilter, bind_call, call_id
from router.lookup.cache import redis_client
from router.settings import RedisSettings
from tests.redis_server import RedisServer
from tests.router.lookup.cache_crm import HttpDirectory, make_lookup, num
from tests.waiting import wait_for as until


class Capture(logging.Handler):
    """Keeps every record with the call id the service's handler would print."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(CallContextFilter())
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, text: str) -> list[tuple[str, str]]:
        """(call id, message) of the records whose message contains ``text``."""
        return [(r.call_id, r.getMessage()) for r in self.records  # type: ignore[attr-defined]
                if text in r.getMessage()]


@pytest.fixture
def capture() -> Iterator[Capture]:
    """Records of the router.lookup loggers, at every level."""
    handler = Capture()
    logger = logging.getLogger("router.lookup")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_shared_cache_work_carries_no_call_id(
    own_redis: RedisServer, directory: HttpDirectory, capture: Capture
) -> None:
    """The feed started by call A's lookup, and the Redis read batch started by call B's,
    log their failures with no call id (not A's or B's), while the lookup's own lines
    inside a call keep that call's id."""
    client = redis_client(RedisSettings(url=own_redis.url))
    lookup = make_lookup(directory, client)
    try:
        with bind_call("call-A"):
            first = await lookup.find(num("13800138000"), timeout_s=1.0)
        assert first.source == "crm"
        await until(lambda: lookup.cache.feed.since is not None)
        await lookup.drain()
        own_redis.stop()
        with bind_call("call-B"):
            await lookup.find(num("13900139000"), timeout_s=1.0)
            assert call_id.get() == "call-B"
        await until(lambda: capture.lines("cache invalidation feed lost"))
        await until(lambda: capture.lines("redis get failed"))
        background = (capture.lines("cache invalidation feed") + capture.lines("redis get")
                      + capture.lines("redis set"))
        assert background
        assert {call for call, _ in background} == {"-"}
    finally:
        await lookup.aclose()
        await client.aclose()
