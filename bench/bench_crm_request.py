"""Benchmark: what OAuth2 and the rate gate add to one CRM request (the lookup's op).

A loopback API in a process of its own (token endpoint + ``GET /api/customers`` that
checks the bearer token) and a private redis-server. Sequential lookups through
:class:`~router.crm.http.CrmHttp`, in interleaved rounds:

- ``static``: a static bearer token (the baseline: credentials in the pool's headers);
- ``oauth2``: an OAuth2 client-credentials token kept in Redis for every instance,
  valid in memory (the steady state: no Redis command and no await per request).

Prints p50/p99 per mode and the oauth2/static ratios, the Redis commands the oauth2
rounds sent (must be 0), and the CPU of the per-request hooks in isolation
(``RateGate.admit`` with no pause, ``read_limits`` on an answer's headers).

Usage: ``.venv/bin/python -m bench.bench_crm_request [--requests 500] [--rounds 7]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from multidict import CIMultiDict

from bench.common import ChildServer, percentile
from router.crm.auth import TokenStore
from router.crm.config import CrmSettings
from router.crm.http import CrmHttp
from router.crm.limits import RateGate, read_limits
from router.keys import Keys
from tests.redis_server import RedisServer

SERVER = """
import asyncio
from aiohttp import web
from bench.common import serve_until_eof

async def token(request):
    return web.json_response({"access_token": "at-bench", "token_type": "bearer",
                              "expires_in": 3600})

async def customers(request):
    if request.headers.get("Authorization") != "Bearer at-bench":
        return web.json_response({"error": "invalid_token"}, status=401)
    return web.json_response({"results": [{"id": "C1", "name": "Bench"}]},
                             headers={"X-RateLimit-Remaining": "99", "X-RateLimit-Reset": "1"})

app = web.Application()
app.router.add_post("/oauth/token", token)
app.router.add_get("/api/customers", customers)
asyncio.run(serve_until_eof(app))
"""


async def timed(http: CrmHttp, count: int) -> list[float]:
    """Latencies (ms) of ``count`` sequential lookups."""
    out = []
    for _ in range(count):
        started = time.perf_counter()
        await http.request("lookup", "GET", "/api/customers", params={"phone": "+8613800138000"})
        out.append((time.perf_counter() - started) * 1000)
    return out


async def commands(redis: aioredis.Redis) -> int:
    """Commands Redis executed so far (all but INFO)."""
    stats: dict[str, Any] = await redis.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")


async def hooks_us(rounds: int = 200_000) -> tuple[float, float]:
    """CPU µs per call of the gate (no pause) and of reading an answer's limit headers."""
    gate = RateGate()
    headers = CIMultiDict({"Content-Type": "application/json", "X-RateLimit-Remaining": "99",
                           "X-RateLimit-Reset": "1", "Date": "Tue, 01 Dec 2026 00:00:00 GMT"})

    started = time.process_time()
    for _ in range(rounds):
        await gate.admit("lookup")
    admit = (time.process_time() - started) / rounds * 1e6
    started = time.process_time()
    for _ in range(rounds):
        read_limits(headers)
    read = (time.process_time() - started) / rounds * 1e6
    return admit, read


async def run(args: argparse.Namespace) -> None:
    redis_server = RedisServer()
    redis_server.start()
    server = ChildServer(SERVER)
    url = server.url
    redis = aioredis.Redis.from_url(redis_server.url)
    static = CrmHttp(CrmSettings.model_validate(
        {"base_url": url, "auth": {"type": "bearer", "token": "at-bench"}}))
    oauth_settings = CrmSettings.model_validate({"name": "bench", "base_url": url, "auth": {
        "type": "oauth2", "oauth2": {"token_url": "/oauth/token", "client_id": "c",
                                     "client_secret": "s"}}})
    oauth = CrmHttp(oauth_settings, token_store=TokenStore(redis, Keys(prefix="b:"), "bench"))
    try:
        await timed(static, 50)
        await timed(oauth, 50)  # the token is fetched (and stored) here
        results: dict[str, list[float]] = {"static": [], "oauth2": []}
        before = await commands(redis)
        for _ in range(args.rounds):
            results["static"] += await timed(static, args.requests)
            results["oauth2"] += await timed(oauth, args.requests)
        redis_commands = await commands(redis) - before
    finally:
        await static.aclose()
        await oauth.aclose()
        await redis.aclose()
        server.close()
        redis_server.close()
    print(f"{'mode':<8} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for mode, values in results.items():
        print(f"{mode:<8} {len(values):>8} {percentile(values, 50):>8.3f} "
              f"{percentile(values, 99):>8.3f}")
    s, o = results["static"], results["oauth2"]
    print(f"oauth2/static: p50 x{percentile(o, 50) / percentile(s, 50):.2f}, "
          f"p99 x{percentile(o, 99) / percentile(s, 99):.2f}")
    print(f"{'PASS' if redis_commands == 0 else 'FAIL'}: Redis commands during the oauth2 "
          f"rounds: {redis_commands} (target 0)")
    admit, read = await hooks_us()
    print(f"per request, CPU: RateGate.admit {admit:.2f} µs, read_limits {read:.2f} µs")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=7)
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
