"""Routing rules: conditions, actions, first match, defaults, traces, variables, validation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.errors import ConfigError
from router.models import CallerNumber, Customer, Decision, NumberKind
from router.rules.compiler import CallContext
from router.rules.decide import MAX_CALLER_NAME, RuleSet, clean_caller_name, load_rules
from router.rules.presence import Presence
from router.rules.spec import compile_did_pattern

EXAMPLE = Path(__file__).parents[3] / "examples" / "rules.yaml"
#: Thursday 2025-11-20 10:00 in Shanghai (business hours of the example file).
OPEN = datetime(2025, 11, 20, 2, 0, tzinfo=UTC)
#: Thursday 2025-11-20 20:00 in Shanghai (after hours).
CLOSED = datetime(2025, 11, 20, 12, 0, tzinfo=UTC)

AGENTS = {"7001": "Local/7001@agents", "7002": {"dial": "PJSIP/7002", "name": "Bob"},
          "7101": "Local/7101@agents"}
SCHEDULES = {"office": {"timezone": "Asia/Shanghai", "hours": {"mon-fri": "09:00-18:00"},
                        "holidays": [{"date": "2025-10-01", "name": "National Day"}]}}


def number(raw: str = "+8613800138000", country: str | None = "CN",
           kind: NumberKind = NumberKind.E164) -> CallerNumber:
    """A normalised caller number."""
    e164 = raw if kind is NumberKind.E164 else None
    return CallerNumber(raw=raw, kind=kind, e164=e164, country=country)


def ctx(customer: Customer | None = None, *, did: str | None = "4008001000",
        at: datetime = OPEN, presence: Presence | None = None,
        num: CallerNumber | None = None) -> CallContext:
    """A call context with sensible defaults."""
    return CallContext(number=num or number(), did=did, at=at, customer=customer,
                       lookup_source="crm", presence=presence)


def ruleset(rules: list[dict[str, Any]], **extra: Any) -> RuleSet:
    """A rule set with the shared agents and schedules."""
    data: dict[str, Any] = {"agents": AGENTS, "schedules": SCHEDULES, "rules": rules}
    data.update(extra)
    return RuleSet.from_mapping(data, source="rules.yaml")


def one(when: dict[str, Any]) -> RuleSet:
    """A single rule `r` with the given conditions, routing to queue `hit`."""
    return ruleset([{"name": "r", "when": when, "queue": "hit"}])


GOLD = Customer(id="C-1", name="Li Lei", tier="Gold", value=5000.0, owner="7001",
                tags=("VIP", "churn-risk"), open_tickets=3, language="zh-CN")
PLAIN = Customer(id="C-2", tier="silver", value=50.0)

# (conditions, customer, context overrides, expected to match, why when it does not)
CASES: list[tuple[dict[str, Any], Customer | None, dict[str, Any], bool, str]] = [
    ({"known": True}, GOLD, {}, True, ""),
    ({"known": True}, None, {}, False, "caller unknown"),
    ({"known": False}, None, {}, True, ""),
    ({"known": False}, GOLD, {}, False, "caller known (C-1)"),
    ({"tier": ["gold", "platinum"]}, GOLD, {}, True, ""),
    ({"tier": ["gold", "platinum"]}, PLAIN, {}, False, "tier silver not in [gold, platinum]"),
    ({"tier": ["gold"]}, None, {}, False, "no tier (caller unknown), wanted [gold]"),
    ({"min_value": 1000}, GOLD, {}, True, ""),
    ({"min_value": 1000}, PLAIN, {}, False, "value 50 < 1000"),
    ({"max_value": 100}, GOLD, {}, False, "value 5000 > 100"),
    ({"max_value": 100}, PLAIN, {}, True, ""),
    ({"min_value": 1}, Customer(id="x"), {}, False, "no customer value"),
    ({"has_owner": True}, GOLD, {}, True, ""),
    ({"has_owner": True}, PLAIN, {}, False, "no owner"),
    ({"has_owner": False}, GOLD, {}, False, "has owner 7001"),
    ({"has_owner": False}, None, {}, True, ""),
    ({"tags_any": ["vip", "x"]}, GOLD, {}, True, ""),
    ({"tags_any": ["x", "y"]}, GOLD, {}, False, "none of tags [x, y]"),
    ({"tags_all": ["vip", "churn-risk"]}, GOLD, {}, True, ""),
    ({"tags_all": ["vip", "blocked"]}, GOLD, {}, False, "missing tag blocked"),
    ({"tags_none": ["blocked"]}, GOLD, {}, True, ""),
    ({"tags_none": ["churn-risk"]}, GOLD, {}, False, "has tag churn-risk"),
    ({"tags_none": ["blocked"]}, None, {}, True, ""),
    ({"did": ["4008001000", 4008002000]}, None, {"did": "4008002000"}, True, ""),
    ({"did": ["4008001000"]}, None, {"did": "4008009999"}, False,
     "DID 4008009999 not in [4008001000]"),
    ({"did": ["4008001000"]}, None, {"did": None}, False, "DID (none) not in [4008001000]"),
    ({"did_pattern": "_400800XXXX"}, None, {"did": "4008001234"}, True, ""),
    ({"did_pattern": "_400800XXXX"}, None, {"did": "40080012345"}, False,
     "DID 40080012345 does not match _400800XXXX"),
    ({"did_pattern": "400[89].*"}, None, {"did": "4009"}, True, ""),
    ({"schedule": "office"}, None, {"at": OPEN}, True, ""),
    ({"schedule": "office"}, None, {"at": CLOSED}, False,
     "office closed (thu 20:00 Asia/Shanghai)"),
    ({"schedule": "office"}, None, {"at": datetime(2025, 10, 1, 2, tzinfo=UTC)}, False,
     "office closed: National Day"),
    ({"outside_schedule": "office"}, None, {"at": CLOSED}, True, ""),
    ({"outside_schedule": "office"}, None, {"at": OPEN}, False, "office open 09:00-18:00"),
    ({"caller_country": ["cn", "US"]}, None, {}, True, ""),
    ({"caller_country": ["US"]}, None, {}, False, "caller country CN not in [US]"),
    ({"caller_country": ["US"]}, None, {"num": number("anonymous", None,
                                                      NumberKind.ANONYMOUS)},
     False, "caller country (none) not in [US]"),
    ({"open_tickets_min": 3}, GOLD, {}, True, ""),
    ({"open_tickets_min": 1}, PLAIN, {}, False, "0 open tickets < 1"),
    ({"language": ["zh"]}, GOLD, {}, True, ""),
    ({"language": ["zh-cn"]}, GOLD, {}, True, ""),
    ({"language": ["en"]}, GOLD, {}, False, "language zh-CN not in [en]"),
    ({"language": ["zh"]}, Customer(id="x", language="zhx"), {}, False,
     "language zhx not in [zh]"),
    ({"number_kind": ["anonymous"]}, None, {"num": number("", None, NumberKind.ANONYMOUS)},
     True, ""),
    ({"number_kind": ["anonymous", "internal"]}, None, {}, False,
     "number kind e164 not in [anonymous, internal]"),
    ({"owner_available": True}, GOLD, {}, True, ""),
    ({"owner_available": True}, PLAIN, {}, False, "no owner"),
    ({"owner_available": True}, Customer(id="x", owner="9999"), {}, False,
     "owner 9999 not in agents table"),
    ({"owner_available": False}, GOLD, {}, False, "owner 7001 available"),
    ({}, None, {}, True, ""),
]


@pytest.mark.parametrize(("when", "customer", "over", "matched", "why"), CASES)
def test_condition(when: dict[str, Any], customer: Customer | None, over: dict[str, Any],
                   matched: bool, why: str) -> None:
    """Each condition holds or fails as documented, and a failure says why in the trace."""
    decision = one(when).decide(ctx(customer, **over))
    assert decision.trace[0].rule == "r"
    assert decision.trace[0].matched is matched
    if matched:
        assert decision.rule == "r"
        assert decision.queue == "hit"
    else:
        assert decision.rule == "default"
        assert decision.trace[0].why.startswith(why), decision.trace[0].why


def test_owner_available_follows_presence() -> None:
    """owner_available reads presence: busy fails, idle and never-seen devices pass."""
    rules = one({"owner_available": True})
    presence = Presence()
    assert rules.decide(ctx(GOLD, presence=presence)).rule == "r"  # never seen
    presence.update("Local/7001@agents", "NOT_INUSE")
    assert rules.decide(ctx(GOLD, presence=presence)).rule == "r"
    presence.update("Local/7001@agents/n", "INUSE")
    decision = rules.decide(ctx(GOLD, presence=presence))
    assert decision.rule == "default"
    assert decision.trace[0].why == "owner 7001 busy (INUSE)"


def test_all_conditions_must_hold_and_first_failure_is_reported() -> None:
    """A rule matches only when every condition holds; the trace names the first failure."""
    rules = one({"known": True, "tier": ["gold"], "tags_any": ["nope"],
                 "open_tickets_min": 100})
    decision = rules.decide(ctx(GOLD))
    assert decision.rule == "default"
    assert decision.trace[0].why == "none of tags [nope]"
    assert one({"known": True, "tier": ["gold"], "open_tickets_min": 3}).decide(
        ctx(GOLD)).rule == "r"


def test_first_match_wins_and_trace_lists_every_rule_tried() -> None:
    """Rules are tried in order; the first that matches decides and later ones are not
    tried; the trace has one entry per rule tried."""
    rules = ruleset([
        {"name": "silver", "when": {"tier": ["silver"]}, "queue": "a"},
        {"name": "gold", "when": {"tier": ["gold"]}, "queue": "b"},
        {"name": "known", "when": {"known": True}, "queue": "c"},
    ])
    decision = rules.decide(ctx(GOLD))
    assert (decision.rule, decision.queue) == ("gold", "b")
    assert [(t.rule, t.matched) for t in decision.trace] == [("silver", False), ("gold", True)]
    assert decision.trace[1].why == "1 condition(s) hold"
    assert rules.decide(ctx(PLAIN)).queue == "a"
    assert rules.names == ["silver", "gold", "known"]


def test_default_route_when_nothing_matches() -> None:
    """No match uses `default:`; without one, the default queue (configurable)."""
    rules = [{"name": "never", "when": {"tier": ["x"]}, "queue": "a"}]
    decision = ruleset(rules, default={"voicemail": "100@default"}).decide(ctx(GOLD))
    assert (decision.rule, decision.reason, decision.action) == ("default", "default",
                                                                 "voicemail")
    assert decision.trace[-1].rule == "default"
    assert decision.trace[-1].why == "no rule matched"
    assert decision.variables["ROUTE_VOICEMAIL"] == "100@default"
    assert ruleset(rules).decide(ctx()).queue == "support"
    custom = RuleSet.from_mapping({}, default_queue="general")
    assert custom.decide(ctx()).variables["ROUTE_QUEUE"] == "general"
    assert RuleSet.default_only("frontdesk").decide(ctx()).queue == "frontdesk"


def _owner_rules(fallback: dict[str, Any] | None = None) -> RuleSet:
    owner: dict[str, Any] = {"ring_s": 12}
    if fallback is not None:
        owner["fallback"] = fallback
    return ruleset([{"name": "own", "owner": owner}])


def test_owner_rings_owner_then_fallback_queue() -> None:
    """owner: dials the owner's dial string for ring_s, then the fallback queue."""
    decision = _owner_rules({"queue": {"name": "vip", "priority": 10}}).decide(ctx(GOLD))
    assert (decision.action, decision.target, decision.queue, decision.priority) == (
        "dial", "Local/7001@agents", "vip", 10)
    v = decision.variables
    assert (v["ROUTE_ACTION"], v["ROUTE_TARGET"], v["ROUTE_TIMEOUT"]) == (
        "dial", "Local/7001@agents", "12")
    assert (v["ROUTE_QUEUE"], v["ROUTE_PRIORITY"]) == ("vip", "10")
    assert decision.trace[0].why == "no conditions"


