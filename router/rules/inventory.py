"""What a rule set names (queues, agents), and whether those exist: in the config's list
of queues (``routing.queues``), or in a running Asterisk, asked over AMI.

:func:`named` walks a compiled :class:`~router.rules.decide.RuleSet`: every queue a rule,
a fallback or the default sends calls to (and ``routing.default_queue``, which the
dialplan's own fallback uses), and every agent of the ``agents`` table (any of them can
be rung as an account owner). :func:`against_list` checks the queues against a list;
:func:`against_asterisk` checks queues and agents against what Asterisk answered:

* ``QueueStatus``: the queues that exist (``QueueParams``) and their members
  (``QueueMember``: ``StateInterface``/``Location`` and ``Status``, a device state number);
* ``Getvar DEVICE_STATE(<device>)`` for each agent's device: ``INVALID`` means Asterisk
  has no such device (an unknown endpoint, or a ``Local/`` channel into an extension that
  does not exist), so a Dial to that agent fails.

A queue that does not exist, or an agent whose device is invalid, is an error; a queue
with no members and an agent whose state could not be read are warnings.
:func:`ask_asterisk` sends the two actions through anything with the ``send_action`` of
:class:`ami.client.AmiClient` (this module does no I/O of its own and imports no AMI code).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from router.rules.compiler import DialRoute, Route, TerminalRoute
from router.rules.decide import RuleSet
from router.rules.presence import device_of, member_state


@dataclass(frozen=True)
class Named:
    """What a rule set names: queue -> where it is named; agent id -> dial string."""

    queues: dict[str, list[str]]
    agents: dict[str, str]


@dataclass
class Report:
    """Problems found: errors (calls would fail) and warnings (calls may wait)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is no error."""
        return not self.errors


def _route_queues(route: Route) -> list[str]:
    if isinstance(route, TerminalRoute):
        term = route.terminal
        return [term.value] if term.kind == "queue" else []
    if isinstance(route, DialRoute):
        return _route_queues(route.fallback)
    return []


def named(ruleset: RuleSet, default_queue: str) -> Named:
    """The queues (with where each is named) and agents of ``ruleset``."""
    queues: dict[str, list[str]] = {}
    for rule in ruleset.rules:
        for queue in _route_queues(rule.route):
            queues.setdefault(queue, []).append(f"rule {rule.name!r}")
    for queue in _route_queues(ruleset.default):
        queues.setdefault(queue, []).append("default")
    queues.setdefault(default_queue, []).append("routing.default_queue")
    agents = {agent: entry.dial for agent, entry in ruleset.agents.items()}
    return Named(queues, agents)


def _where(places: Sequence[str]) -> str:
    return ", ".join(dict.fromkeys(places))


def against_list(names: Named, queues: Collection[str]) -> Report:
    """Every named queue must be in ``queues`` (``routing.queues``; empty: not checked)."""
    report = Report()
    if not queues:
        return report
    for queue, places in names.queues.items():
        if queue not in queues:
            report.errors.append(
                f"queue {queue!r} ({_where(places)}) is not in routing.queues "
                f"({', '.join(queues)}): a call sent there finds no queue")
    report.checked.append(f"{len(names.queues)} queue(s) against routing.queues")
    return report


# --- the running Asterisk -----------------------------------------------------------------
class Headers(Protocol):
    """An AMI message as :class:`ami.protocol.Message` is: header lookup by name."""

    def get(self, key: str, default: str | None = None) -> str | None: ...


class Answer(Protocol):
    """An action's answer as :class:`ami.client.ActionResult` is."""

    @property
    def ok(self) -> bool: ...

    @property
    def response(self) -> Headers: ...

    @property
    def events(self) -> Sequence[Headers]: ...


class ActionSender(Protocol):
    """Sends one AMI action and waits for its whole answer (:class:`ami.client.AmiClient`)."""

    async def send_action(self, name: str, fields: Mapping[str, str] | None = None, *,
                          timeout: float | None = None) -> Answer: ...  # noqa: ASYNC109


