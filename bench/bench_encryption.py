"""Benchmark: the customer lookup with encryption at rest on vs off, in the same run.

A private ``redis-server`` on loopback holds the same customers twice: under one prefix
in clear, under another sealed with AES-256-GCM (``router.crypto``), written by the
cache itself. Two ``CachedLookup`` instances (one plain, one with the key ring) then
answer the same callers, in alternating rounds so the machine's drift hits both:

1. warm route path (the call path's case: every caller in the in-process LRU): the
   value was decrypted once when it came from Redis, so encryption should cost nothing
   here; target: p99 with encryption within 10 % of p99 without;
2. warm from Redis (LRU off: every ``find()`` reads Redis and, encrypted, decrypts):
   where the cost of decryption shows, beside the Redis round trip;
3. decryption alone: microseconds per cached value, opened and decoded vs decoded.

The CRM is an in-process directory that is never asked once the cache is warm (asked:
counted and printed). Run: ``.venv/bin/python -m bench.bench_encryption [--numbers
1000] [--calls 20000] [--redis-calls 4000] [--rounds 5]``. Every loop is bounded.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (./dev bench): make `bench` importable
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from bench.common import percentile  # noqa: E402
from router.crm.base import ChangedPage  # noqa: E402
from router.crypto import KeyRing, generate_key_line  # noqa: E402
from router.keys import Keys  # noqa: E402
from router.lookup.cache import CacheEntry, decode_entry, encode_entry, redis_client  # noqa: E402
from router.lookup.cached_lookup import CachedLookup  # noqa: E402
from router.models import CallerNumber, Customer  # noqa: E402
from router.phone import normalize  # noqa: E402
from router.settings import BreakerSettings, CacheSettings, RedisSettings  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

TARGET_P99_RATIO = 1.10


class Directory:
    """An in-process CRM: every number is a customer; counts the questions."""

    def __init__(self) -> None:
        self.asked = 0

    async def find_by_number(self, number: CallerNumber) -> Customer | None:
        self.asked += 1
        digits = (number.e164 or "")[-8:]
        return Customer(id=f"B-{digits}", name=f"Customer {digits}", tier="gold",
                        value=52_000.0, owner="7001", tags=("repeat-buyer",), open_tickets=1,
                        language="zh")

    async def changed_since(self, cursor: str | None) -> ChangedPage:
        return ChangedPage(entries=[], next_cursor=None)

    async def aclose(self) -> None:
        return None


def callers(count: int) -> list[CallerNumber]:
    return [normalize(f"+86138{i:08d}", "CN") for i in range(count)]


async def timed(lookup: CachedLookup, calls: list[CallerNumber]) -> list[float]:
    """find() one call at a time; latencies in microseconds."""
    out = []
    for number in calls:
        start = time.perf_counter()
        await lookup.find(number, timeout_s=0.3)
        out.append((time.perf_counter() - start) * 1e6)
    return out


async def run(args: argparse.Namespace) -> int:
    server = RedisServer()
    server.start()
    ring = KeyRing.parse(generate_key_line("bench"))
    directory = Directory()
    # a longer socket timeout than production's 50 ms: a timeout here would measure the
    # fallback path, not decryption
    client = redis_client(RedisSettings(url=server.url, socket_timeout_s=1.0))
    variants = {"off": (Keys(prefix="plain:", secret=b"b"), None),
                "on": (Keys(prefix="sealed:", secret=b"b"), ring)}
    pool = callers(args.numbers)
    try:
        lookups: dict[str, dict[str, CachedLookup]] = {}
        for name, (keys, crypto) in variants.items():
            fill = CachedLookup(directory, client, keys, CacheSettings(),
                                BreakerSettings(), crypto=crypto)
            for number in pool:
                await fill.find(number, timeout_s=5.0)
            await fill.drain(10.0)
            await fill.aclose()
            lookups[name] = {
                "lru": CachedLookup(directory, client, keys, CacheSettings(),
                                    BreakerSettings(), crypto=crypto),
                "redis": CachedLookup(directory, client, keys, CacheSettings(lru_size=0),
                                      BreakerSettings(), crypto=crypto),
            }
            for number in pool:  # the LRU instance reads each value from Redis once
                await lookups[name]["lru"].find(number, timeout_s=5.0)
        sample = await client.get(variants["on"][0].customer(pool[0].e164 or ""))
        if not isinstance(sample, bytes) or not sample.startswith(b"enc1:bench:"):
            raise SystemExit("bench_encryption: the 'on' values are not encrypted")
        asked_before = directory.asked
        gc.collect()
        gc.freeze()
        results: dict[tuple[str, str], list[float]] = {}
        warm = [pool[i % len(pool)] for i in range(args.calls)]
        from_redis = [pool[i % len(pool)] for i in range(args.redis_calls)]
        for _ in range(args.rounds):
            for name in ("off", "on"):
                for phase, calls in (("lru", warm), ("redis", from_redis)):
                    lat = await timed(lookups[name][phase], calls)
                    results.setdefault((phase, name), []).extend(lat)
        asked = directory.asked - asked_before
        for per in lookups.values():
            for lookup in per.values():
                await lookup.aclose()
    finally:
        await client.aclose()
        server.close()
    value = encode_entry(CacheEntry(await Directory().find_by_number(pool[0]), time.time()))
    context = b"sealed:cust:0123"
    sealed = ring.seal_bytes(value, context)
    reps = 20_000
    start = time.perf_counter()
    for _ in range(reps):
        decode_entry(value)
    plain_us = (time.perf_counter() - start) / reps * 1e6
    start = time.perf_counter()
    for _ in range(reps):
        decode_entry(ring.open_bytes(sealed, context))
    sealed_us = (time.perf_counter() - start) / reps * 1e6

    print(f"\nbench_encryption: {args.numbers} customers, {args.rounds} rounds alternating "
          f"off/on; {len(value)}-byte value, {len(sealed)} bytes sealed\n")
    print(f"{'phase':<34} {'encryption':<10} {'p50 us':>8} {'p99 us':>8} {'max us':>9} {'n':>7}")
    ratios = {}
    for phase, title in (("lru", "warm route path (LRU hits)"),
                         ("redis", "warm from Redis (LRU off)")):
        for name in ("off", "on"):
            lat = results[(phase, name)]
            print(f"{title:<34} {name:<10} {percentile(lat, 50):8.1f} "
                  f"{percentile(lat, 99):8.1f} {max(lat):9.1f} {len(lat):7d}")
        on, off = results[(phase, "on")], results[(phase, "off")]
        ratios[phase] = percentile(on, 99) / percentile(off, 99)
        p50 = statistics.median(results[(phase, "on")]) / statistics.median(
            results[(phase, "off")])
        print(f"{'':<34} {'on/off':<10} {p50:8.2f} {ratios[phase]:8.2f}")
    print(f"{'decode one cached value':<34} {'off':<10} {plain_us:8.1f}")
    print(f"{'open + decode one cached value':<34} {'on':<10} {sealed_us:8.1f}")
    print(f"\nCRM asked during the timed rounds: {asked} (expected 0)")
    met = ratios["lru"] <= TARGET_P99_RATIO
    print(f"{'PASS' if met else 'FAIL'}: warm route path p99 on/off {ratios['lru']:.2f} "
          f"(target <= {TARGET_P99_RATIO:.2f})")
    return 0 if met else 1


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--numbers", type=int, default=1_000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--redis-calls", type=int, default=4_000)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(run(parse())))