@pytest.mark.parametrize(("customer", "presence_state", "why"), [
    (PLAIN, None, "no owner: fallback queue vip"),
    (None, None, "no owner: fallback queue vip"),
    (Customer(id="x", owner="9999"), None, "owner 9999 not in agents table: fallback queue vip"),
    (GOLD, "BUSY", "owner 7001 busy (BUSY): fallback queue vip"),
])
def test_owner_unavailable_goes_straight_to_fallback(
        customer: Customer | None, presence_state: str | None, why: str) -> None:
    """No owner, an owner missing from the agents table, or a busy owner: the rule still
    matches and routes straight to its fallback; the trace says why."""
    presence = Presence()
    if presence_state:
        presence.update("Local/7001@agents", presence_state)
    decision = _owner_rules({"queue": "vip"}).decide(ctx(customer, presence=presence))
    assert decision.rule == "own"
    assert (decision.action, decision.target, decision.queue) == ("queue", None, "vip")
    assert decision.variables["ROUTE_TARGET"] == ""
    assert decision.variables["ROUTE_TIMEOUT"] == ""
    assert decision.trace[0].matched
    assert decision.trace[0].why == f"no conditions; {why}"


def test_owner_without_fallback_ends_in_default_queue() -> None:
    """A missing fallback means the default queue, whether or not the owner rang."""
    decision = _owner_rules().decide(ctx(GOLD))
    assert (decision.target, decision.queue) == ("Local/7001@agents", "support")
    assert _owner_rules().decide(ctx(PLAIN)).variables["ROUTE_QUEUE"] == "support"


