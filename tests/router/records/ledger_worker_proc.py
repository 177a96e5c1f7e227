"""A delivery worker posting through a RestConnector, in its own process (crash tests).

Usage: ``python -m tests.router.records.ledger_worker_proc REDIS_URL CRM_URL PREFIX
[--no-find]``. Prints ``READY`` once running; the connector is the one of
:func:`tests.router.records.noidem_crm.hubspot_settings`.
"""

from __future__ import annotations

import asyncio
import sys

from redis.asyncio import Redis

from router.crm.rest import RestConnector
from router.keys import Keys
from router.records.delivery import DeliveryWorker
from tests.router.records.noidem_crm import hubspot_settings
from tests.router.records.outbox_crm import outbox_settings


async def main(argv: list[str]) -> None:
    redis_url, crm_url, prefix = argv[:3]
    redis = Redis.from_url(redis_url, decode_responses=True)
    sink = RestConnector(hubspot_settings(crm_url, find="--no-find" not in argv,
                                          timeout_s=30.0))
    worker = DeliveryWorker(redis, sink, keys=Keys(prefix=prefix),
                            settings=outbox_settings(create_leads=False))
    print("READY", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
