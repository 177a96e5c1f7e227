"""Benchmark: call records delivered per second through the outbox, vs plain HTTP POSTs.

Starts a private redis-server and a loopback CRM (aiohttp, honouring Idempotency-Key),
then measures in one run:

1. baseline: plain aiohttp POSTs of the same records to the same server, with the same
   concurrency, no outbox (the ceiling);
2. enqueue: ``Outbox.enqueue`` of N records (Lua SET NX + XADD), latency percentiles;
3. drain: a backlog of N records delivered by W workers (XREADGROUP, rate limit token,
   POST, marker + XACK + XDEL + sent log), records/s and drain time, plus end-to-end
   latency (enqueue -> CRM received) percentiles.

Usage: ``.venv/bin/python -m bench.bench_outbox [--records 10000] [--workers 2]
[--concurrency 32]``. Every loop is bounded; the run aborts after ``--limit-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from redis.asyncio import Redis

from bench.common import percentile
from router.keys import Keys
from router.records.delivery import DeliveryWorker
from router.records.outbox import Outbox
from router.records.spool import Spool
from tests.redis_server import RedisServer
from tests.router.records.outbox_crm import FakeCrm, HttpSink, call_record, outbox_settings


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values`` in seconds, in milliseconds."""
    return percentile(values, p) * 1000


async def baseline(crm: FakeCrm, n: int, concurrency: int) -> tuple[float, list[float]]:
    """Plain POSTs: (seconds, per-request latencies)."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                async with session.post(
                    f"{crm.url}/api/activities", json=call_record(f"base-{i}"),
                    headers={"Idempotency-Key": f"base-{i}"},
                ) as resp:
                    await resp.read()
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start, latencies


async def run(args: argparse.Namespace) -> None:
    """Baseline, enqueue and drain measurements; prints the table."""
    server = RedisServer()
    server.start()
    crm = FakeCrm()
    await crm.start()
    redis = Redis.from_url(server.url, decode_responses=True)
    sinks: list[HttpSink] = []
    try:
        base_s, base_lat = await baseline(crm, args.records, args.concurrency * args.workers)
        crm.received.clear()
        crm.created.clear()

        settings = outbox_settings(
            concurrency=args.concurrency, rate_per_s=1e6, rate_burst=1e6, sent_keep=args.records
        )
        keys = Keys(prefix="bench:")
        spool = Spool(Path(tempfile.mkdtemp(prefix="bench-spool-")), max_records=10,
                      max_bytes=1 << 20)
        outbox = Outbox(redis, keys, settings, spool)
        enq_lat: list[float] = []
        enq_at: dict[str, float] = {}
        start = time.perf_counter()
        for i in range(args.records):
            t0 = time.perf_counter()
            await outbox.enqueue(call_record(i))
            enq_lat.append(time.perf_counter() - t0)
            enq_at[f"call-{i}"] = time.monotonic()
        enq_s = time.perf_counter() - start

        stop = asyncio.Event()
        workers = []
        for w in range(args.workers):
            sink = HttpSink(crm.url, timeout_s=10)
            sinks.append(sink)
            workers.append(DeliveryWorker(redis, sink, keys=keys, settings=settings,
                                          consumer=f"bench-{w}"))
        start = time.perf_counter()
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]
        deadline = time.monotonic() + args.limit_s
        while len(crm.created) < args.records and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        drain_s = time.perf_counter() - start
        stop.set()
        await asyncio.gather(*tasks)
        delivered = len(crm.created)
        e2e = [r.at - enq_at[r.key] for r in crm.received if r.key in enq_at]
        dupes = sum(1 for c in crm.count().values() if c > 1)

        base_rate = args.records / base_s
        out_rate = delivered / drain_s
        print(f"records={args.records} workers={args.workers} "
              f"concurrency/worker={args.concurrency} "
              f"(baseline uses {args.concurrency * args.workers})")
        print(f"{'measure':<34}{'rate/s':>10}{'time s':>9}{'p50 ms':>9}{'p99 ms':>9}")
        print(f"{'plain aiohttp POST (baseline)':<34}{base_rate:>10.0f}{base_s:>9.2f}"
              f"{pct(base_lat, 50):>9.2f}{pct(base_lat, 99):>9.2f}")
        print(f"{'outbox enqueue (Lua SET NX+XADD)':<34}{args.records / enq_s:>10.0f}"
              f"{enq_s:>9.2f}{pct(enq_lat, 50):>9.3f}{pct(enq_lat, 99):>9.3f}")
        print(f"{'outbox drain of backlog':<34}{out_rate:>10.0f}{drain_s:>9.2f}"
              f"{'':>9}{'':>9}")
        print(f"{'  backlog age at CRM (enq->recv)':<34}{'':>10}{'':>9}"
              f"{pct(e2e, 50):>9.0f}{pct(e2e, 99):>9.0f}")
        print(f"drain/baseline ratio: {out_rate / base_rate:.2f}   delivered {delivered}/"
              f"{args.records}, keys posted more than once: {dupes}, mean e2e "
              f"{statistics.fmean(e2e) if e2e else float('nan'):.2f}s")
    finally:
        for sink in sinks:
            await sink.aclose()
        await redis.aclose()
        await crm.stop()
        server.close()


def main() -> None:
    """Parse the options and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--limit-s", type=float, default=300.0)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
