"""Calls in progress across a restart: checkpointed in Redis, parked at shutdown, decided
at the next start.

A call's record is emitted once, when the call ends, and the outbox keeps the first
record of a ``record_key``. So a process that stops while calls are up must not post a
guess for them (the real record, emitted by the next run, would be dropped as a
duplicate), and a process that is killed must leave enough behind for a call that ends
while nobody follows it to get a record at all. :class:`CallParking` does both:

* **checkpoints**: about every second, the state (:meth:`ami.tracker._Call.state`) of
  each open call that changed in a way its record would show (routed, rung, answered,
  queue join/leave, hangup) is written (at most :data:`MAX_PER_TICK` a round) to one
  Redis hash per Asterisk (:meth:`router.keys.Keys.parked_calls`, field = Linkedid,
  sealed with the deployment's key ring for that key and field), in one pipeline with
  the removals of calls whose records are stored (:meth:`CallParking.released`, told
  by the record queue once the outbox or the disk spool holds the record) and the
  "alive" mark (:meth:`router.keys.Keys.parked_alive`). An event only marks its call:
  nothing is written on the event path;
* **parking** (:meth:`CallParking.park`, at SIGTERM): every call still up is written,
  and :meth:`ami.tracker.CallTracker.close` drops those instead of posting them. When
  Redis cannot take them they are posted as incomplete, as before parking existed: a
  record is never lost for it;
* **deciding** (at start): the states are read before AMI connects
  (:meth:`CallParking.load`, retried every second while Redis is down). A call that
  the AMI resync (``CoreShowChannels``) finds up is picked up with what its state knew
  (the routing decision, the customer, the start, who answered) and the tracker emits
  its real record when it ends; one that Asterisk no longer shows ended while nobody
  followed it: after ``settle_s`` (another instance following the same Asterisk may be
  finishing its real record, and removes the state once it is stored) the state still
  in Redis is posted as one incomplete record, with the times known (its end: the
  hangup if it was seen, else the last moment the call was known to be up).

Records go through the outbox, which keeps one per ``record_key``: a state posted after
the real record was stored (a kill between the two) is dropped there, never posted twice.
The states are scoped by the Asterisk (its AMI ``host:port``): instances following other
Asterisks never decide them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.exceptions import RedisError

from ami.tracker import CallTracker
from router.crypto import KeyRing, open_json, seal_json
from router.keys import Keys
from router.metrics import PARKED_CALLS

log = logging.getLogger(__name__)

#: States written per checkpoint round, at most: sealing one takes about 60 us (a queue
#: call's, 1.6 kB), so a round never holds the event loop (and the FastAGI sessions it
#: serves) much more than 10 ms; the calls left over are written by the next round.
MAX_PER_TICK = 200
#: Calls of the earlier run that ended meanwhile posted per round, at most: building a
#: record from a state takes about 250 us, so a round stays near 10 ms as well.
MAX_POSTED_PER_TICK = 40
#: Linkedids of stored records waiting for their state's removal, at most (a Redis
#: outage longer than that leaves states the next start finds already posted: the
#: outbox drops those as duplicates).
MAX_RELEASED = 100_000


class CallParking:
    """Saves the tracker's open calls in Redis and decides an earlier run's at start."""

    def __init__(
        self, redis: Redis, keys: Keys, scope: str, tracker: CallTracker,
        crypto: KeyRing | None = None, *, interval_s: float = 1.0, settle_s: float = 5.0,
        ttl_s: float = 7 * 86_400.0, timeout_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.tracker = tracker
        self.crypto = crypto or KeyRing()
        self.key = keys.parked_calls(scope)
        self.alive_key = keys.parked_alive(scope)
        self.interval_s = interval_s
        self.settle_s = settle_s
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.clock = clock
        #: the earlier run's states were read (nothing is written before: a call picked
        #: up without its state would overwrite it)
        self.loaded = False
        self._last_alive: float | None = None
        self._released: set[str] = set()
        self._gone: dict[str, dict[str, Any]] = {}
        self._due: float | None = None
        self._found = 0
        self._posted = 0
        self._reported = False
        self._failing = False
        self._lock = asyncio.Lock()

    # --- sealing ---------------------------------------------------------------------------
    def _context(self, linkedid: str) -> str:
        return f"{self.key}:{linkedid}"

    def seal(self, linkedid: str, state: Mapping[str, Any]) -> str:
        """``state`` as compact JSON, sealed for this hash and field."""
        return seal_json(self.crypto, state, self._context(linkedid))

    def open(self, linkedid: str, raw: str | bytes) -> dict[str, Any]:
        """The state sealed as ``raw``; ValueError when it does not open or is no object."""
        return open_json(self.crypto, raw, self._context(linkedid))

    async def _raw(self, *args: Any) -> Any:
        """A Redis command whose reply is left as bytes (a stored value that is no UTF-8
        text is then one unreadable state, not a failed read)."""
        return await self.redis.execute_command(  # type: ignore[no-untyped-call]
            *args, **{NEVER_DECODE: True})

    # --- start -----------------------------------------------------------------------------
    async def load(self) -> bool:
        """Read the earlier run's states and hand them to the tracker; False (retried by
        :meth:`run`) when Redis cannot be read."""
        states: dict[str, dict[str, Any]] = {}
        cursor = 0
        try:
            while True:
                # HSCAN, in chunks (opened between two reads: the event loop runs other
                # tasks meanwhile), undecoded: a value that is no text is logged, not a
                # crash of the read
                async with asyncio.timeout(self.timeout_s):
                    cursor, raw = await self._raw("HSCAN", self.key, cursor, "COUNT",
                                                  MAX_PER_TICK)
                for field, value in raw.items():
                    lid = field.decode(errors="replace")
                    try:
                        states[lid] = self.open(lid, value)
                    except ValueError as exc:
                        # kept: it may open once the right key is configured again
                        log.error("the parked state of call %s %s: left in Redis", lid, exc)
                if not cursor:
                    break
                await asyncio.sleep(0)
            async with asyncio.timeout(self.timeout_s):
                alive = await self._raw("GET", self.alive_key)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("the calls parked by the previous run cannot be read yet", exc)
            return False
        self._recovered()
        try:
            self._last_alive = float(alive) if alive else None
        except (TypeError, ValueError):
            self._last_alive = None
        self.loaded = True
        self._found = len(states)
        spent = self.tracker.expect_parked(states)
        self._released.update(spent)
        self._take_gone()
        self._report()
        return True

    def on_resync(self, _channels: object = None) -> None:
        """An AMI resync listener: the calls of the earlier run that Asterisk no longer
        shows are posted after ``settle_s`` (see the module's docstring)."""
        self._take_gone()
        self._report()

    def _take_gone(self) -> None:
        gone = self.tracker.take_parked_gone()
        if gone:
            self._gone.update(gone)
            self._due = self.clock() + self.settle_s

    async def _decide(self) -> None:
        """Post the records of the earlier run's calls that ended meanwhile, from the
        states still in Redis (another instance may have stored their real records)."""
        # the others: the next rounds
        lids = list(itertools.islice(self._gone, MAX_POSTED_PER_TICK))
        try:
            async with asyncio.timeout(self.timeout_s):
                values: list[Any] = await self._raw("HMGET", self.key, *lids)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed("the calls parked by the previous run cannot be decided yet", exc)
            return
        for lid, value in zip(lids, values, strict=True):
            state = self._gone.pop(lid)
            if value is not None:
                with contextlib.suppress(ValueError):
                    state = self.open(lid, value)  # the freshest; unreadable: the one loaded
                if self.tracker.post_parked(lid, state, self._last_alive):
                    self._posted += 1
                    PARKED_CALLS.labels("posted").inc()
        if not self._gone:
            self._due = None
        self._report()

    def _report(self) -> None:
        """Once the earlier run's calls are all decided: the one line saying how."""
        if self._reported or not self.loaded or self._gone or self.tracker.resyncs == 0:
            return
        self._reported = True
        adopted = self.tracker.parked_adopted
        PARKED_CALLS.labels("adopted").inc(adopted)
        log.info("calls parked by the previous run: %d found, %d still up (picked up again: "
                 "their records follow), %d ended meanwhile (posted as incomplete)",
                 self._found, adopted, self._posted)

    # --- while running ---------------------------------------------------------------------
    def released(self, linkedid: str) -> None:
        """The record of this call is stored (outbox or spool): its state goes."""
        if len(self._released) < MAX_RELEASED:
            self._released.add(linkedid)

    async def run(self, stop: asyncio.Event) -> None:
        """Checkpoint every ``interval_s`` until ``stop`` (and decide the earlier run's
        calls when due)."""
        while not stop.is_set():
            try:
                await self.tick()
            except Exception:
                # a bug or stored data not foreseen must not end the checkpoints for good
                log.exception("a call checkpoint round failed: retried in %.0f s",
                              self.interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def tick(self) -> None:
        """One round: read the earlier run's states if not yet done, save the changed
        calls and drop the finished ones, post the calls that ended meanwhile when due."""
        async with self._lock:
            if not self.loaded and not await self.load():
                return
            await self._save(self.tracker.checkpoints(MAX_PER_TICK), parked=False)
            if self._gone and self._due is not None and self.clock() >= self._due:
                await self._decide()

    async def _save(self, states: Mapping[str, Mapping[str, Any]], *, parked: bool) -> bool:
        """Write ``states``, remove the released ones, mark alive: one pipeline. On a
        failure the calls are marked for the next checkpoint again."""
        released, self._released = self._released, set()
        now = self.clock()
        ttl = max(int(self.ttl_s), 1)
        pipe = self.redis.pipeline(transaction=False)
        if states:
            pipe.hset(self.key, mapping={
                lid: self.seal(lid, {**state, "saved_at": now, "parked": parked})
                for lid, state in states.items()})
            pipe.expire(self.key, ttl)
        if released:
            pipe.hdel(self.key, *released)
        if not (self._gone or self.tracker.parked_waiting):
            # not while an earlier run's calls are undecided: this run never saw them up,
            # and a run after it (a stop before they are posted) must not take them for
            # up until now
            pipe.set(self.alive_key, f"{now:.3f}", ex=ttl)
        try:
            async with asyncio.timeout(self.timeout_s):
                await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self.tracker.touch(states)
            self._released.update(released)
            self._failed("call checkpoints paused", exc)
            return False
        self._recovered()
        return True

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self._failing:
            self._failing = True
            log.warning("%s: Redis failed (%s); retried every %.0f s", what,
                        str(exc) or type(exc).__name__, self.interval_s)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("call checkpoints are saved again")

    # --- shutdown --------------------------------------------------------------------------
    async def park(self) -> set[str]:
        """Save every call still up for the next run (the checkpoint loop is stopped):
        the Linkedids saved, which the tracker drops instead of posting. Empty when Redis
        cannot take them (or parking fails in a way nobody foresaw: logged): they are
        posted as incomplete, as before."""
        try:
            return await self._park()
        except Exception:  # a bug here must not cost the open calls their records
            log.exception("shutdown: parking the calls in progress failed: posted now as "
                          "incomplete")
            return set()

    async def _park(self) -> set[str]:
        async with self._lock:
            loaded = self.loaded or await self.load()
            states = self.tracker.open_states()
            saved = loaded and await self._save(states, parked=True)
            if not states:
                log.info("shutdown: no call in progress to park")
                return set()
            if not saved:
                PARKED_CALLS.labels("fallback").inc(len(states))
                log.warning("shutdown: %d call(s) in progress could not be parked (Redis "
                            "failed): posted now as incomplete", len(states))
                return set()
            PARKED_CALLS.labels("parked").inc(len(states))
            shown = sorted(states)[:20]
            log.info("shutdown: %d call(s) in progress parked for the next start: %s%s",
                     len(states), ", ".join(shown), ", ..." if len(states) > 20 else "")
            return set(states)

    async def flush(self) -> None:
        """Last removals of stored records' states (after the record queue drained)."""
        async with self._lock:
            if self._released and self.loaded:
                await self._save({}, parked=False)

    @staticmethod
    def scope_of(host: str, port: int) -> str:
        """The scope of an Asterisk: its AMI address."""
        return f"{host}:{port}"