@dataclass
class AsteriskView:
    """What Asterisk said: queue -> member devices; device -> state (member status or
    ``DEVICE_STATE()``); why a state could not be read, per device."""

    queues: dict[str, set[str]] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    unread: dict[str, str] = field(default_factory=dict)


def queue_view(events: Sequence[Headers], view: AsteriskView | None = None) -> AsteriskView:
    """Fold ``QueueStatus`` list events into ``view`` (a new one by default)."""
    view = view or AsteriskView()
    for event in events:
        name = event.get("Event")
        queue = event.get("Queue")
        if not queue:
            continue
        if name == "QueueParams":
            view.queues.setdefault(queue, set())
        elif name == "QueueMember":
            interface = event.get("StateInterface") or event.get("Location") or ""
            if not interface:
                continue
            device = device_of(interface)
            view.queues.setdefault(queue, set()).add(device)
            state = member_state(event.get("Status"))
            if state is not None:
                view.states.setdefault(device, state)
    return view


async def ask_asterisk(ami: ActionSender, names: Named, timeout_s: float = 5.0) -> AsteriskView:
    """Ask Asterisk for its queues and members, and the device state of every agent.

    Raises what ``send_action`` raises when the connection fails; an action Asterisk
    refuses (no privilege, an old version) leaves the states it would have given unread.
    """
    status = await ami.send_action("QueueStatus", timeout=timeout_s)
    if not status.ok:
        raise PermissionError(f"Asterisk refused QueueStatus: "
                              f"{status.response.get('Message') or 'no reason given'}")
    view = queue_view(status.events)
    for dial in dict.fromkeys(names.agents.values()):
        device = device_of(dial)
        answer = await ami.send_action(
            "Getvar", {"Variable": f"DEVICE_STATE({device})"}, timeout=timeout_s)
        value = answer.response.get("Value") if answer.ok else None
        if value:
            view.states[device] = value.upper()
        else:
            view.unread[device] = (answer.response.get("Message") or "no value") \
                if not answer.ok else "no value"
    return view


def against_asterisk(names: Named, view: AsteriskView) -> Report:
    """Compare what the rules name with what Asterisk has."""
    report = Report()
    existing = ", ".join(sorted(view.queues)) or "none"
    for queue, places in names.queues.items():
        members = view.queues.get(queue)
        if members is None:
            report.errors.append(
                f"queue {queue!r} ({_where(places)}) does not exist in Asterisk "
                f"(queues there: {existing})")
        elif not members:
            report.warnings.append(
                f"queue {queue!r} ({_where(places)}) has no members in Asterisk: calls "
                "wait there until an agent logs in")
        else:
            bad = sorted(m for m in members if view.states.get(m) == "INVALID")
            if bad:
                report.warnings.append(
                    f"queue {queue!r}: member(s) {', '.join(bad)} are INVALID in Asterisk "
                    "(no such device or extension): they never ring")
    member_of: dict[str, list[str]] = {}
    for queue, members in view.queues.items():
        for device in members:
            member_of.setdefault(device, []).append(queue)
    for agent, dial in names.agents.items():
        device = device_of(dial)
        state = view.states.get(device)
        label = f"agent {agent!r} ({dial})"
        if state == "INVALID":
            report.errors.append(
                f"{label}: Asterisk has no such device (DEVICE_STATE is INVALID: an unknown "
                "endpoint, or a Local channel into a missing extension); dialling it fails")
        elif state is None:
            queues = ", ".join(sorted(member_of.get(device, []))) or "no queue"
            why = view.unread.get(device, "not asked")
            report.warnings.append(
                f"{label}: its device state could not be read ({why}); member of {queues}")
        elif state == "UNAVAILABLE":
            report.warnings.append(f"{label}: UNAVAILABLE in Asterisk (not registered?)")
    report.checked.append(
        f"{len(names.queues)} queue(s) and {len(names.agents)} agent(s) against Asterisk "
        f"({len(view.queues)} queue(s) there)")
    return report
