"""The client-side rate limit towards the CRM (token bucket, shared through Redis)."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from router.records.ratelimit import LocalBucket, TokenBucket


def test_local_bucket_spaces_requests_at_the_rate() -> None:
    """After the burst, each reservation waits 1/rate more; a penalty blocks for its length."""
    bucket = LocalBucket(rate_per_s=10, burst=2)
    waits = [bucket.reserve() for _ in range(5)]
    assert waits[:2] == [0.0, 0.0]
    assert waits[2:] == pytest.approx([0.1, 0.2, 0.3], abs=0.02)
    bucket.penalize(2.0)
    assert bucket.reserve() >= 2.0


async def test_shared_bucket_limits_two_instances_together(redis_url: str) -> None:
    """Two limiters on the same Redis key share one budget: 20 acquisitions at 40/s with a
    burst of 2 take about half a second in total, not a quarter."""
    clients = [Redis.from_url(redis_url, decode_responses=True) for _ in range(2)]
    try:
        buckets = [TokenBucket(40, 2, redis=c, key="t:ratelimit:crm") for c in clients]
        start = time.monotonic()
        await asyncio.gather(*(b.acquire() for _ in range(10) for b in buckets))
        elapsed = time.monotonic() - start
        assert 0.4 <= elapsed < 1.0
    finally:
        for c in clients:
            await c.aclose()
