"""Routing rules: a YAML file of ordered rules that turn a call into a :class:`Decision`.

The file (see ``examples/rules.yaml`` for a commented one)::

    agents:                           # CRM owner id -> dial string
      "7001": Local/7001@agents
      "7002": {dial: PJSIP/7002, name: Bob}
    schedules:                        # named time windows, see router.schedule
      business-hours:
        timezone: Asia/Shanghai
        hours: {mon-fri: "09:00-18:00"}
        holidays: [2025-10-01]
    rules:                            # ordered: the first rule whose conditions all hold wins
      - name: vip-owner
        when: {tier: [gold, platinum], schedule: business-hours}
        owner: {ring_s: 15, fallback: {queue: {name: vip, priority: 10}}}
      - name: unknown-sales
        when: {known: false, did: ["4008002000"]}
        queue: sales                  # shorthand for {name: sales}
    default: {queue: support}         # when no rule matches (default: the default queue)

Conditions under ``when:`` (all must hold; an absent one holds for every call). An unknown
caller counts as a customer with nothing set: no tier, tags, owner, value or language.

========================  ==========================================================
``known``                 true: the CRM knows the caller; false: it does not
``tier``                  list; the customer's tier is one of them (case-insensitive)
``min_value/max_value``   the customer's value is >= / <= (no value: fails)
``has_owner``             true / false: the customer has an owner id
``tags_any/all/none``     lists of tags (case-insensitive)
``did``                   list; the dialled number (``?did=`` of the AGI URL) is one of them
``did_pattern``           ``_400800XXXX`` (Asterisk: X 0-9, Z 1-9, N 2-9, [1-5], ``.`` one or
                          more, ``!`` zero or more) or else a regular expression; full match
``schedule``              the named schedule is open at the call time
``outside_schedule``      the named schedule is closed at the call time
``caller_country``        list of ISO 3166 codes of the caller's number
``owner_available``       true: the owner is in ``agents`` and presence does not say busy
``open_tickets_min``      the customer has at least this many open tickets
``language``              list; ``zh`` matches ``zh`` and ``zh-CN``
``number_kind``           list of e164, anonymous, internal, short_code, invalid
========================  ==========================================================

Actions (exactly one per rule, and for ``default``):

* ``owner: {ring_s, fallback}``: ring the customer's owner (looked up in ``agents``), then
  the fallback. When the customer has no owner, the owner is not in ``agents``, or presence
  says the owner's device is busy, the rule **still matches and goes straight to its
  fallback** (the trace says why). To make a rule skip such calls instead, add
  ``has_owner: true`` / ``owner_available: true`` to its ``when``.
* ``agent: {id, ring_s, fallback}``: the same for a fixed agent of the ``agents`` table.
* ``queue: {name, priority}``, ``voicemail: {mailbox}``, ``reject: {cause}`` (busy,
  congestion, hangup). ``queue``, ``voicemail``, ``reject`` and ``agent`` accept a bare
  string as shorthand.

A fallback is ``queue``, ``voicemail`` or ``agent`` (whose own fallback is a queue or a
voicemail). A missing fallback means the default queue (``routing.default_queue``).

The decision reaches the dialplan as channel variables, see :func:`build_variables`.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from router.errors import ConfigError
from router.models import CallerNumber, Customer, Decision, NumberKind, RuleTrace
from router.rules.presence import Presence
from router.rules.schedule import Schedule, ScheduleSpec
from router.settings import read_yaml

#: Longest caller name written to CALLERID(name).
MAX_CALLER_NAME = 40
_ACTIONS = ("owner", "agent", "queue", "voicemail", "reject")
_SHORTHAND = {"queue": "name", "voicemail": "mailbox", "reject": "cause", "agent": "id"}
_NAME = r"^[A-Za-z0-9_.:-]{1,64}$"


def _to_str(value: Any) -> Any:
    """YAML reads ``7001`` as an int; ids and numbers are strings here."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


