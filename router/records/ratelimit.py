"""Client-side rate limit towards one CRM: a token bucket, shared through Redis.

The shared bucket is one Redis hash (``Keys.ratelimit(crm)``: ``tokens``, ``ts``)
updated by a Lua script with the Redis server's clock, so every callroute instance
draws from the same budget of ``rate_per_s``. Taking a token is a *reservation*: the
bucket may go negative and the caller sleeps for the returned wait, so there is one
round trip per request and no polling. When Redis cannot be reached, the limiter
falls back to a local bucket with the same rate (each instance then limits itself
alone, which is documented as the degraded mode). A 429 from the CRM drains the
bucket for ``retry_after`` seconds (:meth:`TokenBucket.penalize`), so every worker
slows down, not only the one that saw it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV[1] rate/s, ARGV[2] burst, ARGV[3] penalty seconds (0 = take a token)
_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local penalty = tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1]) or burst
local ts = tonumber(b[2]) or now
tokens = math.min(burst, tokens + (now - ts) * rate / 1000)
local wait = 0
if penalty > 0 then
  tokens = math.min(tokens, -penalty * rate)
else
  tokens = tokens - 1
  if tokens < 0 then wait = -tokens * 1000 / rate end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil((burst / rate) * 1000 + wait + 1000))
return tostring(wait)
"""


class LocalBucket:
    """A token bucket in this process only (reservation style)."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.tokens = burst
        self.ts = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.ts) * self.rate)
        self.ts = now

    def reserve(self) -> float:
        """Take one token; return how long to wait (seconds) before using it."""
        self._refill()
        self.tokens -= 1
        return max(0.0, -self.tokens / self.rate)

    def penalize(self, seconds: float) -> None:
        """Give no token for ``seconds`` (after a 429 with Retry-After)."""
        self._refill()
        self.tokens = min(self.tokens, -seconds * self.rate)


class TokenBucket:
    """Rate limit for one CRM; shared across instances via Redis when ``redis`` is given."""

    def __init__(
        self, rate_per_s: float, burst: float, *, redis: Redis | None = None, key: str = ""
    ) -> None:
        self.local = LocalBucket(rate_per_s, burst)
        self.redis = redis
        self.key = key
        self._script = redis.register_script(_BUCKET_LUA) if redis is not None else None

    async def _shared(self, penalty: float) -> float | None:
        if self._script is None:
            return None
        try:
            wait_ms = await self._script(
                keys=[self.key], args=[self.local.rate, self.local.burst, penalty]
            )
        except (RedisError, OSError) as exc:
            log.warning("shared rate limit unavailable (%s): limiting locally", exc)
            return None
        return float(wait_ms) / 1000.0

    async def acquire(self) -> float:
        """Wait until a request may be sent; return the time waited (seconds)."""
        wait = await self._shared(0.0)
        if wait is None:
            wait = self.local.reserve()
        if wait > 0:
            await asyncio.sleep(wait)
        return wait

    async def penalize(self, seconds: float) -> None:
        """Stop everyone sending for ``seconds`` (the CRM said Retry-After)."""
        if seconds <= 0:
            return
        self.local.penalize(seconds)
        await self._shared(seconds)
