"""The audit trail: who changed or read what, when, from where, with before/after hashes.

Every change made through callroute (rules reload, cache invalidation, outbox retry and
replay, user and role changes, key rotation) and every read of a customer record through
the API or the pages is one :class:`AuditEntry`:

==========  ===========================================================================
``at``      when (epoch seconds, UTC)
``who``     the user (``cli:<os user>`` for the command line, ``system`` for the service
            itself, ``crm-webhook`` for the CRM's signed webhooks)
``role``    that user's role when it acted
``action``  what: ``rules.reload``, ``cache.invalidate``, ``outbox.retry``,
            ``outbox.replay``, ``user.add|disable|enable|role|rotate``, ``keys.rotate``,
            ``customer.read``
``target``  on what: a rules file, ``customer:<id>``, ``number:<keyed hash>`` (never a
            phone number in clear), a user name, record keys
``source``  from where: the peer address of an HTTP request, ``cli@<host>``, ``signal``,
            ``file-watch``
``before``  SHA-256 of the state before (``""`` when there is none or it is a read)
``after``   SHA-256 of the state after (for a read: of what was shown)
``outcome`` ``ok`` or what went wrong
==========  ===========================================================================

Entries go to a Redis Stream (``<prefix>audit``, ids from the writer's clock, so
``--since`` means the time shown), written with ``XADD ... MINID <now - retention>``
(exact: the few expired entries at the head go with each write), so nothing older than
``audit.retention_days`` (180 by default) is kept; with ``audit.file`` each entry is also
appended to a JSON-lines file (mode 0600, one ``write`` per line, ``O_APPEND``) for the
company's SIEM. callroute never edits or deletes an entry (Redis ACLs can forbid
``XDEL``/``XTRIM`` to everyone else). A failing Redis does not block the action: the
entry still reaches the file (when set), the failure is logged at ERROR and counted
(``callroute_audit_entries{outcome="redis_failed"}``).

Nothing here runs on the call path: entries are written by admin actions, page reads and
the command line. :func:`list_entries` is what ``callroute audit list|export`` and the
supervisor page show.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from router.keys import Keys, keys_from_settings
from router.metrics import AUDIT_ENTRIES
from router.settings import Settings

log = logging.getLogger(__name__)

SCAN_CHUNK = 500
DAY_S = 86_400.0


def state_hash(value: Any) -> str:
    """SHA-256 (hex) of ``value``: bytes as they are, anything else as canonical JSON;
    ``""`` for None (no state)."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        data = value
    else:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str,
                          ensure_ascii=False).encode()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One line of the audit trail (see the module docstring for each field)."""

    who: str
    role: str
    action: str
    target: str
    source: str
    before: str = ""
    after: str = ""
    outcome: str = "ok"
    at: float = 0.0
    #: the stream id once stored (``<ms>-<seq>``), empty before
    id: str = ""

    def fields(self) -> dict[str, str]:
        """The stream fields (everything but the id)."""
        return {k: str(v) for k, v in asdict(self).items() if k != "id"}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``at`` also as ISO 8601 UTC)."""
        doc = asdict(self)
        doc["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.at)) + \
            f".{int((self.at % 1) * 1000):03d}Z"
        return doc

    @classmethod
    def from_fields(cls, entry_id: str, values: Mapping[Any, Any]) -> AuditEntry:
        """Read a stream entry (bytes or str fields; unknown fields ignored)."""
        text = {_s(k): _s(v) for k, v in values.items()}
        known = {f.name for f in fields(cls)} - {"id", "at"}
        try:
            at = float(text.get("at", "0"))
        except ValueError:
            at = 0.0
        return cls(**{k: v for k, v in text.items() if k in known}, at=at, id=entry_id)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def cli_actor() -> tuple[str, str, str]:
    """``(who, role, source)`` for the command line: the operating system user, as an
    admin (whoever can read the config file holds every secret), from this host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid()) if hasattr(os, "getuid") else "?"
    return f"cli:{user}", "admin", f"cli@{socket.gethostname()}"


def from_settings(settings: Settings, redis: Redis | None = None) -> AuditLog:
    """The deployment's audit trail (with a Redis client of its own unless one is given:
    the caller then closes it with :meth:`AuditLog.aclose`)."""
    own = redis is None
    client = redis if redis is not None else Redis.from_url(
        settings.redis.url, socket_timeout=2.0,
        socket_connect_timeout=settings.redis.connect_timeout_s)
    file = settings.audit.file
    audit = AuditLog(client, keys_from_settings(settings),
                     retention_days=settings.audit.retention_days,
                     mirror=settings.path(file) if file is not None else None)
    audit.owns_redis = own
    return audit


class AuditLog:
    """Writes entries to the Redis Stream (and the mirror file) and reads them back."""

    def __init__(self, redis: Redis | None, keys: Keys, *, retention_days: float = 180.0,
                 mirror: Path | None = None, clock: Any = time.time) -> None:
        self.redis = redis
        self.keys = keys
        self.retention_s = retention_days * DAY_S
        self.mirror = mirror
        self.clock = clock
        #: close the Redis client in :meth:`aclose` (it was made for this log)
        self.owns_redis = False
        self._tasks: set[asyncio.Task[str]] = set()

    async def write(self, entry: AuditEntry) -> AuditEntry:
        """Store ``entry`` (stamped now); returns it with its time and stream id.
        Never raises: a failure is logged and counted, the mirror still written."""
        now = self.clock()
        entry = replace(entry, at=now)
        stored_id = ""
        if self.redis is not None:
            minid = f"{int((now - self.retention_s) * 1000)}-0"
            try:
                stored_id = await self._xadd(entry, f"{int(now * 1000)}-*", minid)
                AUDIT_ENTRIES.labels(outcome="stored").inc()
            except (RedisError, OSError) as exc:
                AUDIT_ENTRIES.labels(outcome="redis_failed").inc()
                log.error("audit entry %s by %s NOT stored in Redis (%s)%s", entry.action,
                          entry.who, exc, "; kept in the audit file" if self.mirror else "")
        entry = replace(entry, id=stored_id)
        if self.mirror is not None:
            try:
                await asyncio.to_thread(self._append, entry)
                AUDIT_ENTRIES.labels(outcome="mirrored").inc()
            except OSError as exc:
                AUDIT_ENTRIES.labels(outcome="file_failed").inc()
                log.error("audit entry %s by %s not written to %s: %s", entry.action,
                          entry.who, self.mirror, exc)
        return entry

    async def write_many(self, entries: list[AuditEntry]) -> list[AuditEntry]:
        """Store several entries (each stamped with its own ``at``, or now when it has
        none) in one pipeline; returns them with their ids. Never raises, like
        :meth:`write`. For writers that batch entries off a hot path (the pages' reads)."""
        if not entries:
            return []
        now = self.clock()
        stamped = [replace(e, at=e.at or now) for e in entries]
        ids = [""] * len(stamped)
        if self.redis is not None:
            minid = f"{int((now - self.retention_s) * 1000)}-0"
            try:
                ids = await self._xadd_many(stamped, minid)
                AUDIT_ENTRIES.labels(outcome="stored").inc(len(stamped))
            except (RedisError, OSError) as exc:
                AUDIT_ENTRIES.labels(outcome="redis_failed").inc(len(stamped))
                log.error("%d audit entries NOT stored in Redis (%s)%s", len(stamped), exc,
                          "; kept in the audit file" if self.mirror else "")
        stored = [replace(e, id=i) for e, i in zip(stamped, ids, strict=True)]
        if self.mirror is not None:
            try:
                await asyncio.to_thread(self._append_all, stored)
                AUDIT_ENTRIES.labels(outcome="mirrored").inc(len(stored))
            except OSError as exc:
                AUDIT_ENTRIES.labels(outcome="file_failed").inc(len(stored))
                log.error("%d audit entries not written to %s: %s", len(stored), self.mirror,
                          exc)
        return stored

    async def _xadd_many(self, entries: list[AuditEntry], minid: str) -> list[str]:
        """One pipeline of XADDs with ids from the entries' times; those refused (the
        stream's last id is ahead of them) are added again with ids Redis picks."""
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                fields: Any = entry.fields()
                pipe.xadd(self.keys.audit, fields, id=f"{int(entry.at * 1000)}-*",
                          minid=minid, approximate=False)
            answers = await pipe.execute(raise_on_error=False)
        ids = []
        for entry, answer in zip(entries, answers, strict=True):
            if isinstance(answer, ResponseError):
                answer = await self.redis.xadd(self.keys.audit, entry.fields(),  # type: ignore[arg-type]
                                               minid=minid, approximate=False)
            elif isinstance(answer, Exception):
                raise answer
            ids.append(_s(answer))
        return ids

    async def _xadd(self, entry: AuditEntry, entry_id: str, minid: str) -> str:
        """XADD with the id taken from our clock (so ``--since`` means the ``at`` shown);
        when our clock is behind the stream's last id (another instance's clock runs
        ahead), Redis picks the id."""
        assert self.redis is not None
        fields: Any = entry.fields()
        try:
            raw = await self.redis.xadd(self.keys.audit, fields, id=entry_id, minid=minid,
                                        approximate=False)
        except ResponseError:
            raw = await self.redis.xadd(self.keys.audit, fields, minid=minid, approximate=False)
        return _s(raw)

    def _append_all(self, entries: list[AuditEntry]) -> None:
        for entry in entries:
            self._append(entry)

    def _append(self, entry: AuditEntry) -> None:
        assert self.mirror is not None
        line = (json.dumps(entry.to_dict(), ensure_ascii=False, separators=(",", ":"))
                + "\n").encode()
        self.mirror.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.mirror, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def record(self, entry: AuditEntry) -> None:
        """Write ``entry`` in the background (from synchronous code such as a signal
        handler); :meth:`aclose` waits for it."""
        async def run() -> str:
            return (await self.write(entry)).id

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def entries(self, *, since: float | None = None, until: float | None = None,
                   who: str | None = None, action: str | None = None,
                   limit: int = 100) -> list[AuditEntry]:
        """Entries (oldest first) at or after ``since`` and before ``until`` (epoch s),
        by ``who`` and of ``action`` (a prefix: ``user.`` matches every user change)."""
        if self.redis is None:
            return []
        return await list_entries(self.redis, self.keys, since=since, until=until, who=who,
                                  action=action, limit=limit)

    async def aclose(self) -> None:
        """Wait for the entries written in the background (and close an own client)."""
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self.owns_redis and self.redis is not None:
            await self.redis.aclose()


async def list_entries(redis: Redis, keys: Keys, *, since: float | None = None,
                       until: float | None = None, who: str | None = None,
                       action: str | None = None, limit: int = 100) -> list[AuditEntry]:
    """The audit trail's entries, oldest first, filtered (see :meth:`AuditLog.entries`)."""
    lo = f"{int(since * 1000)}-0" if since is not None else "-"
    hi = f"({int(until * 1000)}-0" if until is not None else "+"
    out: list[AuditEntry] = []
    start = lo
    while len(out) < limit:
        chunk: Any = await redis.xrange(keys.audit, min=start, max=hi, count=SCAN_CHUNK)
        if not chunk:
            break
        for entry_id, values in chunk:
            entry = AuditEntry.from_fields(_s(entry_id), values)
            if who is not None and entry.who != who:
                continue
            if action is not None and not entry.action.startswith(action):
                continue
            out.append(entry)
            if len(out) >= limit:
                break
        start = "(" + _s(chunk[-1][0])
        if len(chunk) < SCAN_CHUNK:
            break
    return out
