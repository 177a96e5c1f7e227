"""A delivery worker posting through a shipped preset, in its own process (crash tests).

Usage: ``python -m tests.router.records.preset_worker_proc REDIS_URL VENDOR CRM_URL PREFIX``.
The connector is the preset ``VENDOR`` pointed at its fake at ``CRM_URL``
(:func:`tests.router.records.test_exactly_once_presets.preset_settings`). Prints
``READY`` once running.
"""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from router.crm.rest import RestConnector
from router.keys import Keys
from router.records.delivery import DeliveryWorker
from tests.router.records.outbox_crm import outbox_settings
from tests.router.records.test_exactly_once_presets import preset_settings


async def main(argv: list[str]) -> None:
    redis_url, vendor, crm_url, prefix = argv[:4]
    redis = Redis.from_url(redis_url, decode_responses=True)
    sink = RestConnector(preset_settings(vendor, crm_url, timeout_s=30.0), region="CN")
    worker = DeliveryWorker(redis, sink, keys=Keys(prefix=prefix), settings=outbox_settings())
    print("READY", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
