"""The ``route`` FastAGI handler: caller in, channel variables out, within the deadline.

The decision deadline starts when the AGI environment has been read
(``session.started_at``). The lookup gets whatever is left of it; when it is not back
in time, or the CRM failed with nothing cached, the call gets the rules file's
default route with ``ROUTE_REASON`` saying why. Whatever happens here, the socket is
closed afterwards and the dialplan goes on: with our variables, or (if we set none)
with its own fallback queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from dialplan.server import AgiSession
from router import metrics
from router.errors import AgiHangup, CallrouteError
from router.log import mask_number
from router.lookup.base import Lookup
from router.models import CallerNumber, Decision, LookupResult
from router.phone import normalize
from router.rules.compiler import CallContext
from router.rules.decide import RuleSet
from router.rules.presence import Presence
from router.settings import Settings

if TYPE_CHECKING:
    from router.rules.ruleswatch import RulesWatcher

log = logging.getLogger(__name__)

#: ``ROUTE_REASON`` for each degraded lookup source.
DEGRADED_REASONS = {"deadline": "deadline", "error": "crm-error"}


@dataclass(frozen=True)
class RouteOutcome:
    """Everything about one routing decision: what ``explain`` prints."""

    number: CallerNumber
    did: str | None
    at: datetime
    lookup: LookupResult
    decision: Decision
    elapsed_ms: float


class Router:
    """Decides where a call goes: normalise, look up (bounded), apply the rules."""

    def __init__(
        self,
        settings: Settings,
        lookup: Lookup,
        rules: Callable[[], RuleSet],
        presence: Presence | None = None,
        clock: Callable[[], datetime] | None = None,
        *,
        count: bool = True,
    ) -> None:
        self.settings = settings
        #: False for a router that only explains: its decisions count in no metric.
        self.count = count
        self.clock = clock or (lambda: datetime.now(UTC))
        #: Set by :func:`router.app.build_router` when the rules come from a watched file.
        self.watcher: RulesWatcher | None = None
        self.lookup = lookup
        self.rules = rules
        self.presence = presence
        routing = settings.routing
        #: The lookup's budget: the deadline less what setting the variables needs.
        self.deadline_s = max(routing.deadline_ms - routing.apply_reserve_ms, 1) / 1000

    async def decide(
        self,
        caller: str | None,
        did: str | None,
        *,
        at: datetime | None = None,
        started: float | None = None,
    ) -> RouteOutcome:
        """Route a call from ``caller`` to ``did``; ``started`` is the monotonic time the
        deadline counts from (now when omitted). Never raises."""
        t0 = time.monotonic() if started is None else started
        when = at or self.clock()
        phone = self.settings.phone
        number = normalize(caller, phone.default_region, phone.internal_pattern)
        remaining = max(0.0, self.deadline_s - (time.monotonic() - t0))
        result = await self.lookup.find(number, timeout_s=remaining)
        ruleset = self.rules()
        degraded = DEGRADED_REASONS.get(result.source)
        if degraded is not None:
            decision = ruleset.safe_default(degraded)
        else:
            ctx = CallContext(
                number=number, did=did, at=when, customer=result.customer,
                lookup_source=result.source, presence=self.presence,
            )
            try:
                decision = ruleset.decide(ctx)
            except Exception:  # a rules bug must not cost the call its route
                log.exception("rules raised; using the default route")
                decision = ruleset.safe_default("rules-error")
        elapsed_ms = (time.monotonic() - t0) * 1000
        if self.count:
            metrics.child(metrics.DECISIONS, decision.rule, decision.reason).inc()
            metrics.DECISION_SECONDS.observe(elapsed_ms / 1000)
        return RouteOutcome(number, did, when, result, decision, elapsed_ms)

    def explaining(self, lookup: Lookup) -> Router:
        """A router with the same settings, rules, presence and clock, deciding with
        ``lookup`` (a read-only one) and counting nothing: what ``explain`` runs."""
        router = Router(self.settings, lookup, self.rules, self.presence,
                        clock=lambda: self.clock(), count=False)
        router.watcher = self.watcher
        return router


def did_of(session: AgiSession) -> str | None:
    """The dialled number: ``?did=`` on the AGI URL, else the extension, else the DNID."""
    env = session.env
    for value in (session.query.get("did"), env.extension, env.dnid):
        if value and value.lower() not in {"unknown", "s"}:
            return value
    return None


#: Told of each decision once the channel has its answer: the session (its AGI
#: environment names the channel) and the outcome. Used by the screen pop.
DecisionListener = Callable[[AgiSession, RouteOutcome], None]


def make_route_handler(
    router: Router, on_decision: DecisionListener | None = None
) -> Callable[[AgiSession], Awaitable[None]]:
    """The FastAGI handler for ``agi://host:4573/route``."""

    async def route(session: AgiSession) -> None:
        outcome = await router.decide(
            session.env.callerid, did_of(session), started=session.started_at
        )
        decision = outcome.decision
        await apply(session, decision)
        session.close()  # the caller waits on the answer, not on the log line
        log.info(
            "caller=%s customer=%s rule=%s reason=%s target=%s queue=%s source=%s %.1fms",
            mask_number(outcome.number.e164) or outcome.number.kind.value,
            outcome.lookup.customer.id if outcome.lookup.customer else "-",
            decision.rule, decision.reason, decision.target or "-", decision.queue or "-",
            outcome.lookup.source, outcome.elapsed_ms,
        )
        if on_decision is not None:
            try:
                on_decision(session, outcome)
            except Exception:
                log.exception("decision listener failed")

    return route


async def apply(session: AgiSession, decision: Decision) -> None:
    """Set the decision's non-empty channel variables; stop quietly if the channel is gone.

    Empty values are not sent: an unset variable reads as empty in the dialplan, ROUTE_*
    and CRM_* are not inherited by new channels, and every command is a round trip to
    Asterisk (this halves them for most calls). ``ROUTE_ACTION`` is never empty and comes
    last, so it is set only when the whole decision has been written.
    """
    items = [(name, value) for name, value in decision.variables.items() if value]
    try:
        await session.set_variables(items)
    except AgiHangup:
        log.info("channel hung up before all variables were set")
    except CallrouteError as exc:
        if not session.timed_out:  # a timeout is logged (and counted) by the server
            log.warning("could not set channel variables: %s", exc)