def test_owner_fallback_voicemail() -> None:
    """An owner fallback may be a voicemail box."""
    decision = _owner_rules({"voicemail": {"mailbox": "7001@default"}}).decide(ctx(GOLD))
    v = decision.variables
    assert (v["ROUTE_ACTION"], v["ROUTE_TARGET"], v["ROUTE_VOICEMAIL"], v["ROUTE_QUEUE"]) == (
        "dial", "Local/7001@agents", "7001@default", "")


def test_owner_fallback_agent_uses_second_target() -> None:
    """An agent fallback rings a second target (ROUTE_TARGET2) before its own fallback;
    a busy fallback agent is skipped too."""
    rules = _owner_rules({"agent": {"id": "7002", "ring_s": 9, "fallback": {"queue": "vip"}}})
    v = rules.decide(ctx(GOLD)).variables
    assert (v["ROUTE_TARGET"], v["ROUTE_TIMEOUT"], v["ROUTE_TARGET2"], v["ROUTE_TIMEOUT2"],
            v["ROUTE_QUEUE"]) == ("Local/7001@agents", "12", "PJSIP/7002", "9", "vip")
    decision = rules.decide(ctx(PLAIN))
    assert (decision.action, decision.target, decision.queue) == ("dial", "PJSIP/7002", "vip")
    assert decision.variables["ROUTE_TARGET2"] == ""
    presence = Presence()
    presence.update("PJSIP/7002", "UNAVAILABLE")
    decision = rules.decide(ctx(PLAIN, presence=presence))
    assert (decision.action, decision.queue) == ("queue", "vip")
    assert decision.trace[0].why == ("no conditions; no owner: fallback agent 7002; "
                                     "agent 7002 busy (UNAVAILABLE): fallback queue vip")


