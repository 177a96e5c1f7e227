"""What Asterisk did with one call, read from Asterisk's own output, and the comparison of
a posted call record with it, field by field.

Sources, all independent of callroute's call tracker:

* the ``callroute:`` ``NoOp`` lines of ``full.log`` (the route the dialplan took);
* the ``Cdr`` events the test's AMI user received (times in Asterisk's local zone,
  read here with the zone the test started Asterisk in);
* ``queue_log`` (epoch times, the queue, the agent who took the call, hold times);
* the voicemail message's ``.txt`` file and the recording under ``monitor/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any

from tests.asterisk.harness import Asterisk, CallView

#: Seconds a time or duration may differ: Cdr and queue_log times are whole seconds
#: (truncated), a record's times are to the millisecond.
TOLERANCE_S = 1.5
_ROUTE = re.compile(r"callroute: call (\S+) AGISTATUS=(\S*) action=(\S*) rule=(\S*) "
                    r"reason=(\S*) target=(\S*) queue=([^\s\"]*)\"\)")
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]")


@dataclass
class Truth:
    """One call as Asterisk shows it."""

    linkedid: str
    route: dict[str, str | None]
    start: datetime
    end: datetime
    outcome: str
    answer: datetime | None = None
    answered_by: str | None = None
    rung: set[str] = field(default_factory=set)
    queue: str | None = None
    queue_wait_s: float | None = None
    wait_s: float = 0.0
    talk_s: float = 0.0
    voicemail: str | None = None
    voicemail_s: float | None = None
    recording: Path | None = None
    decision_ms: float | None = None
    lines: list[str] = field(default_factory=list)


def device_of(channel: str) -> str:
    """``Local/7001@agents`` from ``Local/7001@agents-0000000a;1``."""
    return channel.split(";", 1)[0].rsplit("-", 1)[0]


def _cdr_time(value: str, zone: tzinfo) -> datetime | None:
    if not value:
        return None
    return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=zone).astimezone(UTC)


def _epoch(value: str) -> datetime:
    return datetime.fromtimestamp(int(value), UTC)


def route_of(asterisk: Asterisk, linkedid: str) -> tuple[dict[str, str | None], list[str]]:
    """The route as the dialplan logged it after the AGI, and every callroute line."""
    lines = asterisk.log_lines(f"callroute: call {linkedid} ")
    route: dict[str, str | None] = {}
    for line in lines:
        if m := _ROUTE.search(line):
            keys = ("agistatus", "action", "rule", "reason", "target", "queue")
            route = {k: (v or None) for k, v in zip(keys, m.groups()[1:], strict=True)}
    return route, lines


def decision_ms(asterisk: Asterisk, view: CallView) -> float | None:
    """Milliseconds from the dialplan starting the AGI to the line after it, per full.log."""
    channel = view.inbound_channel
    if channel is None:
        return None
    agi = next((ln for ln in asterisk.log_lines(f'AGI("{channel}"')), None)
    after = next((ln for ln in asterisk.log_lines(f'"{channel}", "callroute: call ')
                  if "AGISTATUS=" in ln), None)
    if agi is None or after is None:
        return None
    t0, t1 = (_LOG_TIME.match(x) for x in (agi, after))
    if t0 is None or t1 is None:
        return None
    fmt = "%Y-%m-%d %H:%M:%S.%f"
    return (datetime.strptime(t1.group(1), fmt) - datetime.strptime(t0.group(1), fmt)
            ).total_seconds() * 1000


def voicemail_of(asterisk: Asterisk, view: CallView) -> tuple[str, float] | None:
    """(mailbox, message seconds) of the message this call left, from its .txt file."""
    channel = view.inbound_channel
    for txt in sorted(asterisk.voicemail.glob("*/*/INBOX/msg*.txt")):
        text = txt.read_text()
        if f"callerchan={channel}\n" in text:
            duration = re.search(r"^duration=(\d+)", text, re.M)
            box = f"{txt.parents[1].name}@{txt.parents[2].name}"
            return box, float(duration.group(1)) if duration else 0.0
    return None


def truth_of(asterisk: Asterisk, view: CallView, zone: tzinfo) -> Truth:
    """What Asterisk did with the call of ``view`` (whose Cdrs must be in)."""
    route, lines = route_of(asterisk, view.linkedid)
    cdrs = view.cdrs
    caller = next(c for c in cdrs if c.get("UniqueID") == view.linkedid)
    start = _cdr_time(caller["StartTime"], zone)
    assert start is not None
    ends = [t for c in cdrs if (t := _cdr_time(c.get("EndTime", ""), zone))]
    truth = Truth(view.linkedid, route, start, max(ends), outcome="", lines=lines)
    truth.decision_ms = decision_ms(asterisk, view)
    rows = asterisk.queue_log_rows(view.uids)
    events = [r[4] for r in rows]
    entered = [r for r in rows if r[4] == "ENTERQUEUE"]
    truth.queue = entered[-1][2] if entered else None
    agent_legs = [c for c in cdrs if "@agents-" in c.get("DestinationChannel", "")]
    answered = [c for c in agent_legs if c.get("Disposition") == "ANSWERED"]
    truth.rung = {device_of(c["DestinationChannel"]) for c in agent_legs}
    if answered:
        truth.answered_by = device_of(answered[0]["DestinationChannel"])
        truth.answer = _cdr_time(answered[0]["AnswerTime"], zone)
        truth.talk_s = float(caller.get("BillableSeconds") or 0)
    if caller.get("AnswerTime"):
        picked = _cdr_time(caller["AnswerTime"], zone)
        assert picked is not None
        truth.wait_s = (picked - start).total_seconds()
    else:
        truth.wait_s = (truth.end - start).total_seconds()
    for row in rows:
        if row[4] == "CONNECT":
            truth.queue_wait_s = float(row[5])
        elif row[4] == "ABANDON":
            truth.queue_wait_s = float(row[7])
        elif row[4] == "EXITWITHTIMEOUT":
            truth.queue_wait_s = float(row[7]) if len(row) > 7 else None
    vm = voicemail_of(asterisk, view)
    if vm is not None:
        truth.voicemail, truth.voicemail_s = vm
    inbound = next((uid for uid, name in view.uids.items()
                    if name == view.inbound_channel), None)
    wav = asterisk.monitor / f"{inbound}.wav"
    truth.recording = wav if inbound and wav.exists() else None
    if any(" rejected (" in ln for ln in lines):
        truth.outcome = "rejected"
    elif vm is not None:
        truth.outcome = "voicemail"
    elif answered:
        truth.outcome = "answered"
    elif "ABANDON" in events:
        truth.outcome = "abandoned"
    elif "EXITWITHTIMEOUT" in events:
        truth.outcome = "missed"
    elif agent_legs:  # rang agents outside a queue: all busy, or nobody answered
        busy = all(c.get("Disposition") == "BUSY" for c in agent_legs)
        truth.outcome = "busy" if busy else "missed"
    elif any(c.get("LastApplication") == "Dial" and not c.get("DestinationChannel")
             for c in cdrs):
        truth.outcome = "failed"  # Dial() could create no channel: never put through
    else:
        truth.outcome = "abandoned" if caller.get("Disposition") == "NO ANSWER" else "failed"
    return truth


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def compare(posted: dict[str, Any], truth: Truth) -> list[str]:
    """Every field of the posted record that disagrees with what Asterisk did."""
    problems: list[str] = []

    def check(name: str, ok: bool, want: Any) -> None:
        if not ok:
            problems.append(f"{name}: posted {posted.get(name)!r}, Asterisk did {want!r}")

    def near(name: str, want: datetime | float | None) -> None:
        got = posted.get(name)
        if want is None or got is None:
            check(name, want is None and got is None, want)
        elif isinstance(want, datetime):
            when = _time(got)
            check(name, when is not None and abs((when - want).total_seconds()) <= TOLERANCE_S,
                  want.isoformat())
        else:
            check(name, abs(float(got) - want) <= TOLERANCE_S, want)

    check("call_id", posted.get("call_id") == truth.linkedid, truth.linkedid)
    check("outcome", posted.get("outcome") == truth.outcome, truth.outcome)
    near("started_at", truth.start)
    near("answered_at", truth.answer)
    near("ended_at", truth.end)
    near("wait_s", truth.wait_s)
    near("talk_s", truth.talk_s)
    near("queue_wait_s", truth.queue_wait_s)
    check("queue", posted.get("queue") == truth.queue, truth.queue)
    check("answered_by", posted.get("answered_by") == truth.answered_by, truth.answered_by)
    check("agents_rung", set(posted.get("agents_rung") or []) == truth.rung, truth.rung)
    check("rule", posted.get("rule") == truth.route.get("rule"), truth.route.get("rule"))
    check("reason", posted.get("reason") == truth.route.get("reason"), truth.route.get("reason"))
    check("route_target", posted.get("route_target") == truth.route.get("target"),
          truth.route.get("target"))
    check("route_queue", posted.get("route_queue") == truth.route.get("queue"),
          truth.route.get("queue"))
    check("voicemail", posted.get("voicemail") == truth.voicemail, truth.voicemail)
    near("voicemail_s", truth.voicemail_s)
    want_rec = str(truth.recording) if truth.recording else None
    check("recording", posted.get("recording") == want_rec, want_rec)
    degraded = truth.route.get("reason") not in ("rule", "default")
    check("degraded", posted.get("degraded") is degraded, degraded)
    return problems
