"""The agent's calls awaiting a disposition: answered calls that may still get one.

An ended card leaves the agent's page when the agent presses "Later" (Esc) or reloads
it; the call stays on this list, from which the same disposition form opens. A call is
on it while its record is held for the agent's disposition (``web.wrapup_s``) or was
sent without one and is kept for a late disposition (``web.late_disposition_s``): the
wrap-up (:mod:`router.web.wrapup`) notes it there and takes it off once a disposition
was given (or none can be any more). Per agent, in Redis:

- ``web:todo:<agent>`` sorted set: record key -> when its record came, seconds after
  the call's end (epoch s, this host's clock, like the held record's release and the
  kept copy's life: Asterisk's clock may differ);
- ``web:todo-rows:<agent>`` hash: record key -> the row the page shows, encrypted and
  bound to the key and field: call id, start and end, outcome, customer id and tier, the
  name and number masked (:func:`router.log.mask_name`, :func:`router.log.mask_number`:
  ``L.L.``, ``+86138****8000``), withheld, talk time, queue, and until when it can get a
  disposition.

Reading (:meth:`Pending.calls`) keeps only calls that can still get one (their held
record or their kept copy is in Redis) within the window, newest first, and drops the
rest; so the list never offers a call whose disposition would be refused, and a call
held or kept by any instance shows on every instance's page. Only the agent who
answered the call has it on their list (the key is theirs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from redis.asyncio import Redis

from router.crypto import KeyRing, open_json, seal_json
from router.keys import Keys
from router.log import mask_name, mask_number

log = logging.getLogger(__name__)

#: The most calls a list shows (the newest).
LIMIT = 50
#: Who is told when an agent's list changed (the pages' push); must not block.
Changed = Callable[[str], None]
#: The name the agent's card showed for a call (record key's linkedid, agent), if any.
NameOf = Callable[[str, str], str | None]


class Pending:
    """Each agent's list of answered calls still awaiting a disposition (module doc)."""

    def __init__(self, redis: Redis, keys: Keys, *, hold_s: float, late_s: float,
                 crypto: KeyRing | None = None, name_of: NameOf | None = None,
                 clock: Callable[[], float] = time.time, limit: int = LIMIT) -> None:
        self.redis = redis
        self.keys = keys
        self.hold_s = hold_s
        self.late_s = late_s
        #: encrypts the rows at rest (off without a key)
        self.crypto = crypto or KeyRing()
        self.name_of = name_of
        self.clock = clock
        self.limit = limit
        #: told of each agent whose list changed (set by the pages' service)
        self.changed: Changed | None = None

    @property
    def window_s(self) -> float:
        """How long after its end a call can get a disposition at all."""
        return max(self.hold_s, self.late_s)

    def _tell(self, agent: str) -> None:
        if self.changed is not None:
            try:
                self.changed(agent)
            except Exception:
                log.exception("the pages were not told of agent %s's calls", agent)

    def row(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """What the list shows of ``record`` (an answered call's, not yet disposed)."""
        ended = self.clock()
        lid = str(record.get("linkedid") or "")
        agent = str(record.get("answered_by_agent") or "")
        name = self.name_of(lid, agent) if self.name_of is not None else None
        name = name or record.get("caller_name")
        anonymous = bool(record.get("anonymous")) or not record.get("caller")
        return {
            "call": lid,
            "start": record.get("start"),
            "ended_at": ended,
            "outcome": record.get("outcome"),
            "customer_id": record.get("customer_id"),
            "tier": record.get("customer_tier"),
            "name": mask_name(str(name)) if name else None,
            "number": None if anonymous else mask_number(str(record.get("caller"))),
            "anonymous": anonymous,
            "talk_s": record.get("talk_s"),
            "queue": record.get("queue"),
            "wrapup_until": ended + self.hold_s if self.hold_s > 0 else None,
            "until": ended + self.window_s,
        }

    async def note(self, record: Mapping[str, Any]) -> None:
        """``record``'s call awaits its agent's disposition (held, or kept for a late
        one); the first note's row stays (a second one, another instance's or at the
        release, leaves it as it was)."""
        agent = record.get("answered_by_agent")
        key = record.get("record_key")
        if not agent or not isinstance(key, str) or self.window_s <= 0:
            return
        agent = str(agent)
        row = self.row(record)
        zkey, hkey = self.keys.web_todo(agent), self.keys.web_todo_rows(agent)
        ttl = int(self.window_s + self.hold_s + 3600)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(zkey, {key: row["ended_at"]}, nx=True)
            pipe.hsetnx(hkey, key, seal_json(self.crypto, row, f"{hkey}:{key}"))
            pipe.expire(zkey, ttl)
            pipe.expire(hkey, ttl)
            await pipe.execute()
        self._tell(agent)  # every instance noting it tells its own pages

    async def done(self, agent: str, record_key: str) -> None:
        """``record_key``'s call got its disposition (or can get none any more)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.keys.web_todo(agent), record_key)
            pipe.hdel(self.keys.web_todo_rows(agent), record_key)
            removed, _ = await pipe.execute()
        if removed:
            self._tell(agent)

    async def calls(self, agent: str) -> list[dict[str, Any]]:
        """``agent``'s calls that can still get a disposition, newest first, each with
        ``held`` (its record still waits: the disposition goes onto it) or not (it
        updates the CRM's activity)."""
        zkey, hkey = self.keys.web_todo(agent), self.keys.web_todo_rows(agent)
        low = self.clock() - self.window_s
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrangebyscore(zkey, "-inf", f"({low}")
            pipe.zrevrangebyscore(zkey, "+inf", low, start=0, num=self.limit)
            old, recent = await pipe.execute()
        old = [_text(k) for k in old]
        recent = [_text(k) for k in recent]
        found: list[Any] = []
        if recent:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in recent:
                    pipe.exists(self.keys.web_hold(key))
                    pipe.exists(self.keys.web_sent(key))
                pipe.hmget(hkey, recent)
                found = await pipe.execute()
        rows: list[dict[str, Any]] = []
        gone = list(old)
        for i, key in enumerate(recent):
            held, kept = found[2 * i], found[2 * i + 1]
            raw = found[-1][i]
            row = self._open(raw, f"{hkey}:{key}") if raw is not None else None
            if not (held or kept) or row is None:
                gone.append(key)
                continue
            rows.append({**row, "held": bool(held)})
        if gone:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(zkey, *gone)
                pipe.hdel(hkey, *gone)
                await pipe.execute()
        return rows

    def _open(self, raw: Any, context: str) -> dict[str, Any] | None:
        try:
            return open_json(self.crypto, raw, context)
        except ValueError as exc:
            log.warning("a row of the calls awaiting a disposition (%s) dropped: it %s",
                        context, exc)
            return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
