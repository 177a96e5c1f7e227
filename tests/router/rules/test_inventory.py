"""What a rules file names (queues, agents), checked against routing.queues and against
what an Asterisk answered (QueueStatus events and device states)."""

from __future__ import annotations

from pathlib import Path

from ami.protocol import Message
from router.rules.decide import RuleSet, load_rules
from router.rules.inventory import (
    AsteriskView,
    against_asterisk,
    against_list,
    named,
    queue_view,
)

EXAMPLE_RULES = Path(__file__).resolve().parents[3] / "examples" / "rules.yaml"


def example() -> RuleSet:
    return load_rules(EXAMPLE_RULES, default_queue="support")


def test_named_walks_rules_fallbacks_and_default() -> None:
    """Every queue a rule, a fallback (owner/agent) or the default sends calls to is
    named with where it comes from; routing.default_queue is always one; every agent
    of the table is listed with its dial string."""
    names = named(example(), "support")
    assert names.queues == {
        "vip": ["rule 'vip-owner'"],
        "retention": ["rule 'churn-risk'"],
        "sales": ["rule 'unknown-sales-line'"],
        "support": ["rule 'key-account-owner'", "default", "routing.default_queue"],
    }
    assert names.agents["7001"] == "Local/7001@agents"
    assert len(names.agents) == 5


def test_agent_fallback_queue_and_missing_fallback_are_named() -> None:
    """An agent fallback's own queue is named; an owner rule without a fallback names
    the default queue it falls back to."""
    rules = RuleSet.from_mapping({
        "agents": {"1": "PJSIP/1", "2": "PJSIP/2"},
        "rules": [
            {"name": "a", "when": {"known": True},
             "owner": {"fallback": {"agent": {"id": "2", "fallback": {"queue": "second"}}}}},
            {"name": "b", "when": {"known": False}, "owner": {}},
        ],
        "default": {"voicemail": "100@default"},
    }, default_queue="main")
    assert named(rules, "main").queues == {"second": ["rule 'a'"],
                                           "main": ["rule 'b'", "routing.default_queue"]}


def test_against_list() -> None:
    """With routing.queues given, a queue not in it is an error naming the queue and the
    rule; without the list nothing is checked."""
    names = named(example(), "support")
    report = against_list(names, ["support", "vip"])
    assert not report.ok
    assert len(report.errors) == 2
    assert "queue 'retention' (rule 'churn-risk') is not in routing.queues" in report.errors[0]
    assert "queue 'sales'" in report.errors[1]
    assert against_list(names, ["support", "vip", "sales", "retention"]).ok
    assert against_list(names, []).ok


def qs_event(**headers: str) -> Message:
    return Message(headers)


def test_queue_view_reads_queue_status_events() -> None:
    """QueueParams name the queues; QueueMember add their device (StateInterface, /n
    dropped) and its state from the Status number."""
    view = queue_view([
        qs_event(Event="QueueParams", Queue="support"),
        qs_event(Event="QueueMember", Queue="support", Location="Local/7001@agents/n",
                 StateInterface="Local/7001@agents/n", Status="1"),
        qs_event(Event="QueueMember", Queue="support", Location="PJSIP/7002",
                 StateInterface="PJSIP/7002", Status="4"),
        qs_event(Event="QueueParams", Queue="empty"),
        qs_event(Event="QueueStatusComplete", EventList="Complete"),
    ])
    assert view.queues == {"support": {"Local/7001@agents", "PJSIP/7002"}, "empty": set()}
    assert view.states == {"Local/7001@agents": "NOT_INUSE", "PJSIP/7002": "INVALID"}


def test_against_asterisk_names_what_is_missing() -> None:
    """A queue Asterisk lacks and an agent whose device is INVALID are errors; an empty
    queue, an invalid member, an unreadable or unavailable agent are warnings."""
    names = named(example(), "support")
    view = AsteriskView(
        queues={"support": {"Local/7001@agents", "Local/7002@agents"}, "vip": set(),
                "sales": {"Local/7008@agents"}},
        states={"Local/7001@agents": "NOT_INUSE", "Local/7002@agents": "INUSE",
                "Local/7008@agents": "INVALID", "Local/7101@agents": "UNAVAILABLE"},
        unread={"Local/7009@agents": "Permission denied"},
    )
    report = against_asterisk(names, view)
    assert report.errors == [
        "queue 'retention' (rule 'churn-risk') does not exist in Asterisk (queues there: "
        "sales, support, vip)",
        "agent '7008' (Local/7008@agents): Asterisk has no such device (DEVICE_STATE is "
        "INVALID: an unknown endpoint, or a Local channel into a missing extension); "
        "dialling it fails",
    ]
    warnings = "\n".join(report.warnings)
    assert "queue 'vip' (rule 'vip-owner') has no members" in warnings
    assert "queue 'sales': member(s) Local/7008@agents are INVALID" in warnings
    assert "agent '7009' (Local/7009@agents): its device state could not be read " \
           "(Permission denied); member of no queue" in warnings
    assert "agent '7101' (Local/7101@agents): UNAVAILABLE" in warnings


def test_against_asterisk_all_there() -> None:
    """Every queue with members and every agent's device known: no problem."""
    names = named(example(), "support")
    devices = {f"Local/{a}@agents" for a in ("7001", "7002", "7008", "7009", "7101")}
    view = AsteriskView(queues={q: set(devices) for q in ("support", "vip", "sales",
                                                          "retention")},
                        states=dict.fromkeys(devices, "NOT_INUSE"))
    report = against_asterisk(names, view)
    assert report.ok
    assert report.warnings == []
    assert report.checked == ["4 queue(s) and 5 agent(s) against Asterisk (4 queue(s) there)"]