def test_agent_action() -> None:
    """agent: rings a fixed agent (shorthand id allowed), then its fallback; busy skips it."""
    rules = ruleset([{"name": "a", "agent": {"id": 7002, "ring_s": 5,
                                             "fallback": {"queue": "sales"}}}])
    decision = rules.decide(ctx())
    assert (decision.action, decision.target, decision.queue) == ("dial", "PJSIP/7002", "sales")
    presence = Presence()
    presence.update("PJSIP/7002", "INUSE")
    decision = rules.decide(ctx(presence=presence))
    assert (decision.action, decision.queue) == ("queue", "sales")
    assert "agent 7002 busy (INUSE): fallback queue sales" in decision.trace[0].why
    short = ruleset([{"name": "a", "agent": "7001"}]).decide(ctx())
    assert (short.target, short.variables["ROUTE_TIMEOUT"], short.queue) == (
        "Local/7001@agents", "20", "support")


def test_queue_voicemail_reject_actions() -> None:
    """queue, voicemail and reject set exactly their own variables."""
    q = ruleset([{"name": "q", "queue": {"name": "vip", "priority": 7}}]).decide(ctx())
    assert (q.action, q.queue, q.priority, q.variables["ROUTE_PRIORITY"]) == (
        "queue", "vip", 7, "7")
    vm = ruleset([{"name": "v", "voicemail": "8000@default"}]).decide(ctx())
    assert (vm.action, vm.queue, vm.variables["ROUTE_VOICEMAIL"]) == (
        "voicemail", None, "8000@default")
    for cause in ("busy", "congestion", "hangup"):
        rj = ruleset([{"name": "x", "reject": {"cause": cause}}]).decide(ctx())
        assert (rj.action, rj.variables["ROUTE_REJECT"], rj.variables["ROUTE_QUEUE"]) == (
            "reject", cause, "")


