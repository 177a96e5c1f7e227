"""The rules file as written: the YAML model, its validation, and error messages that
name the rule and the field.

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

The file is compiled into checks and routes by :mod:`router.rules.compiler` and
applied to calls by :mod:`router.rules.decide`, whose :func:`~router.rules.decide.build_variables`
says which channel variables reach the dialplan.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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
from router.models import NumberKind
from router.rules.schedule import ScheduleSpec

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



def parse_rules(data: Any, source: str) -> RulesFile:
    """Validate a parsed rules document; ConfigError naming the rule and field on any
    problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping (agents, schedules, rules, "
                          "default)", location=source)
    try:
        return RulesFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, data), location=source) from exc


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
