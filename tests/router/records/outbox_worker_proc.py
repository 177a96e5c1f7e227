"""A delivery worker in its own process, for the crash (SIGKILL) tests.

Usage: ``python -m tests.router.records.outbox_worker_proc REDIS_URL CRM_URL PREFIX
[--hang-before-ack]``.
Prints ``READY`` once running; with ``--hang-before-ack`` it prints ``SENT <key>`` after
all CRM steps of a record succeeded and then hangs instead of acking (to be killed).
"""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from router.keys import Keys
from router.records.delivery import DeliveryWorker, Entry
from tests.router.records.outbox_crm import HttpSink, outbox_settings


class HangingWorker(DeliveryWorker):
    """Announces a finished send, then never acks."""

    async def _finish(self, entry: Entry, *, duplicate: bool) -> None:
        print(f"SENT {entry.key}", flush=True)
        await asyncio.Event().wait()


async def main(argv: list[str]) -> None:
    redis_url, crm_url, prefix = argv[:3]
    cls = HangingWorker if "--hang-before-ack" in argv else DeliveryWorker
    redis = Redis.from_url(redis_url, decode_responses=True)
    sink = HttpSink(crm_url, timeout_s=30.0)
    worker = cls(redis, sink, keys=Keys(prefix=prefix), settings=outbox_settings())
    print("READY", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
