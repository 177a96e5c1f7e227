"""Lint of the Asterisk files users copy (asterisk-conf/): a small dialplan parser."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from router.models import Customer
from router.rules.compiler import Dial, Plan, Terminal
from router.rules.decide import build_variables, load_rules

ROOT = Path(__file__).parents[1]
CONF = ROOT / "asterisk-conf"
DIALPLAN = CONF / "extensions_callroute.conf"
RECORDED = ROOT / "tests" / "fixtures" / "asterisk-22" / "conf" / "extensions.conf"

_SECTION = re.compile(r"^\[([A-Za-z0-9_.-]+)\](\([^)]*\))?$")
_EXTEN = re.compile(r"^exten\s*=>\s*(_?[^,\s]+),(\d+|n)(?:\(([A-Za-z0-9_-]+)\))?,(.+)$")
_SAME = re.compile(r"^same\s*=>\s*n(?:\(([A-Za-z0-9_-]+)\))?,(.+)$")
_APP = re.compile(r"^([A-Za-z][A-Za-z0-9]*)\((.*)\)$")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\([a-z]+\))?)")


@dataclass
class Step:
    """One priority of an extension."""

    line: int
    label: str | None
    app: str
    args: str


@dataclass
class Dialplan:
    """Contexts → extensions → steps, plus every problem found while parsing."""

    contexts: dict[str, dict[str, list[Step]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def balanced(text: str) -> str | None:
    """None when (), [], {} nest properly and quotes pair up, else what is wrong."""
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for char in text:
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return f"unbalanced {char!r}"
    if stack:
        return f"unclosed {stack[-1]!r}"
    if text.count('"') % 2:
        return "odd number of quotes"
    return None


def parse(text: str) -> Dialplan:
    """Parse an extensions.conf; every malformed line becomes an error, not an exception."""
    plan = Dialplan()
    context: str | None = None
    exten: str | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(?<!\\);.*$", "", raw).strip()
        if not line:
            continue
        if line.startswith("["):
            match = _SECTION.match(line)
            if not match:
                plan.errors.append(f"{number}: bad section header {line!r}")
                continue
            context, exten = match.group(1), None
            plan.contexts.setdefault(context, {})
            continue
        if context is None:
            plan.errors.append(f"{number}: line outside any section")
            continue
        if context in ("general", "globals"):
            continue
        if match := _EXTEN.match(line):
            exten, label, body = match.group(1), match.group(3), match.group(4)
            if match.group(2) == "n":
                plan.errors.append(f"{number}: an exten line must start at a number")
            plan.contexts[context].setdefault(exten, [])
        elif match := _SAME.match(line):
            if exten is None:
                plan.errors.append(f"{number}: 'same' with no extension before it")
                continue
            label, body = match.group(1), match.group(2)
        else:
            plan.errors.append(f"{number}: not 'exten =>' or 'same => n': {line!r}")
            continue
        app = _APP.match(body)
        if not app:
            plan.errors.append(f"{number}: not App(args): {body!r}")
            continue
        if problem := balanced(body):
            plan.errors.append(f"{number}: {problem} in {body!r}")
        plan.contexts[context][exten].append(Step(number, label, app.group(1), app.group(2)))
    return plan


def jump_targets(step: Step) -> list[str]:
    """Labels a Goto/GotoIf/ExecIf(Goto) step may jump to within its extension."""
    if step.app == "Goto":
        return [step.args]
    if step.app == "GotoIf":
        _, _, branches = step.args.rpartition("]?")
        return [b for b in branches.split(":") if b]
    return []


def label_errors(plan: Dialplan) -> list[str]:
    """Every jump to a label that does not exist in the same extension."""
    errors = []
    for context, extens in plan.contexts.items():
        for exten, steps in extens.items():
            labels = {s.label for s in steps if s.label}
            for step in steps:
                for target in jump_targets(step):
                    if "," in target or target.isdigit():
                        continue
                    if target not in labels:
                        errors.append(f"{step.line}: [{context}] {exten} jumps to unknown "
                                      f"label {target!r}")
    return errors


def callroute_steps() -> list[Step]:
    """The steps of the inbound extension of extensions_callroute.conf."""
    plan = parse(DIALPLAN.read_text())
    return plan.contexts["callroute-inbound"]["_X."]


def test_dialplan_lines_are_well_formed() -> None:
    """Every line of the shipped dialplan parses, with balanced brackets and quotes."""
    plan = parse(DIALPLAN.read_text())
    assert plan.errors == []
    assert list(plan.contexts) == ["callroute-inbound"]
    assert len(callroute_steps()) > 20


def test_parser_accepts_the_recorded_dialplan() -> None:
    """The parser accepts the dialplan real Asterisk 22 ran for the recordings."""
    plan = parse(RECORDED.read_text())
    assert plan.errors == []
    assert label_errors(plan) == []
    assert set(plan.contexts) >= {"inbound", "agents"}


@pytest.mark.parametrize(("old", "new", "problem"), [
    ("Dial(${ROUTE_TARGET},${ROUTE_TIMEOUT})", "Dial(${ROUTE_TARGET},${ROUTE_TIMEOUT}",
     "not App(args)"),
    ("Queue(${ROUTE_QUEUE},,,,${CR_WAIT})", "Queue(${ROUTE_QUEUE},,,,${CR_WAIT)",
     "unbalanced ')'"),
    (" same => n(queue),", " same => n(queue)", "not 'exten =>'"),
    (" same => n,Busy(5)", " same -> n,Busy(5)", "not 'exten =>'"),
    ('?fallback)\n same => n,GotoIf($["${ROUTE_ACTION}" = "reject"]',
     '?fallback)\n same => n,GotoIf($["${ROUTE_ACTION} = "reject"]', "odd number of quotes"),
])
def test_lint_catches_broken_lines(old: str, new: str, problem: str) -> None:
    """A broken copy of the dialplan is reported (the lint can fail)."""
    text = DIALPLAN.read_text()
    assert old in text
    errors = parse(text.replace(old, new, 1)).errors
    assert any(problem in e for e in errors), errors


def test_every_jump_label_exists() -> None:
    """Every label a Goto/GotoIf names exists; renaming one is caught."""
    text = DIALPLAN.read_text()
    assert label_errors(parse(text)) == []
    broken = parse(text.replace("n(noqueue),", "n(no-queue),"))
    assert any("unknown label 'noqueue'" in e for e in label_errors(broken))


def test_agi_call_and_did() -> None:
    """The DID is stored for the AMI side before the AGI runs against the configured host."""
    steps = callroute_steps()
    apps = [s.app for s in steps]
    sets = [s.args for s in steps if s.app == "Set"]
    assert "__CALL_DID=${EXTEN}" in sets
    agi = next(s for s in steps if s.app == "AGI")
    assert agi.args == "agi://${CR_HOST}:${CR_PORT}/route?did=${EXTEN}"
    assert any(a.startswith("CR_HOST=") and "${CALLROUTE_HOST}" in a for a in sets)
    assert apps.index("AGI") > [s.args for s in steps].index("__CALL_DID=${EXTEN}")


def test_fallback_condition_checks_agistatus_and_empty_route() -> None:
    """Right after the AGI, one GotoIf sends the call to `fallback` when AGISTATUS is not
    SUCCESS or when ROUTE_TARGET and ROUTE_QUEUE (and mailbox, rejection) are all empty."""
    steps = callroute_steps()
    after = steps[[s.app for s in steps].index("AGI") + 1:]
    first_route = next(i for i, s in enumerate(after) if s.app in ("Dial", "Queue",
                                                                    "VoiceMail", "Busy"))
    guard = [s for s in after[:first_route] if s.app == "GotoIf"
             and s.args.endswith("?fallback")]
    assert len(guard) == 1
    cond = re.sub(r"\s+", " ", guard[0].args)
    assert '"${AGISTATUS}" != "SUCCESS" |' in cond
    for var in ("ROUTE_TARGET", "ROUTE_QUEUE", "ROUTE_VOICEMAIL", "ROUTE_REJECT"):
        assert f'"${{{var}}}" = ""' in cond
    fallback = next(i for i, s in enumerate(steps) if s.label == "fallback")
    assert any(s.app == "Queue" and s.args == "${CR_QUEUE},,,,${CR_WAIT}"
               for s in steps[fallback:])


def _all_variables() -> set[str]:
    """Every variable name the rules engine can set, from build_variables itself."""
    plan = Plan((Dial("a", "PJSIP/1", 5), Dial("b", "PJSIP/2", 5)),
                Terminal("queue", "q", 1))
    names = set(build_variables(plan, "r", "rule", Customer(id="c", name="N")))
    return {n for n in names if not n.startswith("CALLERID")}


def test_every_route_variable_is_handled() -> None:
    """Every ROUTE_* variable the engine sets is read by the dialplan (a new variable in
    build_variables without dialplan support fails here)."""
    used = set(_VAR.findall(DIALPLAN.read_text()))
    missing = {v for v in _all_variables() if v.startswith("ROUTE_")} - used
    assert missing == set()


def test_every_action_and_reject_cause_is_handled() -> None:
    """Each ROUTE_ACTION and ROUTE_REJECT value has its branch; queue priority and both
    ring timeouts are applied."""
    steps = callroute_steps()
    args = [s.args for s in steps]
    assert any('"${ROUTE_ACTION}" = "reject"' in a for a in args)
    assert any('"${ROUTE_ACTION}" = "voicemail"' in a for a in args)
    assert "${ROUTE_TARGET},${ROUTE_TIMEOUT}" in [s.args for s in steps if s.app == "Dial"]
    assert "${ROUTE_TARGET2},${ROUTE_TIMEOUT2}" in [s.args for s in steps if s.app == "Dial"]
    assert any("Set(QUEUE_PRIO=${ROUTE_PRIORITY})" in a for a in args)
    assert "${ROUTE_QUEUE},,,,${CR_WAIT}" in [s.args for s in steps if s.app == "Queue"]
    assert "${CR_BOX},u" in [s.args for s in steps if s.app == "VoiceMail"]
    assert any("CR_BOX=" in a and "${ROUTE_VOICEMAIL}" in a for a in args)
    assert any('"${ROUTE_REJECT}" = "hangup"' in a for a in args)
    assert any('"${ROUTE_REJECT}" = "congestion"' in a for a in args)
    assert {"Busy", "Congestion", "MixMonitor", "Hangup"} <= {s.app for s in steps}


def test_every_queue_has_a_timeout_and_a_status_check() -> None:
    """Each Queue() has a timeout (CALLROUTE_QUEUE_WAIT_S) and is followed, before any
    other application runs, by a GotoIf on QUEUESTATUS: a TIMEOUT goes on to the mailbox
    (or ends as missed), any other status (no such queue, full, empty) to the default
    queue; the default queue itself is tried once (no loop)."""
    steps = callroute_steps()
    queues = [i for i, s in enumerate(steps) if s.app == "Queue"]
    assert len(queues) == 2
    for i in queues:
        assert steps[i].args.endswith(",,,,${CR_WAIT}")
    route_queue, default_queue = queues
    after = [s for s in steps[route_queue + 1:route_queue + 4] if s.app == "GotoIf"]
    assert any("QUEUESTATUS" in s.args for s in after)
    after = [s for s in steps[default_queue + 1:default_queue + 3] if s.app != "NoOp"]
    assert [(s.app, s.args) for s in after[:1]] == [("Goto", "noanswer")]
    args = [s.args for s in steps]
    assert any('"${QUEUESTATUS}" = "TIMEOUT"]?noanswer' in a for a in args)
    assert any('"${ROUTE_QUEUE}" != "${CR_QUEUE}"]?fallback:noanswer' in a for a in args)
    assert any("CR_FELLBACK" in a and a.endswith("?noanswer") for a in args)
    assert any(a.startswith("CR_WAIT=") and "${CALLROUTE_QUEUE_WAIT_S}" in a for a in args)


def test_voicemail_length_is_published() -> None:
    """After a voicemail, the h extension publishes the message's length (the duration
    VoiceMail wrote in the message's .txt file) as CALLROUTE_VM_SECONDS for the record."""
    plan = parse(DIALPLAN.read_text())
    h = plan.contexts["callroute-inbound"]["h"]
    assert any(s.app == "Set" and s.args.startswith("CALLROUTE_VM_SECONDS=${AST_CONFIG(")
               and "${VM_MESSAGEFILE}.txt,message,duration" in s.args for s in h)


