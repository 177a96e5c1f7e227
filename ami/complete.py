"""What a call record learns after the call: the customer, when routing did not know it,
and the link to the recording.

When the CRM missed the routing deadline (or failed, or callroute was not reached and the
dialplan fell back), the call was routed without its customer and the record the tracker
built names none, so the CRM would get a lead for a customer it has. By the time the
call ends the lookup has usually finished in the background and filled the cache: the
number is looked up again (cache first, then the CRM) and the customer goes on the
record (its id, tier, owner and kind: the CRM object to post on), which still says the
route was degraded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ami.records import CallRecord
from router.models import Customer

log = logging.getLogger(__name__)

#: Looks a caller's E.164 number up: the customer, or None when unknown.
CustomerFinder = Callable[[str], Awaitable[Customer | None]]
#: The link to a recording file, or None.
RecordingLinker = Callable[[str], str | None]


class RecordCompleter:
    """Completes records before they are stored in the outbox (never raises)."""

    def __init__(self, find: CustomerFinder | None = None,
                 link: RecordingLinker | None = None) -> None:
        self.find = find
        self.link = link

    async def complete(self, record: CallRecord) -> CallRecord:
        """``record`` with the customer and recording link it lacks, where they are known."""
        updates: dict[str, Any] = {}
        if self.link is not None and record.recording and not record.recording_url:
            updates["recording_url"] = self.link(record.recording)
        if self._needs_customer(record):
            customer = await self._lookup(record)
            if customer is not None:
                updates.update(customer_id=customer.id, customer_tier=customer.tier,
                               customer_owner=customer.owner, customer_kind=customer.kind)
        return record.model_copy(update=updates) if updates else record

    def _needs_customer(self, record: CallRecord) -> bool:
        return (self.find is not None and record.customer_id is None and bool(record.caller)
                and (record.degraded or record.incomplete))

    async def _lookup(self, record: CallRecord) -> Customer | None:
        assert self.find is not None
        assert record.caller is not None
        try:
            return await self.find(record.caller)
        except Exception as exc:  # a lookup failure must not hold the record back
            log.warning("record %s: customer lookup after the call failed (%s): posted "
                        "without a customer", record.record_key, exc)
            return None
