"""Render a routing decision as a trace: for ``callroute explain``, the admin API, the demo."""

from __future__ import annotations

from typing import Any

from dialplan.route import RouteOutcome


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
