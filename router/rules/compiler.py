"""The rules file compiled: each rule's conditions become checks (closures that say why
they fail) and its action a route that resolves to a plan of rings and an end, for one
call at a time. Cross-references (agents, schedules) are checked here, with errors that
name the rule and field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from router.errors import ConfigError
from router.models import CallerNumber, Customer, NumberKind
from router.rules.presence import Presence
from router.rules.schedule import Schedule
from router.rules.spec import (
    ActionSpec,
    AgentEntry,
    Conditions,
    FallbackSpec,
    RulesFile,
    TerminalSpec,
    compile_did_pattern,
)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Everything a rule may look at for one call.

    ``at`` should be timezone-aware; a naive value is taken as UTC. ``presence`` None
    means nothing is known about agents, so every agent counts as available.
    """

    number: CallerNumber
    did: str | None
    at: datetime
    customer: Customer | None
    lookup_source: str
    presence: Presence | None = None


@dataclass(frozen=True, slots=True)
class Dial:
    """One ring step: who, with which dial string, for how long."""

    who: str
    target: str
    ring_s: int


@dataclass(frozen=True, slots=True)
class Terminal:
    """Where a call ends: a queue, a voicemail box, or a rejection."""

    kind: Literal["queue", "voicemail", "reject"]
    value: str
    priority: int | None = None

    def describe(self) -> str:
        """E.g. ``queue vip``."""
        return f"{self.kind} {self.value}"


@dataclass(frozen=True, slots=True)
class Plan:
    """A resolved action: rings in order, then the terminal; ``note`` says what was skipped."""

    dials: tuple[Dial, ...]
    terminal: Terminal
    note: str = ""


