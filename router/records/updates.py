"""Updates of a call record already delivered: a change to the CRM object one of its
steps created (the agent's disposition given after the wrap-up time).

An update travels through the outbox like a record, under a key of its own
(``<record_key>:<what>``, so the outbox's dedupe makes it exactly once), with fields
saying what it updates:

``update_of``    the record key of the delivered record
``update_step``  the step whose CRM object is updated (``call``: the activity)

The delivery worker (:mod:`router.records.delivery`) sends it once the original's step
is done (in its delivery ledger, :mod:`router.records.ledger`), with the CRM's id of
that step's object. Until then it waits without spending its attempts, however long the
original takes (a CRM outage longer than ``max_attempts`` times the backoff included):
while the original is still in the outbox (stream, retry set) or nowhere yet (in a
spool), the update is deferred with a capped delay; it is dead-lettered only when its
original was (``original_dead``: retry both), or when the original stays nowhere to be
seen for long (``original_missing``), see :func:`original_state`. The step's configured ``update``
request (``PATCH /crm/v3/objects/calls/{id}`` at HubSpot, ``PATCH
/sobjects/Task/{id}`` at Salesforce...). Such a request sets fields to values, so
sending it twice (a retry after a lost answer) leaves the object as once: exactly once
in effect, without any idempotency support at the CRM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from redis.asyncio import Redis

from router.crm.base import StepResult
from router.keys import Keys
from router.records.ledger import LedgerState

UPDATE_OF = "update_of"
UPDATE_STEP = "update_step"
#: The ledger "step" of an update under its own record key (its result, once sent).
MARKER_STEP = "update"

#: Where an update's original is: ``delivered``; ``dead`` (in the dead letters now);
#: ``waiting`` (enqueued: in the stream, being sent, or in the retry set); ``missing``
#: (never enqueued in Redis: spooled on an instance that cannot reach Redis, or lost).
OriginalState = Literal["delivered", "dead", "waiting", "missing"]


def update_record(original: Mapping[str, Any], changes: Mapping[str, Any], *,
                  what: str = "disposition", step: str = "call") -> dict[str, Any]:
    """The outbox record updating ``step``'s object of the delivered ``original`` with
    ``changes`` (the original's fields with the changes, for the templates)."""
    key = str(original["record_key"])
    return {**original, **changes, "record_key": f"{key}:{what}", UPDATE_OF: key,
            UPDATE_STEP: step}


def update_of(record: Mapping[str, Any]) -> tuple[str, str] | None:
    """``(original record key, step)`` when ``record`` is an update, else None."""
    key = record.get(UPDATE_OF)
    if not isinstance(key, str) or not key:
        return None
    step = record.get(UPDATE_STEP)
    return key, step if isinstance(step, str) and step else "call"


def as_original(record: Mapping[str, Any]) -> dict[str, Any]:
    """The update's record as its templates see it: the original's key, the changes."""
    found = update_of(record)
    data = {k: v for k, v in record.items() if k not in (UPDATE_OF, UPDATE_STEP)}
    if found is not None:
        data["record_key"] = found[0]
    return data


async def step_result(redis: Redis, keys: Keys, record_key: str, step: str
                      ) -> StepResult | None:
    """What ``step`` of the delivered record ``record_key`` did (its CRM id), from the
    record's delivery ledger (or the per-step marker older versions wrote); None when
    the step has not been done (yet)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.outbox_ledger(record_key))
        pipe.get(keys.outbox_step(record_key, step))
        fields, marker = await pipe.execute()
    done = LedgerState.parse(fields or {}).done.get(step)
    if done is not None:
        return done.result
    return StepResult.from_marker(step, marker) if marker is not None else None


async def original_state(redis: Redis, keys: Keys, record_key: str) -> OriginalState:
    """Where the record ``record_key`` stands in the outbox (see :data:`OriginalState`),
    from its markers: delivered, the dead letter it was put in (still there: not retried
    since), enqueued."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.exists(keys.delivered(record_key))
        pipe.get(keys.outbox_died(record_key))
        pipe.exists(keys.outbox_dedupe(record_key))
        delivered, died, seen = await pipe.execute()
    if delivered:
        return "delivered"
    if died:
        dead_id = died.decode() if isinstance(died, bytes) else str(died)
        if await redis.xrange(keys.outbox_dead, dead_id, dead_id):
            return "dead"
    return "waiting" if seen else "missing"
