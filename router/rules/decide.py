"""Routing decisions: a compiled rules file applied to one call, and the channel
variables the dialplan acts on.

:class:`RuleSet` is what the call path holds: the first rule whose conditions all hold
decides, else the default; :meth:`RuleSet.safe_default` is the route of a degraded call
(deadline passed, CRM failed). :func:`build_variables` lists the variables set.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from router.models import Customer, Decision, RuleTrace
from router.rules.compiler import (
    CallContext,
    CompiledRule,
    Plan,
    Route,
    Terminal,
    compile_rules,
)
from router.rules.schedule import Schedule
from router.rules.spec import AgentEntry, parse_rules
from router.settings import read_yaml

#: Longest caller name written to CALLERID(name).
MAX_CALLER_NAME = 40
_CONTROL = re.compile(r"\s+")


@functools.lru_cache(maxsize=4096)
def clean_caller_name(name: str | None) -> str:
    """A name safe for CALLERID(name): control/format characters dropped, spaces
    collapsed, at most :data:`MAX_CALLER_NAME` characters (remembered: repeat callers)."""
    if not name:
        return ""
    kept = "".join(" " if c.isspace() else c for c in name
                   if c.isspace() or not unicodedata.category(c).startswith("C"))
    return _CONTROL.sub(" ", kept).strip()[:MAX_CALLER_NAME].rstrip()


@functools.lru_cache(maxsize=256)
def _clean_reason(reason: str) -> str:
    word = re.sub(r"[^a-z0-9_-]+", "-", str(reason).lower()).strip("-")
    return word[:32] or "error"


def build_variables(plan: Plan, rule: str, reason: str, customer: Customer | None
                    ) -> dict[str, str]:
    """The channel variables for a plan, in the order they should be set.

    ``ROUTE_ACTION`` comes last: when it is set, every other variable already is, so a
    dialplan seeing it empty knows the AGI session ended early.

    * ``ROUTE_TARGET`` / ``ROUTE_TIMEOUT``: first dial string and ring seconds ("" if none)
    * ``ROUTE_TARGET2`` / ``ROUTE_TIMEOUT2``: a second ring (an ``agent`` fallback)
    * ``ROUTE_QUEUE`` / ``ROUTE_PRIORITY``: the queue and its QUEUE_PRIO ("" if none)
    * ``ROUTE_VOICEMAIL``: the mailbox; ``ROUTE_REJECT``: busy, congestion or hangup
    * ``ROUTE_RULE``: the rule that decided (``default`` if none); ``ROUTE_REASON``: ``rule``,
      ``default``, or why the route was degraded (``deadline``, ``crm-error``...)
    * ``CRM_CUSTOMER_ID``, ``CRM_TIER``, ``CRM_OWNER``: "" for an unknown caller
    * ``CRM_KIND``: the CRM object the customer is (contact, lead, ...; the lookup's
      ``kind``), "" when unknown: the call record posts on that object
    * ``CALLERID(name)``: the customer's cleaned name, only when there is one
    * ``ROUTE_ACTION``: dial, queue, voicemail or reject
    """
    dials, term = plan.dials, plan.terminal
    first = dials[0] if dials else None
    second = dials[1] if len(dials) > 1 else None
    variables = {
        "ROUTE_TARGET": first.target if first else "",
        "ROUTE_TIMEOUT": str(first.ring_s) if first else "",
        "ROUTE_TARGET2": second.target if second else "",
        "ROUTE_TIMEOUT2": str(second.ring_s) if second else "",
        "ROUTE_QUEUE": term.value if term.kind == "queue" else "",
        "ROUTE_PRIORITY": str(term.priority) if term.kind == "queue" and
        term.priority is not None else "",
        "ROUTE_VOICEMAIL": term.value if term.kind == "voicemail" else "",
        "ROUTE_REJECT": term.value if term.kind == "reject" else "",
        "ROUTE_RULE": rule,
        "ROUTE_REASON": reason,
        "CRM_CUSTOMER_ID": customer.id if customer else "",
        "CRM_TIER": (customer.tier or "") if customer else "",
        "CRM_OWNER": (customer.owner or "") if customer else "",
        "CRM_KIND": (customer.kind or "") if customer else "",
    }
    name = clean_caller_name(customer.name) if customer else ""
    if name:
        variables["CALLERID(name)"] = name
    variables["ROUTE_ACTION"] = "dial" if dials else term.kind
    return variables


def _decision(plan: Plan, rule: str, reason: str, customer: Customer | None,
              trace: list[RuleTrace]) -> Decision:
    term = plan.terminal
    return Decision(
        rule=rule,
        reason=reason,
        action="dial" if plan.dials else term.kind,
        target=plan.dials[0].target if plan.dials else None,
        queue=term.value if term.kind == "queue" else None,
        priority=term.priority if term.kind == "queue" else None,
        variables=build_variables(plan, rule, reason, customer),
        trace=trace,
    )


class RuleSet:
    """A loaded rules file: ``decide()`` picks the route of a call.

    Build it with :func:`load_rules` or :meth:`from_mapping`; it is immutable, so a reload
    builds a new one and swaps the reference.
    """

    def __init__(self, rules: list[CompiledRule], default: Route,
                 agents: Mapping[str, AgentEntry], schedules: Mapping[str, Schedule],
                 source: str, default_queue: str) -> None:
        self.rules = tuple(rules)
        self.default = default
        self.agents = dict(agents)
        self.schedules = dict(schedules)
        self.source = source
        self.default_queue = default_queue
        self._safe = self._build_safe()

    @classmethod
    def from_mapping(cls, data: Any, *, source: str = "<rules>",
                     default_queue: str = "support") -> RuleSet:
        """Validate and compile a parsed rules document; ConfigError on any problem."""
        compiled = compile_rules(parse_rules(data, source), source, default_queue)
        return cls(list(compiled.rules), compiled.default, compiled.agents,
                   compiled.schedules, source, default_queue)

    @classmethod
    def default_only(cls, default_queue: str = "support") -> RuleSet:
        """A rule set with no rules: every call goes to ``default_queue``."""
        return cls.from_mapping({}, source="<built-in>", default_queue=default_queue)

    @property
    def names(self) -> list[str]:
        """Rule names in evaluation order."""
        return [r.name for r in self.rules]

    def decide(self, ctx: CallContext, *, reason: str | None = None) -> Decision:
        """The route for ``ctx``: the first rule whose conditions all hold, else the default.

        ``reason`` overrides ROUTE_REASON (normally ``rule`` or ``default``), for a caller
        that routes on a degraded lookup (e.g. ``crm-error``) but still applies the rules.
        """
        trace: list[RuleTrace] = []
        customer, presence = ctx.customer, ctx.presence
        memo: dict[str, tuple[bool, str]] = {}
        for rule in self.rules:
            failed: str | None = None
            for check in rule.checks:
                failed = check(ctx, memo)
                if failed is not None:
                    break
            if failed is not None:
                trace.append(RuleTrace(rule=rule.name, matched=False,
                                                       why=failed))
                continue
            plan = rule.route.resolve(customer, presence)
            why = f"{len(rule.checks)} condition(s) hold" if rule.checks else "no conditions"
            trace.append(RuleTrace(
                rule=rule.name, matched=True, why=f"{why}; {plan.note}" if plan.note else why))
            return _decision(plan, rule.name, _clean_reason(reason or "rule"), customer, trace)
        plan = self.default.resolve(customer, presence)
        why = "no rule matched" + (f"; {plan.note}" if plan.note else "")
        trace.append(RuleTrace(rule="default", matched=True, why=why))
        return _decision(plan, "default", _clean_reason(reason or "default"), customer, trace)

    def safe_default(self, reason: str) -> Decision:
        """The default route with no customer and no presence, for degraded paths
        (deadline passed, lookup failed). Never raises."""
        try:
            base = self._safe
            word = _clean_reason(reason)
            return Decision(
                rule=base.rule, reason=word, action=base.action, target=base.target,
                queue=base.queue, priority=base.priority,
                variables={**base.variables, "ROUTE_REASON": word,
                           "ROUTE_ACTION": base.variables["ROUTE_ACTION"]},
                trace=[RuleTrace(rule="default", matched=True,
                                                 why=f"safe default: {word}")])
        except Exception:
            plan = Plan((), Terminal("queue", self.default_queue or "support"))
            return _decision(plan, "default", "error", None, [])

    def _build_safe(self) -> Decision:
        try:
            plan = self.default.resolve(None, None)
        except Exception:
            plan = Plan((), Terminal("queue", self.default_queue))
        return _decision(plan, "default", "default", None, [])


def load_rules(path: str | Path, *, default_queue: str = "support") -> RuleSet:
    """Load, validate and compile the rules file at ``path``.

    Every problem is a :class:`ConfigError` naming the file, the rule (by name and
    position) and the field, e.g. ``rules.yaml: rule 'vip-owner' (#2): when.tier: ...``.
    """
    file = Path(path)
    return RuleSet.from_mapping(read_yaml(file), source=str(file), default_queue=default_queue)