class Route:
    """A compiled action; ``resolve`` is called on the call path and never raises."""

    def resolve(self, customer: Customer | None, presence: Presence | None) -> Plan:
        raise NotImplementedError

    def describe(self) -> str:
        """What this route tries first, e.g. ``queue vip`` or ``agent 7002``."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class TerminalRoute(Route):
    terminal: Terminal

    def resolve(self, customer: Customer | None, presence: Presence | None) -> Plan:
        return Plan((), self.terminal)

    def describe(self) -> str:
        return self.terminal.describe()


@dataclass(frozen=True, slots=True)
class DialRoute(Route):
    """Ring the owner (``agent_id`` None) or a fixed agent, then the fallback."""

    agent_id: str | None
    ring_s: int
    fallback: Route
    agents: Mapping[str, AgentEntry]

    def resolve(self, customer: Customer | None, presence: Presence | None) -> Plan:
        if self.agent_id is None:
            who = customer.owner if customer is not None else None
            if not who:
                return self._skip("no owner", customer, presence)
            label = f"owner {who}"
        else:
            who, label = self.agent_id, f"agent {self.agent_id}"
        entry = self.agents.get(who)
        if entry is None:
            return self._skip(f"{label} not in agents table", customer, presence)
        if presence is not None and not presence.available(entry.dial):
            return self._skip(f"{label} busy ({presence.state(entry.dial)})", customer, presence)
        rest = self.fallback.resolve(customer, presence)
        return Plan((Dial(who, entry.dial, self.ring_s), *rest.dials), rest.terminal, rest.note)

    def describe(self) -> str:
        return "owner" if self.agent_id is None else f"agent {self.agent_id}"

    def _skip(self, why: str, customer: Customer | None, presence: Presence | None) -> Plan:
        rest = self.fallback.resolve(customer, presence)
        note = f"{why}: fallback {self.fallback.describe()}"
        return Plan(rest.dials, rest.terminal, f"{note}; {rest.note}" if rest.note else note)


#: A compiled condition: None when it holds, else why not. The dict is a per-decision
#: scratch space (schedule states are computed once per call).
Check = Callable[[CallContext, dict[str, tuple[bool, str]]], str | None]


def _fmt(values: list[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _num(value: float) -> str:
    return f"{value:g}"


class _Compiler:
    """Turns validated specs into closures; raises ConfigError on cross-reference errors."""

    def __init__(self, spec: RulesFile, source: str, default_queue: str) -> None:
        self.source = source
        self.agents: dict[str, AgentEntry] = dict(spec.agents)
        self.default_terminal = Terminal("queue", default_queue)
        self.schedules: dict[str, Schedule] = {}
        for name, sched in spec.schedules.items():
            try:
                self.schedules[name] = Schedule.compile(name, sched)
            except ValueError as exc:  # pragma: no cover - validated already
                raise ConfigError(f"schedule {name!r}: {exc}", location=source) from exc

    def fail(self, where: str, field: str, message: str) -> ConfigError:
        """A ConfigError naming the file, the rule and the field."""
        return ConfigError(f"{where}: {field}: {message}", location=self.source)

    # ---- actions
    def action(self, spec: ActionSpec, where: str) -> Route:
        """Compile the one action of a rule or of ``default``."""
        if spec.owner is not None:
            return DialRoute(None, spec.owner.ring_s,
                              self.fallback(spec.owner.fallback, where, "owner.fallback"),
                              self.agents)
        if spec.agent is not None:
            self.check_agent(spec.agent.id, where, "agent.id")
            return DialRoute(spec.agent.id, spec.agent.ring_s,
                              self.fallback(spec.agent.fallback, where, "agent.fallback"),
                              self.agents)
        if spec.reject is not None:
            return TerminalRoute(Terminal("reject", spec.reject.cause))
        return TerminalRoute(self.terminal(spec))

    def terminal(self, spec: TerminalSpec | FallbackSpec | ActionSpec | None) -> Terminal:
        """The queue or voicemail of ``spec``; the default queue when there is none."""
        if spec is not None and spec.queue is not None:
            return Terminal("queue", spec.queue.name, spec.queue.priority)
        if spec is not None and spec.voicemail is not None:
            return Terminal("voicemail", spec.voicemail.mailbox)
        return self.default_terminal

    def fallback(self, spec: FallbackSpec | None, where: str, field: str) -> Route:
        """Compile a fallback: a terminal, or one more agent then a terminal."""
        if spec is not None and spec.agent is not None:
            self.check_agent(spec.agent.id, where, f"{field}.agent.id")
            last = TerminalRoute(self.terminal(spec.agent.fallback))
            return DialRoute(spec.agent.id, spec.agent.ring_s, last, self.agents)
        return TerminalRoute(self.terminal(spec))

    def check_agent(self, agent_id: str, where: str, field: str) -> None:
        """Fail unless ``agent_id`` is in the agents table."""
        if agent_id not in self.agents:
            known = ", ".join(sorted(self.agents)) or "none defined"
            raise self.fail(where, field, f"unknown agent {agent_id!r} (agents: {known})")

    def schedule(self, name: str, where: str, field: str) -> Schedule:
        """The compiled schedule called ``name``."""
        try:
            return self.schedules[name]
        except KeyError:
            known = ", ".join(sorted(self.schedules)) or "none defined"
            raise self.fail(where, field, f"unknown schedule {name!r} (schedules: {known})"
                            ) from None

    # ---- conditions
    def conditions(self, when: Conditions, where: str) -> list[Check]:
        """One closure per condition set, in a fixed cheap-first order."""
        checks: list[Check] = []
        if when.known is not None:
            checks.append(_known(when.known))
        if when.did is not None:
            checks.append(_did(frozenset(when.did), _fmt(when.did)))
        if when.did_pattern is not None:
            checks.append(_did_pattern(compile_did_pattern(when.did_pattern), when.did_pattern))
        if when.number_kind is not None:
            checks.append(_number_kind(frozenset(when.number_kind)))
        if when.caller_country is not None:
            checks.append(_country(frozenset(when.caller_country), _fmt(when.caller_country)))
        if when.tier is not None:
            checks.append(_tier(frozenset(when.tier), _fmt(when.tier)))
        if when.min_value is not None or when.max_value is not None:
            checks.append(_value(when.min_value, when.max_value))
        if when.has_owner is not None:
            checks.append(_has_owner(when.has_owner))
        if when.tags_any is not None:
            checks.append(_tags_any(frozenset(when.tags_any), _fmt(when.tags_any)))
        if when.tags_all is not None:
            checks.append(_tags_all(tuple(when.tags_all)))
        if when.tags_none is not None:
            checks.append(_tags_none(tuple(when.tags_none)))
        if when.open_tickets_min is not None:
            checks.append(_tickets(when.open_tickets_min))
        if when.language is not None:
            checks.append(_language(tuple(when.language), _fmt(when.language)))
        if when.schedule is not None:
            checks.append(_schedule(self.schedule(when.schedule, where, "when.schedule"), True))
        if when.outside_schedule is not None:
            sched = self.schedule(when.outside_schedule, where, "when.outside_schedule")
            checks.append(_schedule(sched, False))
        if when.owner_available is not None:
            checks.append(_owner_available(when.owner_available, self.agents))
        return checks


def _known(wanted: bool) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        known = ctx.customer is not None
        if known == wanted:
            return None
        return "caller unknown" if wanted else f"caller known ({ctx.customer.id})"  # type: ignore[union-attr]
    return check


def _did(dids: frozenset[str], shown: str) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        return None if ctx.did in dids else f"DID {ctx.did or '(none)'} not in {shown}"
    return check


def _did_pattern(pattern: re.Pattern[str], shown: str) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        if ctx.did is not None and pattern.fullmatch(ctx.did):
            return None
        return f"DID {ctx.did or '(none)'} does not match {shown}"
    return check


def _number_kind(kinds: frozenset[NumberKind]) -> Check:
    shown = _fmt(sorted(k.value for k in kinds))

    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        kind = ctx.number.kind
        return None if kind in kinds else f"number kind {kind.value} not in {shown}"
    return check


def _country(countries: frozenset[str], shown: str) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        country = ctx.number.country
        return None if country in countries else f"caller country {country or '(none)'} " \
                                                  f"not in {shown}"
    return check


def _tier(tiers: frozenset[str], shown: str) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        tier = ctx.customer.tier if ctx.customer is not None else None
        if tier is None:
            return f"no tier ({'caller unknown' if ctx.customer is None else 'not set'}), " \
                   f"wanted {shown}"
        return None if tier.lower() in tiers else f"tier {tier} not in {shown}"
    return check


def _value(low: float | None, high: float | None) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        value = ctx.customer.value if ctx.customer is not None else None
        if value is None:
            return "no customer value"
        if low is not None and value < low:
            return f"value {_num(value)} < {_num(low)}"
        if high is not None and value > high:
            return f"value {_num(value)} > {_num(high)}"
        return None
    return check


def _has_owner(wanted: bool) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        owner = ctx.customer.owner if ctx.customer is not None else None
        if bool(owner) == wanted:
            return None
        return "no owner" if wanted else f"has owner {owner}"
    return check


def _tags(ctx: CallContext) -> frozenset[str]:
    if ctx.customer is None or not ctx.customer.tags:
        return frozenset()
    return frozenset(t.lower() for t in ctx.customer.tags)


def _tags_any(wanted: frozenset[str], shown: str) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        return None if wanted & _tags(ctx) else f"none of tags {shown}"
    return check


def _tags_all(wanted: tuple[str, ...]) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        tags = _tags(ctx)
        for tag in wanted:
            if tag not in tags:
                return f"missing tag {tag}"
        return None
    return check


def _tags_none(unwanted: tuple[str, ...]) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        tags = _tags(ctx)
        for tag in unwanted:
            if tag in tags:
                return f"has tag {tag}"
        return None
    return check


def _tickets(minimum: int) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        count = ctx.customer.open_tickets if ctx.customer is not None else 0
        return None if count >= minimum else f"{count} open tickets < {minimum}"
    return check


def _language(languages: tuple[str, ...], shown: str) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        lang = ctx.customer.language if ctx.customer is not None else None
        if lang:
            low = lang.lower().replace("_", "-")
            for want in languages:
                if low == want or low.startswith(want + "-"):
                    return None
        return f"language {lang or '(none)'} not in {shown}"
    return check


def _schedule(sched: Schedule, want_open: bool) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        state = memo.get(sched.name)
        if state is None:
            state = memo[sched.name] = sched.state(ctx.at)
        is_open, why = state
        return None if is_open == want_open else f"{sched.name} {why}"
    return check


def _owner_available(wanted: bool, agents: Mapping[str, AgentEntry]) -> Check:
    def check(ctx: CallContext, memo: dict[str, tuple[bool, str]]) -> str | None:
        owner = ctx.customer.owner if ctx.customer is not None else None
        if not owner:
            why, available = "no owner", False
        elif (entry := agents.get(owner)) is None:
            why, available = f"owner {owner} not in agents table", False
        elif ctx.presence is not None and not ctx.presence.available(entry.dial):
            why, available = f"owner {owner} busy ({ctx.presence.state(entry.dial)})", False
        else:
            why, available = f"owner {owner} available", True
        return None if available == wanted else why
    return check


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule ready to evaluate."""

    name: str
    description: str | None
    checks: tuple[Check, ...]
    route: Route