Id = Annotated[str, BeforeValidator(_to_str), Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AgentEntry(_Strict):
    """One agent: the dial string that rings them, and a display name."""

    dial: str = Field(pattern=r"^[A-Za-z0-9_-]+/[^\s,|&]+$")
    name: str | None = None


class QueueSpec(_Strict):
    """Send the call to an Asterisk queue, optionally with a QUEUE_PRIO."""

    name: str = Field(pattern=_NAME)
    priority: int | None = Field(None, ge=0, le=1_000_000)


class VoicemailSpec(_Strict):
    """Send the call to a voicemail box (``box@context``)."""

    mailbox: str = Field(pattern=r"^[A-Za-z0-9_.-]+(@[A-Za-z0-9_.-]+)?$")


class RejectSpec(_Strict):
    """Refuse the call with a busy, congestion or plain hangup signal."""

    cause: Literal["busy", "congestion", "hangup"] = "busy"


class _ActionBase(_Strict):
    """Common validation: shorthand strings, exactly one action key set."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key, field in _SHORTHAND.items():
            if key in cls.model_fields and isinstance(out.get(key), str | int):
                out[key] = {field: _to_str(out[key])}
        return out

    @model_validator(mode="after")
    def _exactly_one(self) -> _ActionBase:
        present = [k for k in _ACTIONS if k in type(self).model_fields and getattr(self, k)]
        if len(present) != 1:
            allowed = ", ".join(k for k in _ACTIONS if k in type(self).model_fields)
            found = ", ".join(present) or "none"
            raise ValueError(f"needs exactly one action of {allowed} (found {found})")
        return self


class TerminalSpec(_ActionBase):
    """Where a call ends up after ringing: a queue or a voicemail box."""

    queue: QueueSpec | None = None
    voicemail: VoicemailSpec | None = None


class AgentFallbackSpec(_Strict):
    """Ring one more agent as a fallback, then a queue or a voicemail box."""

    id: Id
    ring_s: int = Field(20, ge=1, le=600)
    fallback: TerminalSpec | None = None


class FallbackSpec(_ActionBase):
    """What follows an unanswered (or skipped) ring: queue, voicemail or another agent."""

    queue: QueueSpec | None = None
    voicemail: VoicemailSpec | None = None
    agent: AgentFallbackSpec | None = None


class OwnerSpec(_Strict):
    """Ring the customer's owner for ``ring_s`` seconds, then the fallback."""

    ring_s: int = Field(20, ge=1, le=600)
    fallback: FallbackSpec | None = None


class AgentSpec(_Strict):
    """Ring a fixed agent for ``ring_s`` seconds, then the fallback."""

    id: Id
    ring_s: int = Field(20, ge=1, le=600)
    fallback: FallbackSpec | None = None


class ActionSpec(_ActionBase):
    """One action: owner, agent, queue, voicemail or reject."""

    owner: OwnerSpec | None = None
    agent: AgentSpec | None = None
    queue: QueueSpec | None = None
    voicemail: VoicemailSpec | None = None
    reject: RejectSpec | None = None


def _lower_list(value: list[str] | None) -> list[str] | None:
    return [v.strip().lower() for v in value] if value is not None else None


class Conditions(_Strict):
    """The ``when:`` block of a rule; every condition set must hold."""

    known: bool | None = None
    tier: list[str] | None = None
    min_value: float | None = None
    max_value: float | None = None
    has_owner: bool | None = None
    tags_any: list[str] | None = None
    tags_all: list[str] | None = None
    tags_none: list[str] | None = None
    did: list[Id] | None = None
    did_pattern: str | None = None
    schedule: str | None = None
    outside_schedule: str | None = None
    caller_country: list[str] | None = None
    owner_available: bool | None = None
    open_tickets_min: int | None = Field(None, ge=0)
    language: list[str] | None = None
    number_kind: list[NumberKind] | None = None

    @field_validator("tier", "tags_any", "tags_all", "tags_none", "language")
    @classmethod
    def _lower(cls, value: list[str] | None) -> list[str] | None:
        return _lower_list(value)

    @field_validator("caller_country")
    @classmethod
    def _countries(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for code in value:
            if not re.fullmatch(r"[A-Za-z]{2}", code):
                raise ValueError(f"{code!r} is not an ISO 3166 alpha-2 code such as CN")
        return [c.upper() for c in value]

    @field_validator("did_pattern")
    @classmethod
    def _pattern(cls, value: str | None) -> str | None:
        if value is not None:
            compile_did_pattern(value)
        return value


class RuleSpec(ActionSpec):
    """One rule as written: name, description, conditions and one action."""

    name: str = Field(pattern=_NAME)
    description: str | None = None
    when: Conditions = Field(default_factory=Conditions)


class RulesFile(_Strict):
    """The whole rules file."""

    agents: dict[Id, Annotated[AgentEntry, BeforeValidator(
        lambda v: {"dial": v} if isinstance(v, str) else v)]] = Field(default_factory=dict)
    schedules: dict[str, ScheduleSpec] = Field(default_factory=dict)
    rules: list[RuleSpec] = Field(default_factory=list)
    default: ActionSpec | None = None


# --------------------------------------------------------------------------------------
# DID patterns


def compile_did_pattern(text: str) -> re.Pattern[str]:
    """A compiled full-match pattern: Asterisk style when ``text`` starts with ``_``,
    else a regular expression. ValueError when it is neither."""
    source = _asterisk_regex(text[1:]) if text.startswith("_") else text
    try:
        return re.compile(source)
    except re.error as exc:
        raise ValueError(f"bad pattern {text!r}: {exc}") from exc


def _asterisk_regex(pattern: str) -> str:
    """Translate an Asterisk extension pattern (without its ``_``) into a regex."""
    classes = {"X": "[0-9]", "Z": "[1-9]", "N": "[2-9]", ".": ".+", "!": ".*"}
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "[":
            end = pattern.find("]", i)
            if end < 0:
                raise ValueError(f"unclosed [ in pattern _{pattern}")
            body = pattern[i + 1 : end]
            out.append("[" + "".join(c if c == "-" else re.escape(c) for c in body) + "]")
            i = end + 1
            continue
        out.append(classes.get(char.upper(), re.escape(char)))
        i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------
# Evaluation


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


class _Route:
    """A compiled action; ``resolve`` is called on the call path and never raises."""

    def resolve(self, customer: Customer | None, presence: Presence | None) -> Plan:
        raise NotImplementedError

    def describe(self) -> str:
        """What this route tries first, e.g. ``queue vip`` or ``agent 7002``."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class _TerminalRoute(_Route):
    terminal: Terminal

    def resolve(self, customer: Customer | None, presence: Presence | None) -> Plan:
        return Plan((), self.terminal)

    def describe(self) -> str:
        return self.terminal.describe()


@dataclass(frozen=True, slots=True)
class _DialRoute(_Route):
    """Ring the owner (``agent_id`` None) or a fixed agent, then the fallback."""

    agent_id: str | None
    ring_s: int
    fallback: _Route
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
    def action(self, spec: ActionSpec, where: str) -> _Route:
        """Compile the one action of a rule or of ``default``."""
        if spec.owner is not None:
            return _DialRoute(None, spec.owner.ring_s,
                              self.fallback(spec.owner.fallback, where, "owner.fallback"),
                              self.agents)
        if spec.agent is not None:
            self.check_agent(spec.agent.id, where, "agent.id")
            return _DialRoute(spec.agent.id, spec.agent.ring_s,
                              self.fallback(spec.agent.fallback, where, "agent.fallback"),
                              self.agents)
        if spec.reject is not None:
            return _TerminalRoute(Terminal("reject", spec.reject.cause))
        return _TerminalRoute(self.terminal(spec))

    def terminal(self, spec: TerminalSpec | FallbackSpec | ActionSpec | None) -> Terminal:
        """The queue or voicemail of ``spec``; the default queue when there is none."""
        if spec is not None and spec.queue is not None:
            return Terminal("queue", spec.queue.name, spec.queue.priority)
        if spec is not None and spec.voicemail is not None:
            return Terminal("voicemail", spec.voicemail.mailbox)
        return self.default_terminal

    def fallback(self, spec: FallbackSpec | None, where: str, field: str) -> _Route:
        """Compile a fallback: a terminal, or one more agent then a terminal."""
        if spec is not None and spec.agent is not None:
            self.check_agent(spec.agent.id, where, f"{field}.agent.id")
            last = _TerminalRoute(self.terminal(spec.agent.fallback))
            return _DialRoute(spec.agent.id, spec.agent.ring_s, last, self.agents)
        return _TerminalRoute(self.terminal(spec))

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


# --------------------------------------------------------------------------------------
# Decisions and channel variables

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


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """One rule ready to evaluate."""

    name: str
    description: str | None
    checks: tuple[Check, ...]
    route: _Route


class RuleSet:
    """A loaded rules file: ``decide()`` picks the route of a call.

    Build it with :func:`load_rules` or :meth:`from_mapping`; it is immutable, so a reload
    builds a new one and swaps the reference.
    """

    def __init__(self, rules: list[CompiledRule], default: _Route,
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
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError("the top level must be a mapping (agents, schedules, rules, "
                              "default)", location=source)
        try:
            spec = RulesFile.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_explain(exc, data), location=source) from exc
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
                   else _TerminalRoute(compiler.default_terminal))
        return cls(compiled, default, compiler.agents, compiler.schedules, source,
                   default_queue)

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


# --------------------------------------------------------------------------------------
# Error messages

_TYPE_TAG = re.compile(r"^(str|int|float|bool|date|list\[.*\]|dict\[.*\]|[A-Z]\w*(Spec|Entry)"
                       r"|function-\w+\[.*\]|constrained-\w+)$")


def _explain(exc: ValidationError, data: Mapping[str, Any]) -> str:
    """One clause per problem, naming the rule by name and 1-based position."""
    lines: list[str] = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and _TYPE_TAG.match(p))]
        message = err["msg"].removeprefix("Value error, ")
        head = ""
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            head = _rule_label(data, loc[1]) + ": "
            loc = loc[2:]
        elif loc and loc[0] == "schedules" and len(loc) >= 2:
            head = f"schedule {loc[1]!r}: "
            loc = loc[2:]
        field = ".".join(str(p) for p in loc) or ("(rule)" if head else "(top level)")
        line = f"{head}{field}: {message}"
        if line not in lines:
            lines.append(line)
    return "; ".join(lines)


def _rule_label(data: Mapping[str, Any], index: int) -> str:
    rules = data.get("rules")
    name = None
    if isinstance(rules, list) and index < len(rules) and isinstance(rules[index], dict):
        name = rules[index].get("name")
    return f"rule {name!r} (#{index + 1})" if isinstance(name, str) else f"rule #{index + 1}"
