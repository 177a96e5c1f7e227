"""After-call work: an answered call's record waits for the agent's disposition.

When a call ends the tracker emits its record. If the agent who answered it has a page
open (``web:online:<agent>`` in Redis, refreshed by whichever instance serves the page),
the record is held in Redis (``web:hold:<key>`` and the ``web:holds`` sorted set by
release time) for up to ``web.wrapup_s``; the agent's disposition and note are added
to it and it goes into the outbox then, so the CRM gets ONE activity with them. When
the agent gives none in time, any instance's releaser sends it as it is.

After the wrap-up time (or when the agent's page was closed), a disposition still
reaches the CRM as an *update* of the activity the record created, for
``web.late_disposition_s`` after the call: the sent record of an answered call is kept
(``web:sent:<key>``, encrypted) and the disposition goes into the outbox as an update
record (:mod:`router.records.updates`, key ``<key>:disposition``: one per call), which
the delivery worker sends as the call step's configured ``update`` request with the
CRM's id of the activity.

Nothing is lost or sent twice: the outbox dedupes by ``record_key``, and a held record
is removed only after its enqueue; a record that cannot be held (Redis down) goes to
the outbox (and its spool) at once. A crash leaves held records in Redis, released by
the next instance that runs.

While a call can still get its disposition (held, or kept for a late one), it is on its
agent's list of calls awaiting a disposition (:mod:`router.web.pending`), so an agent who
closed the card ("Later") or reloaded the page can still give it.

Held records and given dispositions are encrypted at rest with the deployment's key
ring (:mod:`router.crypto`), each bound to its Redis key; a value that does not decrypt
(its key was dropped) is sent or dropped as if it were not JSON, with a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.crypto import KeyRing
from router.keys import Keys
from router.records.outbox import Record, record_dict
from router.records.updates import update_record
from router.web.pending import Pending
from router.web.sealed import open_json, seal_json

log = logging.getLogger(__name__)

Enqueue = Callable[[Record], Awaitable[str]]
Filed = Callable[[Mapping[str, Any]], Awaitable[None]]
DisposeResult = Literal["saved", "updated", "gone", "not-yours"]
ONLINE_TTL_S = 30
MAX_NOTE = 2000


class Wrapup:
    """Holds records of answered calls for a disposition; releases them to the outbox."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        enqueue: Enqueue,
        hold_s: float,
        *,
        filed: Filed | None = None,
        noted: Callable[[Mapping[str, Any]], None] | None = None,
        clock: Callable[[], float] = time.time,
        crypto: KeyRing | None = None,
        late_s: float = 0.0,
        redisposed: Filed | None = None,
        pending: Pending | None = None,
    ) -> None:
        self.redis = redis
        #: encrypts held records and dispositions at rest (off without a key)
        self.crypto = crypto or KeyRing()
        self.keys = keys
        self.enqueue = enqueue
        self.hold_s = hold_s
        self.filed = filed
        self.noted = noted
        self.clock = clock
        #: how long a sent answered call can still get a disposition, as an update of the
        #: CRM's activity (0: not at all)
        self.late_s = late_s
        #: told of each late disposition's update record (the history)
        self.redisposed = redisposed
        #: each agent's calls awaiting a disposition (None: no such list)
        self.pending = pending
        self.held = 0
        self.released = 0

    # --- records in -----------------------------------------------------------------------
    async def put(self, record: Record) -> str:
        """The tracker's record consumer: hold the record or enqueue it now."""
        data = record_dict(record)
        if self.noted is not None:
            try:
                self.noted(data)
            except Exception:
                log.exception("live view could not count record %s", data.get("record_key"))
        key = str(data.get("record_key"))
        agent = data.get("answered_by_agent")
        if self.hold_s > 0 and agent and data.get("outcome") == "answered":
            try:
                if await self._given(key, data):
                    return await self._release(key, data)
                if await self.redis.exists(self.keys.web_online(str(agent))):
                    await self._hold(key, data)
                    await self._awaits(data)
                    if await self._given(key, data):  # given while we were holding it
                        await self._release(key, data)
                    return "held"
            except (RedisError, OSError) as exc:
                log.warning("cannot hold record %s for a disposition (Redis: %s); sent now",
                            key, exc)
        return await self._send(data)

    async def _given(self, key: str, data: dict[str, Any]) -> bool:
        """Merge a disposition given before the record came; True if there was one."""
        name = self.keys.web_disposition(key)
        try:
            given = self._open(await self.redis.get(name), name)
        except ValueError as exc:
            log.error("disposition on %s unreadable (%s); ignored", key, exc)
            return False
        if given is None:
            return False
        if given.get("agent") != data.get("answered_by_agent"):
            log.warning("disposition on %s by agent %s ignored: the call was answered by %s",
                        key, given.get("agent"), data.get("answered_by_agent"))
            return False
        data["disposition"] = given.get("code")
        data["disposition_note"] = given.get("note") or None
        data["disposition_by"] = given.get("agent")
        return True

    def _seal(self, data: Mapping[str, Any], name: str) -> str:
        """``data`` as JSON, encrypted for the Redis key ``name``."""
        return seal_json(self.crypto, data, name)

    def _open(self, raw: Any, name: str) -> dict[str, Any] | None:
        """The dict stored under ``name`` (None: absent); ValueError when it is not a JSON
        object or does not decrypt."""
        return None if raw is None else open_json(self.crypto, raw, name)

    async def _held(self, key: str) -> dict[str, Any] | None:
        """The record held under ``key`` (None: not held)."""
        name = self.keys.web_hold(key)
        return self._open(await self.redis.get(name), name)

    async def _hold(self, key: str, data: dict[str, Any]) -> None:
        name = self.keys.web_hold(key)
        due_ms = int((self.clock() + self.hold_s) * 1000)
        ttl_ms = int((self.hold_s + 7 * 86400) * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(name, self._seal(data, name), nx=True, px=ttl_ms)
            pipe.zadd(self.keys.web_holds, {key: due_ms}, nx=True)
            added, _ = await pipe.execute()
        if added:
            self.held += 1
            log.info("record %s held up to %.0fs for the agent's disposition", key, self.hold_s)

    async def _send(self, data: Mapping[str, Any]) -> str:
        result = await self.enqueue(data)
        if result == "enqueued":
            if self.filed is not None:
                try:
                    await self.filed(data)
                except Exception as exc:
                    log.warning("call %s not added to the history: %s",
                                data.get("record_key"), exc)
            if self.late_s > 0 and data.get("answered_by_agent") and \
                    not data.get("disposition"):
                name = self.keys.web_sent(str(data.get("record_key")))
                try:  # kept for a disposition given after the wrap-up time
                    await self.redis.set(name, self._seal(data, name), ex=int(self.late_s))
                except (RedisError, OSError) as exc:
                    log.warning("call %s: no late disposition possible (Redis: %s)",
                                data.get("record_key"), exc)
                else:
                    await self._awaits(data)
        return result

    async def _awaits(self, data: Mapping[str, Any]) -> None:
        """The call of ``data`` awaits its agent's disposition: on the agent's list."""
        if self.pending is None:
            return
        try:
            await self.pending.note(data)
        except (RedisError, OSError) as exc:
            log.warning("call %s not on its agent's list of calls awaiting a disposition "
                        "(Redis: %s)", data.get("record_key"), exc)

    async def _settled(self, agent: Any, record_key: str) -> None:
        """The call ``record_key`` got its disposition, or can get none any more."""
        if self.pending is None or not agent:
            return
        try:
            await self.pending.done(str(agent), record_key)
        except (RedisError, OSError) as exc:
            log.warning("call %s stays on its agent's list until it is read (Redis: %s)",
                        record_key, exc)

    # --- the agent's disposition ------------------------------------------------------------
    async def dispose(self, record_key: str, agent: str, code: str, note: str) -> DisposeResult:
        """Put ``code`` and ``note`` on the record of a call ``agent`` answered: at once
        if it is held, else when it arrives; once it was sent, as an update of the CRM's
        activity (``updated``) when late dispositions are on and the call's copy is still
        kept. ``gone``: the record was sent and cannot be updated (any more)."""
        hold = self.keys.web_hold(record_key)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(hold)
            # sent: the outbox remembers it, or its copy is kept for a late disposition
            # (which may outlive the outbox's memory of it)
            pipe.exists(self.keys.outbox_dedupe(record_key), self.keys.web_sent(record_key))
            raw, sent = await pipe.execute()
        try:
            held = self._open(raw, hold)
        except ValueError as exc:
            log.error("held record %s unreadable (%s): disposition refused", record_key, exc)
            return "gone"
        if held is None and sent:
            return await self._late(record_key, agent, code, note)
        if held is not None and held.get("answered_by_agent") != agent:
            return "not-yours"
        name = self.keys.web_disposition(record_key)
        given = {"agent": agent, "code": code, "note": note[:MAX_NOTE]}
        await self.redis.set(name, self._seal(given, name), ex=int(self.hold_s + 3600))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(hold)
            pipe.exists(self.keys.web_sent(record_key))
            raw, kept = await pipe.execute()
        try:
            held = self._open(raw, hold)
        except ValueError:
            held = None
        if held is not None:
            if await self._given(record_key, held):
                await self._release(record_key, held)
        elif kept:  # released meanwhile (another instance) without it: no record will
            await self.redis.delete(name)  # come to take it; it updates the activity
            return await self._late(record_key, agent, code, note)
        return "saved"

    async def _late(self, record_key: str, agent: str, code: str, note: str) -> DisposeResult:
        """A disposition after the record was sent: an update of the CRM's activity."""
        if self.late_s <= 0:
            return "gone"
        name = self.keys.web_sent(record_key)
        try:
            data = self._open(await self.redis.get(name), name)
        except ValueError as exc:
            log.error("late disposition on %s refused: %s", record_key, exc)
            return "gone"
        if data is None:
            return "gone"
        if data.get("answered_by_agent") != agent:
            return "not-yours"
        changes = {"disposition": code, "disposition_note": note[:MAX_NOTE] or None,
                   "disposition_by": agent}
        if not await self._update(data, changes):
            await self._settled(agent, record_key)
            return "gone"
        await self.redis.delete(name)
        await self._settled(agent, record_key)
        return "updated"

    async def _update(self, data: Mapping[str, Any], changes: Mapping[str, Any]) -> bool:
        """Enqueue the update of the sent record ``data``; False when one was already
        enqueued (exactly one update per call)."""
        update = update_record(data, changes)
        result = await self.enqueue(update)
        if result == "duplicate":
            return False
        log.info("disposition %s on %s sent as an update of its activity",
                 changes.get("disposition"), data.get("record_key"))
        if self.redisposed is not None:
            try:
                await self.redisposed(update)
            except Exception as exc:
                log.warning("late disposition of %s not added to the history: %s",
                            data.get("record_key"), exc)
        return True

    async def _release(self, record_key: str, data: Mapping[str, Any]) -> str:
        result = await self._send(data)
        if result == "duplicate" and data.get("disposition") and self.late_s > 0:
            # another instance sent it first, maybe without the disposition given meanwhile
            await self._update(data, {k: data.get(k) for k in
                                      ("disposition", "disposition_note", "disposition_by")})
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.web_hold(record_key), self.keys.web_disposition(record_key))
            pipe.zrem(self.keys.web_holds, record_key)
            await pipe.execute()
        self.released += 1
        if data.get("disposition") or self.late_s <= 0:
            await self._settled(data.get("answered_by_agent"), record_key)
        return result

    async def release_due(self, now: float | None = None, limit: int = 200) -> int:
        """Send every held record whose time has come (as it is); return how many."""
        due_ms = int((now if now is not None else self.clock()) * 1000)
        found = await self.redis.zrangebyscore(self.keys.web_holds, "-inf", due_ms,
                                               start=0, num=limit)
        count = 0
        for key in map(str, found):
            try:
                data = await self._held(key)
            except ValueError as exc:
                log.error("held record %s unreadable (%s); dropped from the holds", key, exc)
                await self.redis.zrem(self.keys.web_holds, key)
                continue
            if data is None:
                await self.redis.zrem(self.keys.web_holds, key)
                continue
            if not await self._given(key, data):
                log.info("record %s sent without a disposition (wrap-up time over)", key)
            await self._release(key, data)
            count += 1
        return count

    async def mark_online(self, agents: list[str]) -> None:
        """Say these agents have a page open (refresh their keys' TTL)."""
        if not agents:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for agent in agents:
                pipe.set(self.keys.web_online(agent), "1", ex=ONLINE_TTL_S)
            await pipe.execute()

    async def mark_offline(self, agent: str) -> None:
        """The agent's last page here closed."""
        await self.redis.delete(self.keys.web_online(agent))

    async def run(self, online: Callable[[], list[str]], stop: asyncio.Event,
                  interval_s: float = 1.0) -> None:
        """Background: release due records; keep the online marks fresh."""
        last_mark = 0.0
        while not stop.is_set():
            try:
                now = self.clock()
                if now - last_mark >= ONLINE_TTL_S / 3:
                    await self.mark_online(online())
                    last_mark = now
                await self.release_due()
            except (RedisError, OSError) as exc:
                log.warning("wrap-up releaser: Redis unavailable (%s); retrying", exc)
            except Exception:
                log.exception("wrap-up releaser failed; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_s)
