"""Each call's routing decision, from FastAGI time to the moment its phone rings.

The route handler knows the customer, the rule and why; the AMI side sees the ring a
moment later. The handler puts the decision here keyed by the channel's ``Uniqueid``
(from the AGI environment); the live view takes it when that channel dials or queues.
In-process and bounded (oldest dropped first, entries expire): a call whose AGI ran on
another instance is shown from its channel variables and the shared customer cache.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.models import Customer

MAX_ENTRIES = 20_000
TTL_S = 3600.0


@dataclass(frozen=True, slots=True)
class CallDecision:
    """What the router decided for one channel, and why."""

    uniqueid: str
    at: float
    caller: str | None
    customer: Customer | None
    rule: str
    reason: str
    description: str | None
    note: str | None
    target: str | None
    queue: str | None
    action: str
    source: str
    lookup_ms: float


class DecisionStore:
    """Bounded map ``Uniqueid`` → :class:`CallDecision`; feeds the lookup-latency window."""

    def __init__(
        self,
        describe: Callable[[str], str | None] | None = None,
        on_lookup: Callable[[str, float], None] | None = None,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
        ttl_s: float = TTL_S,
    ) -> None:
        self.describe = describe
        self.on_lookup = on_lookup
        self.clock = clock
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, CallDecision] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, session: Any, outcome: Any) -> None:
        """The route handler's listener: ``session`` is an AgiSession, ``outcome`` a
        RouteOutcome (typed loosely: this module must not import the call path)."""
        uid = session.env.uniqueid
        lookup = outcome.lookup
        if self.on_lookup is not None:
            self.on_lookup(lookup.source, lookup.elapsed_ms)
        if not uid:
            return
        decision = outcome.decision
        matched = next((t for t in reversed(decision.trace) if t.matched), None)
        self.add(CallDecision(
            uniqueid=uid, at=self.clock(), caller=outcome.number.e164,
            customer=lookup.customer, rule=decision.rule, reason=decision.reason,
            description=self.describe(decision.rule) if self.describe else None,
            note=matched.why if matched is not None else None,
            target=decision.target, queue=decision.queue, action=decision.action,
            source=lookup.source, lookup_ms=round(lookup.elapsed_ms, 2),
        ))

    def add(self, decision: CallDecision) -> None:
        """Keep ``decision`` (replacing an older one of the same channel)."""
        self._items.pop(decision.uniqueid, None)
        self._items[decision.uniqueid] = decision
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def get(self, uniqueid: str) -> CallDecision | None:
        """The decision made on channel ``uniqueid``, if recent."""
        found = self._items.get(uniqueid)
        if found is None:
            return None
        if self.clock() - found.at > self.ttl_s:
            del self._items[uniqueid]
            return None
        return found