def test_manager_conf_is_least_privilege() -> None:
    """The AMI user may read what callroute listens to and write only `reporting`
    (CoreShowChannels, Getvar); no originate, command or system write rights. The file is
    a fragment: the user section only, no [general]."""
    text = (CONF / "manager_callroute.conf").read_text()
    sections = re.findall(r"^\[([^\]]+)\]", text, re.M)
    assert sections == ["callroute"]
    section = text.split("\n[callroute]\n")[1]
    values = dict(re.findall(r"^(read|write)\s*=\s*(.+)$", section, re.M))
    assert set(values["read"].replace(" ", "").split(",")) == {"system", "call", "agent",
                                                               "cdr", "dialplan"}
    assert values["write"].strip() == "reporting"
    assert "permit = 127.0.0.1" in section


def test_queues_conf_has_the_example_queues() -> None:
    """queues_callroute.conf (a fragment: no [general]) defines every queue
    examples/rules.yaml can route to; each queue names its own strategy and the template
    none (Asterisk applies a queue's first strategy line, a template's included)."""
    text = (CONF / "queues_callroute.conf").read_text()
    assert not re.search(r"^\[general\]", text, re.M)
    sections = re.split(r"^(\[[^\]]+\](?:\([^)]*\))?)\s*$", text, flags=re.M)
    bodies = dict(zip(sections[1::2], sections[2::2], strict=True))
    template = bodies.pop("[callroute-defaults](!)")
    assert not re.search(r"^strategy\s*=", template, re.M)
    queues = {}
    for header, body in bodies.items():
        name = header[1:header.index("]")]
        queues[name] = re.findall(r"^strategy\s*=\s*(\S+)", body, re.M)
    assert queues == {"support": ["rrmemory"], "vip": ["leastrecent"],
                      "retention": ["rrmemory"], "sales": ["ringall"]}
    rules = load_rules(ROOT / "examples" / "rules.yaml")
    assert rules.default_queue in queues
    for rule in rules.rules:
        plan = rule.route.resolve(None, None)
        if plan.terminal.kind == "queue":
            assert plan.terminal.value in queues, rule.name


def test_readme_documents_the_includes_the_suite_uses() -> None:
    """asterisk-conf/README.md tells a user to copy each fragment and #include it from
    their own file; the real-Asterisk suite installs them exactly so (same lines)."""
    from tests.asterisk.harness import FRAGMENTS, user_files

    readme = (CONF / "README.md").read_text()
    files = user_files(5038, 4573)
    owner = {"extensions_callroute.conf": "extensions.conf",
             "manager_callroute.conf": "manager.conf", "queues_callroute.conf": "queues.conf"}
    assert set(FRAGMENTS) == {p.name for p in CONF.glob("*.conf")}
    for fragment in FRAGMENTS:
        line = f"#include {fragment}"
        assert line in readme, line
        assert f"\n{line}\n" in files[owner[fragment]], fragment
    assert re.search(r"^enabled\s*=\s*yes", files["cdr_manager.conf"], re.M)
    assert "enabled = yes" in readme