@dataclass(frozen=True, slots=True)
class CompiledRules:
    """A whole rules file compiled: what :class:`~router.rules.decide.RuleSet` runs."""

    rules: tuple[CompiledRule, ...]
    default: Route
    agents: Mapping[str, AgentEntry]
    schedules: Mapping[str, Schedule]


def compile_rules(spec: RulesFile, source: str, default_queue: str) -> CompiledRules:
    """Compile a validated rules file; ConfigError on a duplicate rule name or a reference
    to an unknown agent or schedule."""
    compiler = _Compiler(spec, source, default_queue)
    compiled: list[CompiledRule] = []
    seen: dict[str, int] = {}
    for index, rule in enumerate(spec.rules, start=1):
        where = f"rule {rule.name!r} (#{index})"
        if rule.name in seen:
            raise compiler.fail(where, "name", f"duplicate rule name (also rule "
                                               f"#{seen[rule.name]})")
        seen[rule.name] = index
        compiled.append(CompiledRule(rule.name, rule.description,
                                     tuple(compiler.conditions(rule.when, where)),
                                     compiler.action(rule, where)))
    default = (compiler.action(spec.default, "default") if spec.default is not None
               else TerminalRoute(compiler.default_terminal))
    return CompiledRules(tuple(compiled), default, compiler.agents, compiler.schedules)
