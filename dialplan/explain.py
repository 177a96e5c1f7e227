"""Explain a routing decision: for ``callroute explain``, the admin API, the demo.

:func:`explain` decides for one number with a router made by
:meth:`Router.explaining <dialplan.route.Router.explaining>` (a read-only lookup, no
metrics: explaining is not a call). A time given without a UTC offset is read in
``routing.timezone`` when set, else in the time zone of the rules' schedules (the one
the business hours are written in); a rules file whose schedules use several zones
needs an offset or ``routing.timezone``, and one with no schedule reads it as UTC (the
time then routes nothing). :func:`outcome_to_dict` and :func:`format_text` render it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from dialplan.route import RouteOutcome, Router
from router.errors import ConfigError
from router.rules.decide import RuleSet


def call_time(at: datetime | None, ruleset: RuleSet, timezone: str | None) -> datetime | None:
    """``at`` with its time zone (see the module docstring); None stays None (now)."""
    if at is None or at.tzinfo is not None:
        return at
    if timezone:
        return at.replace(tzinfo=ZoneInfo(timezone))
    zones = sorted({schedule.zone.key for schedule in ruleset.schedules.values()})
    if not zones:
        return at.replace(tzinfo=UTC)
    if len(zones) == 1:
        return at.replace(tzinfo=ZoneInfo(zones[0]))
    raise ConfigError(
        f"the time {at.isoformat()} has no UTC offset and the rules' schedules use several "
        f"time zones ({', '.join(zones)}): add an offset (e.g. {at.isoformat()}+08:00) "
        "or set routing.timezone")


async def explain(router: Router, caller: str, did: str | None,
                  at: datetime | None = None) -> RouteOutcome:
    """The decision for ``caller`` dialling ``did`` at ``at`` (default: now), made by
    ``router`` (one from :meth:`Router.explaining`). Raises :class:`ConfigError` for a
    time without an offset that cannot be placed in one zone."""
    when = call_time(at, router.rules(), router.settings.routing.timezone)
    return await router.decide(caller, did, at=when)


def outcome_to_dict(outcome: RouteOutcome) -> dict[str, Any]:
    """The decision as one JSON-ready object (keys: number, customer, rule, variables, ...)."""
    number = outcome.number
    lookup = outcome.lookup
    decision = outcome.decision
    return {
        "number": {
            "raw": number.raw, "kind": number.kind.value, "e164": number.e164,
            "country": number.country,
        },
        "did": outcome.did,
        "at": outcome.at.isoformat(),
        "customer": lookup.customer.model_dump(mode="json") if lookup.customer else None,
        "lookup": {
            "source": lookup.source, "found": lookup.customer is not None,
            "age_s": lookup.age_s, "error": lookup.error,
            "elapsed_ms": round(lookup.elapsed_ms, 3),
        },
        "rule": decision.rule,
        "reason": decision.reason,
        "action": decision.action,
        "trace": [{"rule": t.rule, "matched": t.matched, "why": t.why} for t in decision.trace],
        "variables": dict(decision.variables),
        "elapsed_ms": round(outcome.elapsed_ms, 3),
    }


def format_text(outcome: RouteOutcome) -> str:
    """The decision as a human-readable trace."""
    data = outcome_to_dict(outcome)
    num = data["number"]
    lines = [
        f"number     {num['raw']!r} -> {num['e164'] or num['kind']}"
        + (f" ({num['country']})" if num["country"] else ""),
        f"did        {outcome.did or '-'}",
        f"time       {data['at']}",
    ]
    look = data["lookup"]
    if outcome.lookup.customer is not None:
        c = outcome.lookup.customer
        lines.append(
            f"customer   {c.id} {c.name or ''} tier={c.tier or '-'} owner={c.owner or '-'} "
            f"value={c.value if c.value is not None else '-'} tags={','.join(c.tags) or '-'}"
        )
    else:
        lines.append("customer   (unknown caller)")
    error = f" error={look['error']}" if look["error"] else ""
    lines.append(f"lookup     source={look['source']} {look['elapsed_ms']}ms{error}")
    lines.append("rules")
    for step in data["trace"]:
        mark = "MATCH" if step["matched"] else "  -  "
        lines.append(f"  {mark} {step['rule']}: {step['why']}")
    lines.append(f"decision   rule={data['rule']} reason={data['reason']} "
                 f"action={data['action']} ({data['elapsed_ms']}ms)")
    lines.append("variables")
    lines.extend(f"  {k}={v}" for k, v in data["variables"].items())
    return "\n".join(lines)