def test_variables_complete_ordered_and_customer_fields() -> None:
    """Every ROUTE_* variable is present ("" when unused), ROUTE_ACTION is set last, CRM_*
    carry the customer (CRM_KIND: the CRM object it is) and CALLERID(name) its name."""
    decision = _owner_rules({"queue": "vip"}).decide(ctx(GOLD))
    keys = list(decision.variables)
    assert keys[-1] == "ROUTE_ACTION"
    assert set(keys) == {"ROUTE_ACTION", "ROUTE_TARGET", "ROUTE_TIMEOUT", "ROUTE_TARGET2",
                         "ROUTE_TIMEOUT2", "ROUTE_QUEUE", "ROUTE_PRIORITY", "ROUTE_VOICEMAIL",
                         "ROUTE_REJECT", "ROUTE_RULE", "ROUTE_REASON", "CRM_CUSTOMER_ID",
                         "CRM_TIER", "CRM_OWNER", "CRM_KIND", "CALLERID(name)"}
    v = decision.variables
    assert (v["ROUTE_RULE"], v["ROUTE_REASON"]) == ("own", "rule")
    assert (v["CRM_CUSTOMER_ID"], v["CRM_TIER"], v["CRM_OWNER"], v["CALLERID(name)"]) == (
        "C-1", "Gold", "7001", "Li Lei")
    assert v["CRM_KIND"] == ""  # a customer whose lookup names no kind
    lead = _owner_rules({"queue": "vip"}).decide(ctx(GOLD.model_copy(update={"kind": "lead"})))
    assert lead.variables["CRM_KIND"] == "lead"
    unknown = _owner_rules({"queue": "vip"}).decide(ctx(None)).variables
    assert "CALLERID(name)" not in unknown
    assert (unknown["CRM_CUSTOMER_ID"], unknown["CRM_TIER"], unknown["CRM_OWNER"],
            unknown["CRM_KIND"]) == ("", "", "", "")


def test_reason_override_for_degraded_lookups() -> None:
    """decide(reason=...) replaces ROUTE_REASON, cleaned to a short machine word."""
    rules = one({"known": False})
    assert rules.decide(ctx(), reason="crm-error").variables["ROUTE_REASON"] == "crm-error"
    assert rules.decide(ctx(), reason="CRM Error!\n").reason == "crm-error"


@pytest.mark.parametrize(("raw", "clean"), [
    ("Li Lei", "Li Lei"),
    ("  Han\tMei\nmei\x00\x1b[31m ", "Han Mei mei[31m"),
    ("A\u202eB\u200bC", "ABC"),
    ("", ""),
    (None, ""),
    ("x" * 100, "x" * MAX_CALLER_NAME),
])
def test_caller_name_cleaning(raw: str | None, clean: str) -> None:
    """CALLERID(name) loses control and format characters and is truncated."""
    assert clean_caller_name(raw) == clean


def test_caller_name_in_variables_is_clean() -> None:
    """A hostile CRM name never reaches the channel raw."""
    customer = Customer(id="c", name="Evil\r\nSET VARIABLE X 1" + "y" * 80)
    name = one({}).decide(ctx(customer)).variables["CALLERID(name)"]
    assert "\n" not in name
    assert "\r" not in name
    assert len(name) == MAX_CALLER_NAME


