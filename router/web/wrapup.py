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
the next instance that runs. An answered call's record leaves the wrap-up under its
release lock (``web:release:<key>``, :data:`RELEASE_LOCK_MS`): one instance at a time
sends it, with the disposition it finds, and takes that disposition away in the same
step; so a second instance releasing the same hold finds it gone (no second send, no
redundant update), and a disposition given while the record was being sent is seen to
be left over: it becomes the update of the activity, or the agent is told it came too
late (``gone``), never "saved" and dropped.

Only an agent the call was rung to may give its disposition (:meth:`Wrapup.dispose`:
the held or kept record names them as the one who answered, the call is on their list
of calls awaiting a disposition, or the caller, the pages' route, saw it rung to them).
A disposition given before the record came is kept per agent
(``web:disp:<key>:<agent>``): the record takes the one of the agent who answered it,
whatever another agent rung on the call gave.

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
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.crypto import KeyRing, open_json, seal_json
from router.keys import Keys
from router.records.outbox import Record, record_dict
from router.records.updates import update_record
from router.web.pending import Pending

log = logging.getLogger(__name__)

Enqueue = Callable[[Record], Awaitable[str]]
Filed = Callable[[Mapping[str, Any]], Awaitable[None]]
#: ``busy``: another instance's release of the call did not finish in time (try again)
DisposeResult = Literal["saved", "updated", "gone", "not-yours", "busy"]
ONLINE_TTL_S = 30
MAX_NOTE = 2000
#: How long an instance may hold a call's release lock: far longer than one send takes;
#: a crashed holder's lock runs out and the next release goes ahead.
RELEASE_LOCK_MS = 10_000
#: How long a disposition (or a record given one early) waits for another instance's
#: release of the same call to finish, and how often it looks.
RELEASE_WAIT_S = 3.0
RELEASE_POLL_S = 0.02

#: Delete a key if it still holds the value given (a release lock, a disposition).
_DELETE_IF_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: A held record was sent: drop the hold and take away the disposition it was sent with
#: (only that one: one given meanwhile stays, to be found left over).
_RELEASED_LUA = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[2] ~= '' and redis.call('GET', KEYS[3]) == ARGV[2] then redis.call('DEL', KEYS[3]) end
return 1
"""


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
        self._delete_if = redis.register_script(_DELETE_IF_LUA)
        self._released_script = redis.register_script(_RELEASED_LUA)

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
                return await self._put_answered(key, str(agent), data)
            except (RedisError, OSError) as exc:
                log.warning("cannot hold record %s for a disposition (Redis: %s); sent now",
                            key, exc)
        return await self._send(data)

    async def _put_answered(self, key: str, agent: str, data: dict[str, Any]) -> str:
        """An answered call's record: held for its agent's disposition, or sent at once
        with the one given before it came (through the hold, under the release lock), or
        as it is when the agent has no page open."""
        given_key = self.keys.web_disposition(key, agent)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.outbox_dedupe(key))
            pipe.exists(given_key)
            pipe.exists(self.keys.web_online(agent))
            sent, given, online = await pipe.execute()
        if sent:  # another instance's copy of this record went already: not held again
            return await self._send(data)
        if not (given or online):
            token = await self._claim(key, wait=True)  # not while a release of it runs
            try:
                # one given since the look above was answered "saved" (under this lock,
                # which any other send of the record takes too): the record takes it
                merged = await self._given(key, data)
                result = await self._send(data)
                if merged is not None:
                    await self._unclaim_given(given_key, merged)
                return result
            finally:
                if token is not None:
                    await self._unclaim(key, token)
        await self._hold(key, data, quiet=bool(given))
        if not given:
            await self._awaits(data)
            given = await self.redis.exists(given_key)  # given while we were holding it
        if given:
            released = await self._release_held(key, wait=True)
            if released is not None:
                return released
        return "held"

    async def _given(self, key: str, data: dict[str, Any]) -> str | None:
        """Merge the disposition the agent who answered gave (under their own key);
        returns its stored value (None: none was given)."""
        agent = data.get("answered_by_agent")
        if not agent:
            return None
        name = self.keys.web_disposition(key, str(agent))
        raw = await self.redis.get(name)
        try:
            given = self._open(raw, name)
        except ValueError as exc:
            log.error("disposition on %s unreadable (%s); ignored", key, exc)
            return None
        if given is None or given.get("agent") != agent:
            return None
        data["disposition"] = given.get("code")
        data["disposition_note"] = given.get("note") or None
        data["disposition_by"] = given.get("agent")
        return _text(raw)

    async def _claim(self, key: str, *, wait: bool) -> str | None:
        """Take the release lock of ``key``'s call (returns the token that gives it back);
        with ``wait``, for up to :data:`RELEASE_WAIT_S` while another instance holds it.
        None: another instance holds it."""
        name = self.keys.web_release(key)
        token = secrets.token_hex(8)
        deadline = time.monotonic() + (RELEASE_WAIT_S if wait else 0.0)
        while not await self.redis.set(name, token, nx=True, px=RELEASE_LOCK_MS):
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(RELEASE_POLL_S)
        return token

    async def _unclaim(self, key: str, token: str) -> None:
        await self._delete_if(keys=[self.keys.web_release(key)], args=[token])

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

    async def _hold(self, key: str, data: dict[str, Any], *, quiet: bool = False) -> None:
        name = self.keys.web_hold(key)
        due_ms = int((self.clock() + self.hold_s) * 1000)
        ttl_ms = int((self.hold_s + 7 * 86400) * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(name, self._seal(data, name), nx=True, px=ttl_ms)
            pipe.zadd(self.keys.web_holds, {key: due_ms}, nx=True)
            added, _ = await pipe.execute()
        if added:
            self.held += 1
            if not quiet:
                log.info("record %s held up to %.0fs for the agent's disposition", key,
                         self.hold_s)

    async def _send(self, data: Mapping[str, Any]) -> str:
        result = await self.enqueue(data)
        if result == "enqueued":
            kept = False
            if self.late_s > 0 and data.get("answered_by_agent") and \
                    not data.get("disposition"):
                name = self.keys.web_sent(str(data.get("record_key")))
                try:  # kept for a disposition given after the wrap-up time (at once: it
                    # also says the call went without one)
                    await self.redis.set(name, self._seal(data, name), ex=int(self.late_s))
                    kept = True
                except (RedisError, OSError) as exc:
                    log.warning("call %s: no late disposition possible (Redis: %s)",
                                data.get("record_key"), exc)
            if self.filed is not None:
                try:
                    await self.filed(data)
                except Exception as exc:
                    log.warning("call %s not added to the history: %s",
                                data.get("record_key"), exc)
            if kept:
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
    async def dispose(self, record_key: str, agent: str, code: str, note: str, *,
                      rung: bool = False) -> DisposeResult:
        """Put ``code`` and ``note`` on the record of a call ``agent`` answered: at once
        if it is held, else when it arrives; once it was sent, as an update of the CRM's
        activity (``updated``) when late dispositions are on and the call's copy is still
        kept. ``gone``: the record was sent and cannot be updated (any more).
        ``not-yours``: the call was not rung to ``agent``: its held or kept record names
        another agent, or nothing shared says it was theirs (not on their list of calls
        awaiting a disposition, and ``rung`` is false: the caller did not see it rung
        to them), a made-up call included."""
        hold = self.keys.web_hold(record_key)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(hold)
            # sent: the outbox remembers it, or its copy is kept for a late disposition
            # (which may outlive the outbox's memory of it)
            pipe.exists(self.keys.outbox_dedupe(record_key), self.keys.web_sent(record_key))
            pipe.zscore(self.keys.web_todo(agent), record_key)
            raw, sent, listed = await pipe.execute()
        try:
            held = self._open(raw, hold)
        except ValueError as exc:
            log.error("held record %s unreadable (%s): disposition refused", record_key, exc)
            return "gone"
        known = rung or listed is not None
        if held is not None:
            if held.get("answered_by_agent") != agent:
                return "not-yours"
        elif sent:
            return await self._late(record_key, agent, code, note, known=known)
        elif not known:
            return "not-yours"
        name = self.keys.web_disposition(record_key, agent)
        value = self._seal({"agent": agent, "code": code, "note": note[:MAX_NOTE]}, name)
        await self.redis.set(name, value, ex=int(self.hold_s + 3600))
        token = await self._claim(record_key, wait=True)
        if token is None:  # another instance's release of it is stuck: it may take it
            return "busy"
        try:
            return await self._given_now(record_key, agent, code, note, name, value)
        finally:
            await self._unclaim(record_key, token)

    async def _given_now(self, record_key: str, agent: str, code: str, note: str,
                         name: str, value: str) -> DisposeResult:
        """Under the call's release lock, the disposition ``value`` just stored under
        ``name``: onto the held record (sent now), or left for the record to come, or,
        when the record went meanwhile without it, the update of its activity."""
        hold = self.keys.web_hold(record_key)
        try:
            held = self._open(await self.redis.get(hold), hold)
        except ValueError:
            held = None
        if held is not None:
            if held.get("answered_by_agent") != agent:  # its record came meanwhile
                await self._unclaim_given(name, value)
                return "not-yours"
            _, late = await self._release(record_key, held, await self._given(record_key, held))
            return late or "saved"
        if _text(await self.redis.get(name)) != value:
            return "saved"  # taken into the record by its release (or replaced by the
            # agent's newer one, which its own request follows)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.keys.outbox_dedupe(record_key), self.keys.web_sent(record_key))
            (sent,) = await pipe.execute()
        if not sent:
            return "saved"  # given before its record came: it takes it when it does
        # released meanwhile (another instance) without it: no record will come to take
        # it; it updates the activity, or the agent learns it came too late
        await self._unclaim_given(name, value)
        return await self._late(record_key, agent, code, note, known=True)

    async def _unclaim_given(self, name: str, value: str) -> None:
        """Remove the disposition ``value`` stored under ``name`` (if still that one)."""
        await self._delete_if(keys=[name], args=[value])

    async def _late(self, record_key: str, agent: str, code: str, note: str, *,
                    known: bool) -> DisposeResult:
        """A disposition after the record was sent: an update of the CRM's activity.
        Without the call's kept copy, ``known`` says whether the call is known to be
        ``agent``'s (``gone``) or not (``not-yours``)."""
        if self.late_s <= 0:
            return "gone" if known else "not-yours"
        name = self.keys.web_sent(record_key)
        try:
            data = self._open(await self.redis.get(name), name)
        except ValueError as exc:
            log.error("late disposition on %s refused: %s", record_key, exc)
            return "gone" if known else "not-yours"
        if data is None:
            return "gone" if known else "not-yours"
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

    async def _release_held(self, key: str, *, wait: bool, due: bool = False
                            ) -> str | None:
        """Send the record held under ``key``, with the disposition of the agent who
        answered if given, under the call's release lock (with ``wait``, waiting for
        another instance's release to finish). Returns the enqueue's result; None: it is
        not held (any more), or another instance is releasing it."""
        token = await self._claim(key, wait=wait)
        if token is None:
            return None
        try:
            try:
                data = await self._held(key)
            except ValueError as exc:
                log.error("held record %s unreadable (%s); dropped from the holds", key, exc)
                await self.redis.zrem(self.keys.web_holds, key)
                return None
            if data is None:  # released meanwhile (another instance)
                await self.redis.zrem(self.keys.web_holds, key)
                return None
            merged = await self._given(key, data)
            if merged is None and due:
                log.info("record %s sent without a disposition (wrap-up time over)", key)
            result, _ = await self._release(key, data, merged)
            return result
        finally:
            await self._unclaim(key, token)

    async def _release(self, record_key: str, data: Mapping[str, Any], merged: str | None
                       ) -> tuple[str, DisposeResult | None]:
        """Send the held record ``data`` (under the call's release lock) and drop its hold
        and the disposition ``merged`` into it (its stored value). Returns the enqueue's
        result and, when the record had gone before and this one's disposition became
        the update of its activity or could not, that outcome."""
        result = await self._send(data)
        late: DisposeResult | None = None
        agent = data.get("answered_by_agent")
        if result == "duplicate" and data.get("disposition") and agent:
            # it went before as it came on another instance, without being held; if
            # without a disposition (its copy is kept for a late one), this one updates
            # its activity; one that went with it needs no update
            late = await self._late(record_key, str(agent), str(data.get("disposition")),
                                    str(data.get("disposition_note") or ""), known=True)
        disposition = self.keys.web_disposition(record_key, str(agent or ""))
        await self._released_script(
            keys=[self.keys.web_hold(record_key), self.keys.web_holds, disposition],
            args=[record_key, merged or ""])
        self.released += 1
        if data.get("disposition") or self.late_s <= 0:
            await self._settled(agent, record_key)
        return result, late

    async def release_due(self, now: float | None = None, limit: int = 200) -> int:
        """Send every held record whose time has come (as it is, or with the disposition
        given meanwhile); return how many this instance sent (one another instance is
        releasing is left to it)."""
        due_ms = int((now if now is not None else self.clock()) * 1000)
        found = await self.redis.zrangebyscore(self.keys.web_holds, "-inf", due_ms,
                                               start=0, num=limit)
        count = 0
        for key in map(str, found):
            if await self._release_held(key, wait=False, due=True) is not None:
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


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
