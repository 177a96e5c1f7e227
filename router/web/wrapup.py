"""After-call work: an answered call's record waits for the agent's disposition.

When a call ends the tracker emits its record. If the agent who answered it has a page
open (``web:online:<agent>`` in Redis, refreshed by whichever instance serves the page),
the record is held in Redis (``web:hold:<key>`` and the ``web:holds`` sorted set by
release time) for up to ``web.wrapup_s``; the agent's disposition and note are added
to it and it goes into the outbox then, so the CRM gets ONE activity with them. When
the agent gives none in time, any instance's releaser sends it as it is.

Nothing is lost or sent twice: the outbox dedupes by ``record_key``, and a held record
is removed only after its enqueue; a record that cannot be held (Redis down) goes to
the outbox (and its spool) at once. A crash leaves held records in Redis, released by
the next instance that runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.keys import Keys
from router.records.outbox import Record, record_dict

log = logging.getLogger(__name__)

Enqueue = Callable[[Record], Awaitable[str]]
Filed = Callable[[Mapping[str, Any]], Awaitable[None]]
DisposeResult = Literal["saved", "gone", "not-yours"]
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
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.enqueue = enqueue
        self.hold_s = hold_s
        self.filed = filed
        self.noted = noted
        self.clock = clock
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
                    if await self._given(key, data):  # given while we were holding it
                        await self._release(key, data)
                    return "held"
            except (RedisError, OSError) as exc:
                log.warning("cannot hold record %s for a disposition (Redis: %s); sent now",
                            key, exc)
        return await self._send(data)

    async def _given(self, key: str, data: dict[str, Any]) -> bool:
        """Merge a disposition given before the record came; True if there was one."""
        raw = await self.redis.get(self.keys.web_disposition(key))
        if raw is None:
            return False
        given = json.loads(raw)
        if given.get("agent") != data.get("answered_by_agent"):
            log.warning("disposition on %s by agent %s ignored: the call was answered by %s",
                        key, given.get("agent"), data.get("answered_by_agent"))
            return False
        data["disposition"] = given.get("code")
        data["disposition_note"] = given.get("note") or None
        data["disposition_by"] = given.get("agent")
        return True

    async def _hold(self, key: str, data: dict[str, Any]) -> None:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        due_ms = int((self.clock() + self.hold_s) * 1000)
        ttl_ms = int((self.hold_s + 7 * 86400) * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.web_hold(key), text, nx=True, px=ttl_ms)
            pipe.zadd(self.keys.web_holds, {key: due_ms}, nx=True)
            added, _ = await pipe.execute()
        if added:
            self.held += 1
            log.info("record %s held up to %.0fs for the agent's disposition", key, self.hold_s)

    async def _send(self, data: Mapping[str, Any]) -> str:
        result = await self.enqueue(data)
        if result == "enqueued" and self.filed is not None:
            try:
                await self.filed(data)
            except Exception as exc:
                log.warning("call %s not added to the history: %s", data.get("record_key"), exc)
        return result

    # --- the agent's disposition ------------------------------------------------------------
    async def dispose(self, record_key: str, agent: str, code: str, note: str) -> DisposeResult:
        """Put ``code`` and ``note`` on the record of a call ``agent`` answered: at once
        if it is held, else when it arrives. ``gone``: the record was already sent."""
        hold = self.keys.web_hold(record_key)
        seen = self.keys.outbox_dedupe(record_key)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(hold)
            pipe.exists(seen)
            raw, sent = await pipe.execute()
        if raw is None and sent:
            return "gone"
        if raw is not None and json.loads(raw).get("answered_by_agent") != agent:
            return "not-yours"
        given = json.dumps({"agent": agent, "code": code, "note": note[:MAX_NOTE]},
                           ensure_ascii=False)
        await self.redis.set(self.keys.web_disposition(record_key), given,
                             ex=int(self.hold_s + 3600))
        raw = await self.redis.get(hold)
        if raw is not None:
            data = json.loads(raw)
            if await self._given(record_key, data):
                await self._release(record_key, data)
        return "saved"

    async def _release(self, record_key: str, data: Mapping[str, Any]) -> str:
        result = await self._send(data)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.web_hold(record_key), self.keys.web_disposition(record_key))
            pipe.zrem(self.keys.web_holds, record_key)
            await pipe.execute()
        self.released += 1
        return result

    async def release_due(self, now: float | None = None, limit: int = 200) -> int:
        """Send every held record whose time has come (as it is); return how many."""
        due_ms = int((now if now is not None else self.clock()) * 1000)
        found = await self.redis.zrangebyscore(self.keys.web_holds, "-inf", due_ms,
                                               start=0, num=limit)
        count = 0
        for key in map(str, found):
            raw = await self.redis.get(self.keys.web_hold(key))
            if raw is None:
                await self.redis.zrem(self.keys.web_holds, key)
                continue
            try:
                data = json.loads(raw)
            except ValueError:
                log.error("held record %s is not JSON; dropped from the holds", key)
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