def test_safe_default_never_raises_and_carries_reason() -> None:
    """safe_default gives the default route with the reason, no customer data, and never
    raises even on odd input."""
    rules = ruleset([{"name": "r", "queue": "x"}], default={"queue": {"name": "general",
                                                                      "priority": 2}})
    decision = rules.safe_default("deadline")
    assert isinstance(decision, Decision)
    assert (decision.rule, decision.reason, decision.queue, decision.priority) == (
        "default", "deadline", "general", 2)
    v = decision.variables
    assert (v["ROUTE_REASON"], v["ROUTE_QUEUE"], v["ROUTE_ACTION"], v["CRM_CUSTOMER_ID"]) == (
        "deadline", "general", "queue", "")
    assert decision.trace[0].why == "safe default: deadline"
    odd = rules.safe_default(None)  # type: ignore[arg-type]
    assert odd.variables["ROUTE_QUEUE"] == "general"
    # Safe defaults are independent copies.
    decision.variables["ROUTE_QUEUE"] = "tampered"
    assert rules.safe_default("x").variables["ROUTE_QUEUE"] == "general"


def test_safe_default_of_owner_default_uses_its_fallback() -> None:
    """An owner action as default: with no customer the safe default is its fallback."""
    rules = ruleset([], default={"owner": {"fallback": {"queue": "vip"}}})
    assert rules.safe_default("crm-error").queue == "vip"
    assert rules.decide(ctx(GOLD)).target == "Local/7001@agents"


@pytest.mark.parametrize(("pattern", "yes", "no"), [
    ("_400800XXXX", ["4008001234"], ["400800123", "40080012345", "4008001a34"]),
    ("_NXX", ["200", "999"], ["100", "20"]),
    ("_Z!", ["1", "19"], ["0", "01"]),
    ("_4[0-2]X.", ["4001", "42999"], ["430", "401"]),
    ("_4[0-2 ]", ["4 "], ["43"]),
    ("4008(00|20)\\d{4}", ["4008001234", "4008201234"], ["4008101234"]),
])
def test_did_patterns(pattern: str, yes: list[str], no: list[str]) -> None:
    """Asterisk patterns (X, Z, N, [..], ., !) and regexes match whole DIDs."""
    compiled = compile_did_pattern(pattern)
    assert all(compiled.fullmatch(d) for d in yes)
    assert not any(compiled.fullmatch(d) for d in no)


# --------------------------------------------------------------------------- validation


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        RuleSet.from_mapping(data, source="rules.yaml")
    return str(info.value)


def test_error_unknown_field_names_rule_and_field() -> None:
    """An unknown key in a rule's `when` is rejected naming the rule and the field."""
    msg = _error({"rules": [{"name": "a", "queue": "x"},
                            {"name": "vip-owner", "when": {"teir": ["gold"]}, "queue": "v"}]})
    assert msg.startswith("rules.yaml: rule 'vip-owner' (#2): when.teir: ")
    assert "Extra inputs are not permitted" in msg


def test_error_bad_tier_type() -> None:
    """`tier` must be a list of strings."""
    msg = _error({"rules": [{"name": "vip-owner", "when": {"tier": "gold"}, "queue": "v"}]})
    assert msg.startswith("rules.yaml: rule 'vip-owner' (#1): when.tier: ")
    assert "list" in msg
    assert "when.tier.0" in _error({"rules": [{"name": "v", "when": {"tier": [5]}, "queue": "v"}]})


def test_error_unknown_schedule_reference() -> None:
    """A rule referring to a schedule that is not defined is rejected."""
    msg = _error({"schedules": SCHEDULES,
                  "rules": [{"name": "late", "when": {"outside_schedule": "ofice"},
                             "voicemail": "1@d"}]})
    assert msg == ("rules.yaml: rule 'late' (#1): when.outside_schedule: unknown schedule "
                   "'ofice' (schedules: office)")


