"""The pages' reads of customer records, for the audit trail (:mod:`router.audit`).

Every customer a page shows is a read: a card pushed to (or fetched by) an agent's page
or a supervisor watching it (``customer.card``), the supervisor's live view with names
(``customer.live``: calls with a customer, or from an outside caller whose caller id
name it shows; an internal call between extensions is no customer read), an agent's
list of calls awaiting a disposition (``customer.pending``: each call it newly shows,
its name and number masked), the day's CSV export (``customer.export``). Each entry says who
(the signed-in user and role), what (``customer:<id>``, ``number:<keyed hash>`` for a
caller the CRM does not know, ``call:<linkedid>`` for a withheld number), when, from
where (the page's address) and the hash of what was shown.

Nothing here may slow the ring -> card path: :meth:`PageAudit.card` only appends to an
in-process buffer (no I/O, no hashing), and a background task writes the buffer every
``flush_s`` in one Redis pipeline (:meth:`router.audit.AuditLog.write_many`), hashing the
shown cards there. A page is audited once per call it is shown (the card's later updates,
the talk timer, the end, are the same read), and a supervisor's live view once per
customer it newly shows. The buffer is bounded: past ``max_entries`` the oldest reads are
dropped with an ERROR line and counted (``callroute_audit_entries{outcome="dropped"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from router.audit import AuditEntry, AuditLog, state_hash
from router.metrics import AUDIT_ENTRIES

log = logging.getLogger(__name__)

FLUSH_S = 0.5
MAX_ENTRIES = 50_000
#: Targets in one live-view entry (more customers shown at once: several entries).
MAX_TARGETS = 50


@dataclass
class Reader:
    """Who reads through one page (connection): the audit entry's who, role, source; and
    what it was already shown."""

    who: str
    role: str
    source: str
    seen: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class _Read:
    reader: Reader
    action: str
    at: float
    shown: Any                    # a card (dict), or the targets of a live-view read
    targets: tuple[str, ...] = ()


class PageAudit:
    """Buffers the pages' customer reads and writes them behind (see the module doc)."""

    def __init__(self, audit: AuditLog | None, number_target: Callable[[str], str], *,
                 flush_s: float = FLUSH_S, max_entries: int = MAX_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.audit = audit
        self.number_target = number_target
        self.flush_s = flush_s
        self.clock = clock
        self._buffer: deque[_Read] = deque()
        self.max_entries = max_entries
        self.written = 0
        self.dropped = 0

    @property
    def enabled(self) -> bool:
        """Whether reads are audited at all (an audit trail is configured)."""
        return self.audit is not None

    def _add(self, read: _Read) -> None:
        if len(self._buffer) >= self.max_entries:
            self._buffer.popleft()
            self.dropped += 1
            AUDIT_ENTRIES.labels(outcome="dropped").inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("audit of page reads falls behind: %d read(s) dropped",
                          self.dropped)
        self._buffer.append(read)

    # --- reads (synchronous, no I/O: called on the push path) ---------------------------------
    def card(self, reader: Reader, card: Mapping[str, Any]) -> None:
        """``reader``'s page is shown ``card``: one read per call (and page), and one more
        when a later card names the customer the first did not (completed after a late CRM
        answer)."""
        if self.audit is None:
            return
        customer = card.get("customer") or {}
        seen = f"{card.get('call')}/{customer.get('id') or ''}"  # again once the id is known
        if seen in reader.seen:
            return
        reader.seen.add(seen)
        if len(reader.seen) > 10_000:  # a page open for weeks: bounded (a call shown
            reader.seen = set(list(reader.seen)[5_000:])  # again then is read once more)
        self._add(_Read(reader, "customer.card", self.clock(), card))

    def live(self, reader: Reader, calls: Iterable[Mapping[str, Any]]) -> None:
        """``reader``'s live view shows these calls with customers: the new ones are read
        (a call with a customer id, or an outside caller's call showing its caller id
        name; not an internal call, whose name is a colleague's)."""
        if self.audit is None:
            return
        new = []
        for row in calls:
            target = _customer_target(row.get("customer_id"))
            if target is None and row.get("customer") and row.get("external", True):
                target = f"call:{row.get('call')}"  # a name without an id (caller id name)
            if target is not None and target not in reader.seen:
                reader.seen.add(target)
                new.append(target)
        for i in range(0, len(new), MAX_TARGETS):
            chunk = tuple(new[i:i + MAX_TARGETS])
            self._add(_Read(reader, "customer.live", self.clock(), chunk, chunk))

    def pending(self, reader: Reader, rows: Iterable[Mapping[str, Any]]) -> None:
        """``reader``'s list of calls awaiting a disposition shows ``rows``: the calls it
        newly shows are read (their customer, else the call), in one entry."""
        if self.audit is None:
            return
        new: list[str] = []
        shown: list[Mapping[str, Any]] = []
        for row in rows:
            seen = f"pending:{row.get('call')}"
            if seen in reader.seen:
                continue
            reader.seen.add(seen)
            shown.append(row)
            target = _customer_target(row.get("customer_id")) or f"call:{row.get('call')}"
            if target not in new:
                new.append(target)
        for i in range(0, len(new), MAX_TARGETS):
            chunk = tuple(new[i:i + MAX_TARGETS])
            self._add(_Read(reader, "customer.pending", self.clock(), shown, chunk))

    # --- writing behind -------------------------------------------------------------------------
    def _entry(self, read: _Read) -> AuditEntry:
        r = read.reader
        if read.targets:
            target = ",".join(read.targets)
        else:
            card = read.shown
            customer = card.get("customer") or {}
            target = (_customer_target(customer.get("id"))
                      or (self.number_target(card["caller"]) if card.get("caller") else None)
                      or f"call:{card.get('call')}")
        return AuditEntry(who=r.who, role=r.role, action=read.action, target=target,
                          source=r.source, after=state_hash(read.shown), at=read.at)

    async def flush(self) -> int:
        """Write what is buffered now; returns how many entries."""
        if self.audit is None or not self._buffer:
            return 0
        reads = list(self._buffer)
        self._buffer.clear()
        stored = await self.audit.write_many([self._entry(r) for r in reads])
        self.written += len(stored)
        return len(stored)

    async def run(self, stop: asyncio.Event) -> None:
        """Background: flush every ``flush_s`` until ``stop``, then once more."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.flush_s)
            try:
                await self.flush()
            except Exception:
                log.exception("audit of page reads: flush failed")
        await self.flush()


def _customer_target(customer_id: Any) -> str | None:
    return f"customer:{customer_id}" if customer_id not in (None, "") else None
