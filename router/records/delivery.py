"""The delivery worker: takes records from the outbox stream and posts them to the CRM.

Each record goes through the sink's steps in order, each with its own idempotency key
(``record_key`` for the step ``call``, ``record_key + ":<step>"`` for the others), so a
retry never creates a second object at the CRM. The REST connector's steps are the
configured ``crm.records`` pipeline (:class:`~router.crm.base.StepSink`: each step has a
``when`` and hands its results to later ones); for a plain
:class:`~router.crm.base.RecordSink` the steps are:

- ``call``: :meth:`RecordSink.post_call`;
- ``lead``: :meth:`RecordSink.create_lead` when the caller is unknown (no
  ``customer_id``), has a number (not withheld), was not rejected, and ``create_leads``
  is on;
- ``task``: :meth:`RecordSink.create_task` when the outcome is one of
  ``task_outcomes``, the caller has a number to call back, and ``create_tasks`` is on.

:func:`plan` is that choice of call/lead/task; record steps see it as ``plan``.

What each step created (its id and the outputs later steps use) is written to the
record's ledger (:mod:`router.records.ledger`) before the record is acked, so a retry of
a partially done record skips the steps done and still hands their results on, and a
step whose answer was lost (timeout, dropped connection, crash) is first looked up at
the CRM by its key instead of being created twice, even when the CRM has no idempotency
support. When all steps are done, one Lua script sets the delivered marker, XACKs and
XDELs the entry and appends it to ``outbox:sent``; a reclaimed entry whose delivered
marker exists is acked without sending anything.

A record with ``update_of`` (:mod:`router.records.updates`: a disposition given after
its call's record was delivered) runs no step: once the step it updates is in the
original's ledger, the sink's ``update`` request for that step goes out with the CRM's
id the ledger holds. Until then it is *deferred* (back into the retry set with a delay
capped at :data:`DEFER_MAX_S`, its attempts not counted), however long its original
takes; it is dead-lettered as ``original_dead`` when its original was dead-lettered (and
not retried since), as ``original_missing`` when its original was never enqueued in
Redis for :attr:`DeliveryWorker.orphan_wait_s` (:func:`router.records.updates.
original_state`).

Failures: a retryable :class:`CrmError` moves the entry (atomically: XACK + XDEL +
ZADD) to the ``outbox:retry`` sorted set, due after a capped exponential backoff with
full jitter (``uniform(0, min(cap, base * 2**(n-1)))`` after the n-th failure), at least
the CRM's ``Retry-After``. Any worker moves due entries back into the stream (one Lua
script, safe to run from several instances), so attempts survive restarts and a
waiting record never blocks the others. Non-retryable errors, and retryable ones
after ``max_attempts``, go to the ``outbox:dead`` stream with the reason (``rejected``,
``max_attempts``, ``unconfirmed``, ...), the attempt count and the last error (with what
the CRM said; phone numbers, and the record's numbers and names wherever the CRM echoed
them, masked: :func:`router.log.mask_stored`); ``outbox:died:<key>`` names the dead
letter (for the record's updates). Entries of a crashed worker are reclaimed with XAUTOCLAIM
after ``claim_idle_s``. A delivery that lasts longer (a slow CRM, several steps with
their retries, a rate-limit wait) keeps its claim: every third of ``claim_idle_s`` its
worker claims its in-flight entries again (one XCLAIM ... JUSTID script per worker,
:meth:`DeliveryWorker.keep_claims`), so no other instance takes one while it is being
sent. Should a worker lose one all the same (its event loop or Redis stalled for
longer than that), the scripts that finish an entry (ack, retry, dead-letter) act only
while this consumer holds it (XPENDING, in the script): the worker that lost it stops
before its next step, logs one line and leaves it to the worker holding it.

``callroute serve`` runs one; ``callroute deliver`` runs one alone (more delivery beside
the service); or embed :class:`DeliveryWorker` and call :meth:`DeliveryWorker.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from router.crm.base import (
    CreatedFinder,
    RecordSink,
    Recovery,
    StepResult,
    StepSink,
    StepUpdater,
    step_key,
)
from router.crypto import KeyRing, keyring_from_settings
from router.errors import CrmError, CrmRateLimited, CrmUnconfirmed, CryptoError
from router.keys import Keys, keys_from_settings
from router.log import bind_call, bind_personal, mask_stored
from router.metrics import LEDGER_STEPS, OUTBOX_DEPTH, RECORDS
from router.records.ledger import Ledger, LedgerState, StepEntry
from router.records.outbox import ensure_group, now_ms
from router.records.ratelimit import TokenBucket
from router.records.updates import (
    MARKER_STEP,
    OriginalState,
    as_original,
    original_state,
    step_result,
    update_of,
)
from router.settings import OutboxSettings, Settings

log = logging.getLogger(__name__)

Outcome = Literal["delivered", "duplicate", "retry", "dead", "pending", "deferred", "lost"]
STEPS = ("call", "lead", "task")
MAX_ERROR_CHARS = 500
#: The longest an update waits between two looks at its original still on its way.
DEFER_MAX_S = 30.0
#: The least time an update waits for an original never enqueued in Redis (a spool
#: drains within seconds of Redis being reachable again).
ORPHAN_WAIT_MIN_S = 600.0

#: Lua: whether this consumer (``ARGV[2]``) still holds entry ``ARGV[1]`` of group
#: ``ARGV[3]`` in stream ``KEYS[1]``; otherwise the script returns who does ('' for nobody:
#: acked already) and changes nothing. A delivery that outlasted ``claim_idle_s`` without
#: its heartbeat (a stalled event loop, Redis unreachable) may have been reclaimed by
#: another worker: that worker now finishes the entry, never both.
_OWNED_LUA = """
local p = redis.call('XPENDING', KEYS[1], ARGV[3], ARGV[1], ARGV[1], 1)
if #p == 0 then return '' end
if p[1][2] ~= ARGV[2] then return p[1][2] end
"""

# KEYS: stream, delivered, sent; ARGV: id, consumer, group, ttl ms, key, record, keep,
# attempt, enq
_DONE_LUA = _OWNED_LUA + """
redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
redis.call('XACK', KEYS[1], ARGV[3], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if tonumber(ARGV[7]) > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'key', ARGV[5], 'record', ARGV[6],
             'attempt', ARGV[8], 'enq', ARGV[9])