@pytest.mark.parametrize(("action", "field"), [
    ({"agent": {"id": "7999"}}, "agent.id"),
    ({"owner": {"fallback": {"agent": {"id": "7999"}}}}, "owner.fallback.agent.id"),
    ({"agent": {"id": "7001", "fallback": {"agent": "7999"}}}, "agent.fallback.agent.id"),
])
def test_error_unknown_agent(action: dict[str, Any], field: str) -> None:
    """Every agent id an action rings must be in the agents table."""
    msg = _error({"agents": AGENTS, "rules": [{"name": "x", **action}]})
    assert msg.startswith(f"rules.yaml: rule 'x' (#1): {field}: unknown agent '7999'")
    assert "(agents: 7001, 7002, 7101)" in msg


def test_error_bad_timezone() -> None:
    """A schedule with an unknown time zone names the schedule and field."""
    msg = _error({"schedules": {"office": {"timezone": "Asia/Shanghia"}}})
    assert msg.startswith("rules.yaml: schedule 'office': timezone: unknown time zone "
                          "'Asia/Shanghia'")


def test_error_duplicate_rule_names() -> None:
    """Rule names are unique."""
    msg = _error({"rules": [{"name": "a", "queue": "x"}, {"name": "b", "queue": "x"},
                            {"name": "a", "queue": "y"}]})
    assert msg == "rules.yaml: rule 'a' (#3): name: duplicate rule name (also rule #1)"


@pytest.mark.parametrize(("rule", "expect"), [
    ({"name": "two", "queue": "a", "voicemail": "1@d"},
     "rule 'two' (#1): (rule): needs exactly one action"),
    ({"name": "none", "when": {"known": True}}, "rule 'none' (#1): (rule): needs exactly one"),
    ({"name": "bad pattern", "queue": "a"}, "rule 'bad pattern' (#1): name: String should match"),
    ({"queue": "a"}, "rule #1: name: Field required"),
    ({"name": "p", "when": {"did_pattern": "_40[0"}, "queue": "a"},
     "when.did_pattern: unclosed ["),
    ({"name": "p", "when": {"did_pattern": "(4"}, "queue": "a"}, "when.did_pattern: bad pattern"),
    ({"name": "c", "when": {"caller_country": ["China"]}, "queue": "a"},
     "when.caller_country: 'China' is not an ISO"),
    ({"name": "r", "reject": {"cause": "nope"}}, "reject.cause: Input should be"),
    ({"name": "o", "owner": {"ring_s": 0}}, "owner.ring_s: Input should be greater"),
    ({"name": "o", "owner": {"fallback": {"reject": "busy"}}}, "owner.fallback.reject: Extra"),
    ({"name": "q", "queue": {"name": "has space"}}, "queue.name: String should match"),
    ({"name": "k", "when": {"number_kind": ["mobile"]}, "queue": "a"}, "when.number_kind.0:"),
])
def test_error_other_rule_problems(rule: dict[str, Any], expect: str) -> None:
    """Structural mistakes in a rule are reported with the rule and field."""
    msg = _error({"agents": AGENTS, "rules": [rule]})
    assert expect in msg, msg


