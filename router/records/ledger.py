"""The delivery ledger: what each step of a call record created at the CRM, in Redis.

One hash per record (``Keys.outbox_ledger``), living as long as the delivered marker::

    <step>        the step's result (status, the CRM's id, its outputs and the customer
                  fields it set, as StepResult.marker() writes them) plus the idempotency
                  key, when (ms) and how it is known: created | duplicate | found
    <step>:sent   <epoch ms>   a request of this step left without a known answer

A step is written to the ledger *before* the record is acked, so a retry, a worker
that reclaims the entry after a crash, or ``outbox replay`` never sends a step that is
in the ledger, and later steps still get its id and outputs. ``<step>:sent`` is written
*before* each request goes out and removed when the answer says nothing was created
(refused connection, 4xx, 429); when it is still there on the next attempt, the last
answer was lost (timeout, dropped connection, 5xx, crash) and the CRM may have created
the object. What happens then is the sink's
:meth:`~router.crm.base.CreatedFinder.recovery` for the step:

- ``find``: the object is looked up by the key written into it (an external-id field,
  a tag, a marker in the description: the step's ``find``); found, it goes into the
  ledger (``how: found``) and nothing is posted; not found, the step is posted (but
  not before ``settle_s`` after the lost send, for CRMs whose search lags);
- ``repost``: the CRM honours an idempotency key: the step is posted again with the
  same key;
- ``hold``: neither: sending again could duplicate the object, so the record is
  dead-lettered as ``unconfirmed`` for a person to check (``outbox replay --force``).

Sinks without :class:`~router.crm.base.CreatedFinder` are trusted to be idempotent
(``repost``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from router.crm.base import StepResult
from router.keys import Keys

SENT = ":sent"


@dataclass(frozen=True)
class StepEntry:
    """What one step did at the CRM, the idempotency key, when, and how it is known."""

    result: StepResult
    key: str
    at: int
    how: str = "created"

    @property
    def id(self) -> str | None:
        """The CRM's id of the object the step created (None when it gave none)."""
        return self.result.remote_id

    def to_json(self) -> str:
        data = json.loads(self.result.marker())
        data.update({"key": self.key, "at": self.at, "how": self.how})
        return json.dumps(data, separators=(",", ":"), default=str)

    @classmethod
    def from_json(cls, step: str, text: str) -> StepEntry | None:
        """The entry, or None for garbage (which then reads as "not done")."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                return None
            return cls(StepResult.from_marker(step, text), key=str(data.get("key", "")),
                       at=int(data.get("at", 0)), how=str(data.get("how", "created")))
        except (ValueError, TypeError):
            return None


@dataclass
class LedgerState:
    """One record's ledger: steps done, and steps sent without a known answer."""

    done: dict[str, StepEntry] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, fields: Mapping[Any, Any]) -> LedgerState:
        """From HGETALL (bytes or text)."""
        state = cls()
        for raw_name, raw_value in fields.items():
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            value = raw_value.decode() if isinstance(raw_value, bytes) else str(raw_value)
            if name.endswith(SENT):
                try:
                    state.sent[name[: -len(SENT)]] = int(value)
                except ValueError:
                    state.sent[name[: -len(SENT)]] = 0
                continue
            entry = StepEntry.from_json(name, value)
            if entry is not None:
                state.done[name] = entry
        return state

    def as_dict(self) -> dict[str, Any]:
        """Plain data for ``outbox list`` and JSON output."""
        return {
            "done": {s: {"id": e.id, "how": e.how} for s, e in self.done.items()},
            "unconfirmed": sorted(self.sent),
        }


class Ledger:
    """Reads and writes the ledger of records (every write also renews the TTL)."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: float) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = int(ttl_s * 1000)

    async def read(self, record_key: str) -> LedgerState:
        """The record's ledger (empty when none)."""
        fields: Any = await self.redis.hgetall(self.keys.outbox_ledger(record_key))
        return LedgerState.parse(fields or {})

    async def sending(self, record_key: str, step: str, now_ms: int) -> None:
        """A request of ``step`` is about to leave: remember it until its answer is known
        (the first such time is kept: it is when the CRM may have created the object)."""
        key = self.keys.outbox_ledger(record_key)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, step + SENT, str(now_ms))
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def not_sent(self, record_key: str, step: str) -> None:
        """The answer says nothing was created (refused, 4xx, 429, skipped): forget it."""
        await self.redis.hdel(self.keys.outbox_ledger(record_key), step + SENT)

    async def done(self, record_key: str, step: str, entry: StepEntry) -> None:
        """``step`` is settled at the CRM: record what it created."""
        key = self.keys.outbox_ledger(record_key)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, step, entry.to_json())
            pipe.hdel(key, step + SENT)
            pipe.pexpire(key, self.ttl_ms)
            await pipe.execute()

    async def forget(self, record_key: str) -> None:
        """Drop the whole ledger (``outbox replay --force``: send every step again)."""
        await self.redis.delete(self.keys.outbox_ledger(record_key))


__all__ = ["Ledger", "LedgerState", "StepEntry"]