end
return 1
"""

# KEYS: stream, retry zset; ARGV: id, consumer, group, due ms, member
_RETRY_LUA = _OWNED_LUA + """
redis.call('XACK', KEYS[1], ARGV[3], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
return 1
"""

# KEYS: stream, dead, died marker; ARGV: id, consumer, group, key, record, attempt, enq,
# reason, error, now ms, marker ttl ms
_DEAD_LUA = _OWNED_LUA + """
redis.call('XACK', KEYS[1], ARGV[3], ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
local id = redis.call('XADD', KEYS[2], '*', 'key', ARGV[4], 'record', ARGV[5],
                      'attempt', ARGV[6], 'enq', ARGV[7], 'reason', ARGV[8],
                      'error', ARGV[9], 'dead_at', ARGV[10])
redis.call('SET', KEYS[3], id, 'PX', ARGV[11])
return 1
"""

# KEYS: stream; ARGV: group, consumer, ids. The heartbeat of a worker's deliveries: each
# id this consumer still holds is claimed again (XCLAIM JUSTID: its idle time restarts,
# its delivery count stays), so no other worker's XAUTOCLAIM takes it while it is being
# sent; an id held by another consumer (or acked) is left alone and returned, followed
# by its holder ('' for none).
_HEARTBEAT_LUA = """
local held, lost = {KEYS[1], ARGV[1], ARGV[2], '0'}, {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == ARGV[2] then
    held[#held + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
    lost[#lost + 1] = (#p > 0) and p[1][2] or ''
  end
end
if #held > 4 then
  held[#held + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(held))
end
return lost
"""

# KEYS: retry zset, stream; ARGV: now ms, limit. Moves due entries back into the stream.
_PROMOTE_LUA = """
local items = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(items) do
  local ok, d = pcall(cjson.decode, m)
  if ok and type(d) == 'table' then
    redis.call('XADD', KEYS[2], '*', 'key', tostring(d.key), 'record', tostring(d.record),
               'attempt', tostring(d.attempt), 'enq', tostring(d.enq),
               'error', tostring(d.error))
  end
  redis.call('ZREM', KEYS[1], m)
end
return #items
"""


class _ClaimLost(Exception):
    """This worker no longer holds the entry it is delivering (another worker reclaimed
    it): it stops, acking and moving nothing."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        #: the consumer holding the entry now ('' when it is no longer pending)
        self.holder = holder


@dataclass(frozen=True)
class Entry:
    """One outbox stream entry."""

    id: str
    key: str
    record: str
    attempt: int
    enq: int
    error: str = ""

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[str, str]) -> Entry:
        """Parse stream fields; missing numbers default to 0 (never raises)."""

        def number(name: str) -> int:
            try:
                return int(fields.get(name, "0"))
            except ValueError:
                return 0

        return cls(
            id=entry_id,
            key=fields.get("key", ""),
            record=fields.get("record", ""),
            attempt=number("attempt"),
            enq=number("enq"),
            error=fields.get("error", ""),
        )

    def retry_member(self, attempt: int, error: str) -> str:
        """The JSON kept in the retry sorted set (all values strings)."""
        return json.dumps(
            {"key": self.key, "record": self.record, "attempt": str(attempt),
             "enq": str(self.enq), "error": error, "nonce": f"{time.time_ns()}"},
            separators=(",", ":"),
        )


def backoff_delay(
    failures: int, base: float, cap: float, rng: random.Random, retry_after: float | None = None
) -> float:
    """Seconds to wait after the ``failures``-th failure: full jitter, at least Retry-After."""
    ceiling = min(cap, base * 2.0 ** min(max(failures - 1, 0), 60))
    delay = rng.uniform(0.0, ceiling)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    return delay


def defer_delay(waited_s: float, base: float, cap: float, rng: random.Random) -> float:
    """Seconds an update waits before looking at its original again: a quarter of what
    it waited so far, between ``base`` and ``cap``, with jitter (half to all of it)."""
    return min(cap, max(base, waited_s / 4.0)) * rng.uniform(0.5, 1.0)


def plan(record: Mapping[str, Any], settings: OutboxSettings) -> list[str]:
    """The steps a record needs: always ``call``; ``lead`` and ``task`` per configuration."""
    steps = ["call"]
    outcome = str(record.get("outcome", ""))
    reachable = bool(record.get("caller"))  # a number: withheld callers get neither
    if (settings.create_leads and reachable and not record.get("customer_id")
            and outcome != "rejected"):
        steps.append("lead")
    if settings.create_tasks and reachable and outcome in settings.task_outcomes:
        steps.append("task")
    return steps


class _LegacySteps:
    """A plain :class:`RecordSink` seen as steps: call, lead and task, as :func:`plan` says."""

    def __init__(self, sink: RecordSink) -> None:
        self.sink = sink

    def step_names(self) -> list[str]:
        return list(STEPS)

    def wants(self, step: str, record: Mapping[str, Any], previous: Mapping[str, StepResult],
              plan: Sequence[str]) -> bool:
        return step in plan

    async def run_step(self, step: str, record: Mapping[str, Any], idempotency_key: str,
                       previous: Mapping[str, StepResult], plan: Sequence[str]) -> StepResult:
        if step == "call":
            result = await self.sink.post_call(record, idempotency_key)
        elif step == "lead":
            result = await self.sink.create_lead(record, idempotency_key)
        else:
            result = await self.sink.create_task(record, idempotency_key)
        return StepResult(step=step, status="duplicate" if result.duplicate else "done",
                          remote_id=result.remote_id)


def as_steps(sink: RecordSink | StepSink) -> StepSink:
    """The sink as named steps (a plain RecordSink: call, lead, task)."""
    if isinstance(sink, StepSink):
        return sink
    return _LegacySteps(sink)


def default_consumer() -> str:
    """A consumer name unique to this process (host and pid)."""
    return f"{socket.gethostname()}-{os.getpid()}"


class DeliveryWorker:
    """Reads the outbox stream in a consumer group and delivers each record once."""

    def __init__(
        self,
        redis: Redis,
        sink: RecordSink,
        *,
        keys: Keys,
        settings: OutboxSettings,
        crm_name: str = "crm",
        consumer: str | None = None,
        limiter: TokenBucket | None = None,
        rng: random.Random | None = None,
        crypto: KeyRing | None = None,
    ) -> None:
        self.redis = redis
        #: opens records encrypted at rest (router.crypto); plain records pass through
        self.crypto = crypto or KeyRing()
        self.sink = sink
        self.steps = as_steps(sink)
        self.keys = keys
        self.settings = settings
        self.group = settings.group
        self.consumer = consumer or default_consumer()
        self.limiter = limiter or TokenBucket(
            settings.rate_per_s, settings.rate_burst,
            redis=redis if settings.rate_shared else None, key=keys.ratelimit(crm_name),
        )
        self.rng = rng or random.Random()  # noqa: S311 - retry jitter, not a secret
        self.ledger = Ledger(redis, keys, settings.delivered_ttl_s)
        #: how long an update waits for an original never enqueued in Redis before it is
        #: dead-lettered (``original_missing``): at least as long as the original's own
        #: retries could take
        self.orphan_wait_s = max(ORPHAN_WAIT_MIN_S,
                                 settings.max_attempts * settings.backoff_max_s)
        self._done = redis.register_script(_DONE_LUA)
        self._retry = redis.register_script(_RETRY_LUA)
        self._dead = redis.register_script(_DEAD_LUA)
        self._promote = redis.register_script(_PROMOTE_LUA)
        self._heartbeat = redis.register_script(_HEARTBEAT_LUA)
        #: this worker's deliveries running now, by stream entry id
        self._inflight: dict[str, asyncio.Task[Outcome]] = {}
        #: ids among those that another worker holds now (the heartbeat found them
        #: lost), with that worker's consumer name
        self._lost: dict[str, str] = {}
        #: Outcomes of this worker's deliveries (delivered, duplicate, retry, dead, pending,
        #: deferred, lost: reclaimed by another worker meanwhile).
        self.stats: Counter[str] = Counter()
        self._group_ready = False
        self._recovered = False

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: Redis, sink: RecordSink, *, consumer: str | None = None
    ) -> DeliveryWorker:
        """Build from the config (use :func:`router.records.outbox.connect_redis` for ``redis``)."""
        return cls(
            redis, sink, keys=keys_from_settings(settings), settings=settings.outbox,
            crm_name=settings.crm.name, consumer=consumer, crypto=keyring_from_settings(settings),
        )

    # --- one record ----------------------------------------------------------------------
    async def deliver(self, entry: Entry) -> Outcome:
        """Deliver one entry (all its steps), then ack, schedule a retry or dead-letter it."""
        with bind_call(entry.key or "-"):
            try:
                outcome = await self._deliver(entry)
            except (RedisError, OSError) as exc:
                # Not acked: the entry stays pending and is reclaimed after claim_idle_s.
                log.warning("Redis failed while delivering %s (left pending): %s", entry.key, exc)
                outcome = "pending"
            except _ClaimLost as lost:
                log.warning("record %s: entry %s was reclaimed by %s while this worker (%s) "
                            "was delivering it: stopped here, left to that worker",
                            entry.key, entry.id, lost.holder or "another worker (acked)",
                            self.consumer)
                outcome = "lost"
        self.stats[outcome] += 1
        return outcome

    async def _deliver(self, entry: Entry) -> Outcome:
        try:
            record = json.loads(self.crypto.open(entry.record, entry.key))
            if not entry.key or not isinstance(record, dict):
                raise ValueError("entry has no key or its record is not a JSON object")
        except CryptoError as exc:
            return await self._dead_letter(entry, entry.attempt, "undecryptable", str(exc))
        except ValueError as exc:
            return await self._dead_letter(entry, entry.attempt, "bad_entry", str(exc))
        # whatever is logged meanwhile (a connector logging the CRM's error body that
        # echoes the caller back) masks the record's numbers and names
        with bind_personal(record):
            if update_of(record) is not None:
                return await self._deliver_update(entry, record)
            return await self._deliver_steps(entry, record)

    async def _deliver_steps(self, entry: Entry, record: Mapping[str, Any]) -> Outcome:
        """A call record: each step it wants that its ledger does not hold, in order."""
        wanted = plan(record, self.settings)
        steps = self.steps.step_names()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.delivered(entry.key))
            pipe.hgetall(self.keys.outbox_ledger(entry.key))
            pipe.mget([self.keys.outbox_step(entry.key, step) for step in steps])
            delivered, fields, legacy = await pipe.execute()
        if delivered:
            await self._finish(entry, duplicate=True)
            return "duplicate"
        ledger = LedgerState.parse(fields or {})
        previous: dict[str, StepResult] = {}
        try:
            for step, marker in zip(steps, legacy, strict=True):
                done = ledger.done.get(step)
                if done is not None or marker is not None:
                    previous[step] = done.result if done is not None \
                        else StepResult.from_marker(step, marker)
                    LEDGER_STEPS.labels("skipped").inc()
                elif self.steps.wants(step, record, previous, wanted):
                    self._still_held(entry)
                    previous[step] = await self._send(step, record, entry.key, previous,
                                                      wanted, ledger)
        except _ClaimLost:
            raise
        except CrmError as exc:
            return await self._failed(entry, exc, record)
        except Exception as exc:  # a connector bug must not lose the record: retried
            log.exception("unexpected error delivering %s", entry.key)
            return await self._failed(entry, exc, record)
        await self._finish(entry, duplicate=False)
        return "delivered"

    async def _deliver_update(self, entry: Entry, record: Mapping[str, Any]) -> Outcome:
        """An update of a delivered record's step object (router.records.updates): sent
        once that step is in the original's ledger, with the CRM's id the ledger holds.
        Its own ledger says it was sent (a PATCH sets fields: sending it again after a
        lost answer leaves the object as once)."""
        found = update_of(record)
        assert found is not None
        original, step = found
        sink = self.sink
        if not isinstance(sink, StepUpdater) or not sink.can_update(step):
            return await self._dead_letter(entry, entry.attempt, "rejected",
                                           f"step {step!r} has no update request")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.delivered(entry.key))
            pipe.hexists(self.keys.outbox_ledger(entry.key), MARKER_STEP)
            delivered, sent = await pipe.execute()
        if delivered or sent:
            await self._finish(entry, duplicate=True)
            return "duplicate"
        done = await step_result(self.redis, self.keys, original, step)
        if done is None:
            state = await original_state(self.redis, self.keys, original)
            if state == "dead":
                return await self._dead_letter(
                    entry, entry.attempt, "original_dead",
                    f"its original {original} was dead-lettered: retry both (callroute "
                    f"outbox retry --key {original} --key {entry.key})")
            if state != "delivered":
                return await self._defer(entry, original, state)
        if done is None or not done.remote_id:
            return await self._dead_letter(entry, entry.attempt, "no_remote_id",
                                           f"no CRM id of step {step!r} of {original}")
        try:
            await self.limiter.acquire()
            self._still_held(entry)
            result = await sink.run_update(step, as_original(record), done.remote_id,
                                           entry.key)
        except _ClaimLost:
            raise
        except CrmError as exc:
            return await self._failed(entry, exc, record)
        except Exception as exc:  # a connector bug must not lose the update: retried
            log.exception("unexpected error delivering %s", entry.key)
            return await self._failed(entry, exc, record)
        await self.ledger.done(entry.key, MARKER_STEP,
                               StepEntry(result, entry.key, now_ms(), "created"))
        await self._finish(entry, duplicate=False)
        log.info("%s: step %s of %s updated (CRM id %s)", entry.key, step, original,
                 done.remote_id)
        return "delivered"

    async def _defer(self, entry: Entry, original: str, state: OriginalState) -> Outcome:
        """The update waits for ``original`` (still on its way): back into the retry set,
        its attempts unspent; dead-lettered when the original stays missing too long."""
        waited = max(0.0, (now_ms() - entry.enq) / 1000.0) if entry.enq > 0 else 0.0
        if state == "missing" and waited > self.orphan_wait_s:
            return await self._dead_letter(
                entry, entry.attempt, "original_missing",
                f"its original {original} was not enqueued in {waited:.0f} s (spooled on "
                f"an instance that cannot reach Redis, or lost)")
        where = "in the outbox" if state == "waiting" else "not in the outbox yet"
        note = f"waiting for its original {original} ({where})"
        delay = defer_delay(waited, self.settings.backoff_base_s,
                            min(DEFER_MAX_S, self.settings.backoff_max_s), self.rng)
        await self._settle(
            self._retry, entry, [self.keys.outbox_stream, self.keys.outbox_retry],
            [now_ms() + int(delay * 1000), entry.retry_member(entry.attempt, note)],
        )
        RECORDS.labels("deferred").inc()
        level = logging.DEBUG if entry.error == note else logging.INFO
        log.log(level, "update %s %s: looked at again in %.2fs", entry.key, note, delay)
        return "deferred"

    async def _send(self, step: str, record: Mapping[str, Any], key: str,
                    previous: Mapping[str, StepResult], wanted: Sequence[str],
                    ledger: LedgerState) -> StepResult:
        """Settle one step: recover a lost answer's object, else run it; either way the
        ledger says what the step created before this returns."""
        idem = step_key(key, step)
        sent_at = ledger.sent.get(step)
        if sent_at is not None:
            found = await self._recover(step, record, idem, sent_at, previous, wanted)
            if found is not None:
                await self.ledger.done(key, step, StepEntry(found, idem, now_ms(), "found"))
                LEDGER_STEPS.labels("found").inc()
                log.info("%s step %s: the lost answer's object was found at the CRM (id %s);"
                         " not created again", key, step, found.remote_id)
                return found
        await self.limiter.acquire()
        await self.ledger.sending(key, step, now_ms())
        try:
            result = await self.steps.run_step(step, record, idem, previous, wanted)
        except CrmError as exc:
            if not exc.may_have_acted:
                await self.ledger.not_sent(key, step)
            raise
        if result.status == "skipped":
            await self.ledger.not_sent(key, step)
        else:
            how = "duplicate" if result.status == "duplicate" else "created"
            await self.ledger.done(key, step, StepEntry(result, idem, now_ms(), how))
            LEDGER_STEPS.labels("created" if sent_at is None else "reposted").inc()
        log.debug("%s step %s %s (remote id %s)", key, step, result.status, result.remote_id)
        return result

    async def _recover(self, step: str, record: Mapping[str, Any], idem: str, sent_at: int,
                       previous: Mapping[str, StepResult], wanted: Sequence[str]
                       ) -> StepResult | None:
        """After a lost answer: the object found by its key, or None to run the step
        (again). Raises CrmUnconfirmed when nothing can tell and posting could duplicate,
        and a retryable CrmError while a not-found may still be the CRM's search lagging.
        """
        sink = self.sink
        recovery = sink.recovery(step) if isinstance(sink, CreatedFinder) \
            else Recovery("repost")
        if recovery.mode == "repost":
            log.info("step %s: answer lost earlier; sent again with the same "
                     "idempotency key %s", step, idem)
            return None
        if recovery.mode == "hold" or not isinstance(sink, CreatedFinder):
            LEDGER_STEPS.labels("unconfirmed").inc()
            raise CrmUnconfirmed(
                f"step {step}: the answer to an earlier send was lost and the CRM may have "
                f"created it; give the step a find (look it up by {idem!r}) or an "
                f"idempotency header, or check the CRM and run outbox replay --force"
            )
        await self.limiter.acquire()
        found = await sink.find_created(step, record, idem, previous, wanted)
        if found is not None:
            return found
        waited = (now_ms() - sent_at) / 1000.0
        if waited < recovery.settle_s:
            raise CrmError(
                f"step {step}: not found by its key {waited:.1f} s after the lost send; "
                f"looking again after the CRM's search settles ({recovery.settle_s:g} s)"
            )
        log.info("step %s: answer lost earlier, not found by its key %s: posting it",
                 step, idem)
        return None

    async def _finish(self, entry: Entry, *, duplicate: bool) -> None:
        """Delivered: marker + XACK + XDEL (+ keep in outbox:sent), atomically."""
        await self._settle(
            self._done, entry,
            [self.keys.outbox_stream, self.keys.delivered(entry.key), self.keys.outbox_sent],
            [int(self.settings.delivered_ttl_s * 1000), entry.key, entry.record,
             0 if duplicate else self.settings.sent_keep, entry.attempt + 1, entry.enq],
        )
        RECORDS.labels("duplicate" if duplicate else "delivered").inc()
        if duplicate:
            log.info("record %s was already delivered: acked without sending", entry.key)

    async def _settle(self, script: AsyncScript, entry: Entry, keys: list[str],
                      args: list[Any]) -> None:
        """Run one of the scripts that finish an entry (ack, retry, dead-letter), which
        acts only while this consumer holds the entry; raises _ClaimLost otherwise."""
        done: Any = await script(keys=keys, args=[entry.id, self.consumer, self.group, *args])
        if done != 1:
            raise _ClaimLost(done.decode() if isinstance(done, bytes) else str(done or ""))

    def _still_held(self, entry: Entry) -> None:
        """Raise _ClaimLost before a step when the heartbeat found the entry another's."""
        if entry.id in self._lost:
            raise _ClaimLost(self._lost[entry.id])

    async def _failed(self, entry: Entry, exc: Exception, record: Mapping[str, Any]) -> Outcome:
        attempt = entry.attempt + 1
        kind = exc.kind if isinstance(exc, CrmError) else "internal"
        # kept in the retry set and the dead letters, shown by outbox list and the admin
        # API: the record's numbers and names masked even where the CRM echoed them
        error = mask_stored(f"{kind}: {exc}", record)[:MAX_ERROR_CHARS]
        retryable = exc.retryable if isinstance(exc, CrmError) else True
        if isinstance(exc, CrmUnconfirmed):
            return await self._dead_letter(entry, attempt, "unconfirmed", error)
        if not retryable:
            return await self._dead_letter(entry, attempt, "rejected", error)
        if attempt >= self.settings.max_attempts:
            return await self._dead_letter(entry, attempt, "max_attempts", error)
        retry_after = exc.retry_after if isinstance(exc, CrmRateLimited) else None
        if retry_after:
            await self.limiter.penalize(retry_after)
        delay = backoff_delay(
            attempt, self.settings.backoff_base_s, self.settings.backoff_max_s, self.rng,
            retry_after,
        )
        due = now_ms() + int(delay * 1000) + (1 if retry_after else 0)
        await self._settle(self._retry, entry,
                           [self.keys.outbox_stream, self.keys.outbox_retry],
                           [due, entry.retry_member(attempt, error)])
        RECORDS.labels("retry").inc()
        log.warning("record %s attempt %d failed (%s): retry in %.2fs",
                    entry.key, attempt, error, delay)
        return "retry"

    async def _dead_letter(self, entry: Entry, attempt: int, reason: str, error: str) -> Outcome:
        error = mask_stored(error)
        await self._settle(
            self._dead, entry,
            [self.keys.outbox_stream, self.keys.outbox_dead, self.keys.outbox_died(entry.key)],
            [entry.key, entry.record, attempt, entry.enq, reason, error, now_ms(),
             int(self.settings.dedupe_ttl_s * 1000)],
        )
        RECORDS.labels("dead").inc()
        log.error("record %s dead-lettered after %d attempt(s): %s (%s)",
                  entry.key, attempt, reason, error)
        return "dead"

    # --- the stream ----------------------------------------------------------------------
    async def promote_due(self, limit: int = 500) -> int:
        """Move retry entries whose time has come back into the stream."""
        moved: int = await self._promote(
            keys=[self.keys.outbox_retry, self.keys.outbox_stream], args=[now_ms(), limit]
        )
        return moved

    async def claim_stale(self, count: int = 100) -> list[Entry]:
        """XAUTOCLAIM entries idle longer than ``claim_idle_s`` (a crashed worker's)."""
        idle = int(self.settings.claim_idle_s * 1000)
        result = await self.redis.xautoclaim(
            self.keys.outbox_stream, self.group, self.consumer, idle, start_id="0-0", count=count
        )
        claimed = result[1]
        deleted = result[2] if len(result) > 2 else []
        if deleted:  # entries deleted from the stream while pending: nothing left to do
            await self.redis.xack(self.keys.outbox_stream, self.group, *deleted)
        entries = [Entry.from_fields(eid, fields) for eid, fields in claimed if fields]
        if entries:
            log.info("reclaimed %d stale entr(ies) from crashed or slow workers", len(entries))
        return entries

    async def read(self, count: int, block_ms: int | None, *, own: bool = False) -> list[Entry]:
        """XREADGROUP new entries (or, with ``own``, this consumer's pending ones)."""
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, {self.keys.outbox_stream: "0" if own else ">"},
            count=count, block=None if own else block_ms,
        )
        entries: list[Entry] = []
        for _stream, items in reply or []:
            entries += [Entry.from_fields(eid, fields) for eid, fields in items if fields]
        return entries

    async def update_depth(self) -> int:
        """Set OUTBOX_DEPTH to stream length + waiting retries; return it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.keys.outbox_stream)
            pipe.zcard(self.keys.outbox_retry)
            xlen, zcard = await pipe.execute()
        depth = int(xlen) + int(zcard)
        OUTBOX_DEPTH.set(depth)
        return depth

    def _spawn(self, entries: list[Entry]) -> None:
        for entry in entries:
            if entry.id in self._inflight:
                # XAUTOCLAIM handed back an entry this worker is still delivering (its
                # heartbeat late, or the entry lost to a worker that stopped since): it
                # holds it again, and a second delivery would send its steps again
                self._lost.pop(entry.id, None)
                continue
            task = asyncio.create_task(self.deliver(entry))
            self._inflight[entry.id] = task
            task.add_done_callback(functools.partial(self._delivered, entry.id))

    def _delivered(self, entry_id: str, _task: asyncio.Task[Outcome]) -> None:
        del self._inflight[entry_id]
        self._lost.pop(entry_id, None)

    async def keep_claims(self) -> dict[str, str]:
        """The heartbeat: claim the entries this worker is delivering again (one script
        call), so that no other worker's :meth:`claim_stale` takes one however long its
        delivery lasts. Returns those another worker holds now (with its name; '' when
        none does), which stop before their next step."""
        ids = list(self._inflight)
        if not ids:
            return {}
        reply: Any = await self._heartbeat(keys=[self.keys.outbox_stream],
                                           args=[self.group, self.consumer, *ids])
        text = [v.decode() if isinstance(v, bytes) else str(v) for v in reply or []]
        lost = {eid: holder for eid, holder in zip(text[::2], text[1::2], strict=True)
                if eid in self._inflight}
        self._lost = lost  # the others are this worker's (again)
        return lost

    async def _heartbeats(self) -> None:
        """Run :meth:`keep_claims` every third of ``claim_idle_s`` (while deliveries
        run), until cancelled; a Redis failure waits for the next beat."""
        interval = self.settings.claim_idle_s / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self.keep_claims()
            except (RedisError, OSError) as exc:
                log.debug("could not renew the claims of this worker's deliveries: %s", exc)
            except Exception:  # a bug must not end the heartbeat for good: next beat
                log.exception("renewing the claims of this worker's deliveries failed")

    async def _prepare(self) -> None:
        await ensure_group(self.redis, self.keys, self.group)
        self._group_ready = True
        if not self._recovered:  # entries this consumer name held before a restart
            self._recovered = True
            self._spawn(await self.read(self.settings.concurrency * 4, None, own=True))

    async def _iteration(self, state: dict[str, float]) -> None:
        now = time.monotonic()
        if not self._group_ready:
            await self._prepare()
        await self.promote_due()
        if now - state["claimed"] >= min(self.settings.claim_idle_s / 2, 5.0):
            state["claimed"] = now
            self._spawn(await self.claim_stale())
        if now - state["depth"] >= 1.0:
            state["depth"] = now
            await self.update_depth()
        free = self.settings.concurrency - len(self._inflight)
        if free <= 0:
            await asyncio.wait(
                set(self._inflight.values()), timeout=self.settings.poll_interval_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
            return
        block = max(1, int(self.settings.poll_interval_s * 1000))
        self._spawn(await self.read(free, block))

    async def run(self, stop: asyncio.Event | None = None, *, grace_s: float = 10.0) -> None:
        """Deliver until ``stop`` is set; Redis outages are logged and waited out."""
        stop = stop or asyncio.Event()
        state = {"claimed": 0.0, "depth": 0.0}
        pause = 0.05
        heartbeat = asyncio.create_task(self._heartbeats(), name="delivery-heartbeat")
        try:
            while not stop.is_set():
                try:
                    await self._iteration(state)
                    pause = 0.05
                except (RedisError, OSError) as exc:
                    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                        log.error("the outbox consumer group vanished (Redis lost its data?)")
                    log.warning("outbox Redis error (retrying in %.2fs): %s", pause, exc)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
                    pause = min(pause * 2, 2.0)
                    self._group_ready = False  # re-check the group once Redis answers
        finally:
            try:
                await self._drain_inflight(grace_s)
            finally:
                heartbeat.cancel()
                await asyncio.gather(heartbeat, return_exceptions=True)

    async def _drain_inflight(self, grace_s: float) -> None:
        if not self._inflight:
            return
        _done, pending = await asyncio.wait(set(self._inflight.values()), timeout=grace_s)
        for task in pending:  # left pending in the stream: reclaimed later, never lost
            task.cancel()
        if pending:
            await asyncio.wait(pending)