def test_error_top_level_problems(tmp_path: Path) -> None:
    """Bad top-level shape, unknown sections, agents, YAML syntax and a missing file."""
    assert "top level must be a mapping" in _error(["not", "a", "mapping"])
    assert "ruels: Extra inputs" in _error({"ruels": []})
    assert "agents.7001.dial: String should match" in _error({"agents": {7001: "no slash"}})
    assert "default: needs exactly one action" in _error({"default": {}})
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_rules(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_rules(tmp_path / "missing.yaml")


def test_empty_file_is_default_only(tmp_path: Path) -> None:
    """An empty rules file routes everything to the default queue."""
    path = tmp_path / "rules.yaml"
    path.write_text("")
    decision = load_rules(path, default_queue="general").decide(ctx(GOLD))
    assert (decision.rule, decision.queue) == ("default", "general")


# ------------------------------------------------------------------------ example file

# The five recorded callers (tests/fixtures/asterisk-22/README.md) as the sample CRM
# (router/samplecrm.py) knows them; 02150501234 is not in the CRM.
LI_LEI = Customer(id="C-1001", name="Li Lei", tier="gold", value=52_000, owner="7001",
                  tags=("repeat-buyer",), open_tickets=1, language="zh")
HAN_MEIMEI = Customer(id="C-1002", name="Han Meimei", tier="platinum", value=250_000,
                      owner="7009", tags=("vip",), language="en")
SLOW_CASE = Customer(id="C-1003", name="Slow Case", tier="silver", value=8_000, owner="7002",
                     language="zh")
IMPATIENT = Customer(id="C-1004", name="Impatient", tier="bronze", value=900, owner="7002",
                     tags=("churn-risk",), open_tickets=3, language="zh")


def test_example_rules_recorded_callers() -> None:
    """examples/rules.yaml routes the recorded callers: the gold and platinum callers ring
    their owner (Local/7XXX@agents) then the vip queue, the unknown caller on the sales
    line goes to sales, the slow lookup gets the safe default (or its owner then support
    when the CRM answers in time), the churn-risk caller goes to retention."""
    rules = load_rules(EXAMPLE)
    d1 = rules.decide(ctx(LI_LEI, did="4008001000"))
    assert (d1.rule, d1.action, d1.target, d1.queue, d1.priority) == (
        "vip-owner", "dial", "Local/7001@agents", "vip", 10)
    assert d1.variables["ROUTE_TIMEOUT"] == "15"
    assert d1.variables["CALLERID(name)"] == "Li Lei"
    d2 = rules.decide(ctx(HAN_MEIMEI, did="4008001000", num=number("+8613900139000")))
    assert (d2.target, d2.queue) == ("Local/7009@agents", "vip")
    d3 = rules.decide(ctx(None, did="4008002000", num=number("+862150501234")))
    assert (d3.rule, d3.action, d3.queue) == ("unknown-sales-line", "queue", "sales")
    assert "CALLERID(name)" not in d3.variables
    d4 = rules.safe_default("deadline")
    assert (d4.action, d4.queue, d4.variables["ROUTE_REASON"]) == ("queue", "support",
                                                                   "deadline")
    in_time = rules.decide(ctx(SLOW_CASE, num=number("+8613700137000")))
    assert (in_time.rule, in_time.target, in_time.queue) == (
        "key-account-owner", "Local/7002@agents", "support")
    d5 = rules.decide(ctx(IMPATIENT, did="4008001000", num=number("+8613600136000")))
    assert (d5.rule, d5.queue, d5.priority) == ("churn-risk", "retention", 5)


def test_example_rules_other_paths() -> None:
    """The example's busy-owner, sales-line, after-hours, holiday, blocked and default
    paths."""
    rules = load_rules(EXAMPLE)
    presence = Presence()
    presence.update("Local/7009@agents", "INUSE")
    busy = rules.decide(ctx(HAN_MEIMEI, presence=presence))
    assert (busy.rule, busy.action, busy.queue) == ("vip-owner", "queue", "vip")
    assert "owner 7009 busy (INUSE)" in busy.trace[-1].why
    sales = rules.decide(ctx(None, did="4008002000"))
    assert (sales.rule, sales.queue) == ("unknown-sales-line", "sales")
    assert rules.decide(ctx(None, did="4008001000")).rule == "default"
    late = rules.decide(ctx(LI_LEI, at=CLOSED))
    assert (late.rule, late.action, late.variables["ROUTE_VOICEMAIL"]) == (
        "after-hours", "voicemail", "8000@default")
    holiday = rules.decide(ctx(LI_LEI, at=datetime(2025, 10, 1, 3, tzinfo=UTC)))
    assert holiday.rule == "after-hours"
    assert "National Day" in holiday.trace[1].why
    blocked = rules.decide(ctx(Customer(id="b", tags=("Blocked",))))
    assert (blocked.rule, blocked.action, blocked.variables["ROUTE_REJECT"]) == (
        "blocked", "reject", "busy")
    assert rules.decide(ctx(PLAIN)).rule == "default"


def test_example_rules_every_agent_is_a_local_channel() -> None:
    """The example's agents dial Local/7XXX@agents, as the recorded dialplan expects."""
    data = yaml.safe_load(EXAMPLE.read_text())
    rules = load_rules(EXAMPLE)
    assert set(rules.agents) == {str(k) for k in data["agents"]}
    assert all(a.dial == f"Local/{k}@agents" for k, a in rules.agents.items())


