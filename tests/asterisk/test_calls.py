"""Calls through a real Asterisk 22 running callroute's own dialplan, in a UTC+8 zone.

One Asterisk (TZ=Asia/Shanghai, the usual call centre clock), one ``router.app.serve``,
one wave of concurrent calls, one per scenario (:data:`SCENARIOS`); every test then checks
one thing about the calls: the route Asterisk took, and the record the sample CRM got,
field by field against Asterisk's own Cdr events, queue_log, full.log and files.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from tests.asterisk.harness import CallView, strategies
from tests.asterisk.lab import Lab, open_lab
from tests.asterisk.truth import Truth, compare, truth_of

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass(frozen=True)
class Scenario:
    """One call: who calls which line, how patient, and what must come of it."""

    did: str
    callerid: str
    outcome: str
    customer: str | None = None
    rule: str | None = None
    answered_by: str | None = None
    kind: str | None = None
    owner: str | None = None
    lead: bool = False
    task: bool = False
    hold_s: float = 10
    patience_s: float = 30
    talk_s: float = 1
    caller: str | None = None


SCENARIOS: dict[str, Scenario] = {
    "owner answers": Scenario(
        "4008001000", '"Li Lei" <+8613800138000>', "answered", "C-2001", "vip-owner",
        "Local/7003@agents", caller="+8613800138000", talk_s=2),
    "owner busy, queue": Scenario(
        "4008001000", '"Han Meimei" <13900139000>', "answered", "C-2002", "vip-owner",
        "Local/7101@agents", caller="+8613900139000"),
    "owner no answer, queue": Scenario(
        "4008001000", '"Zhou Jie" <+8613700137001>', "answered", "C-2003",
        "key-account-owner", kind="lead", owner="7018", caller="+8613700137001"),
    "abandoned in queue": Scenario(
        "4008001000", '"Impatient" <+8613600136000>', "abandoned", "C-2004", "churn-risk",
        task=True, patience_s=4, caller="+8613600136000"),
    "missed in queue": Scenario(
        "4008005000", '"Patient" <+8613600136001>', "missed", "C-2005", "churn-risk",
        task=True, caller="+8613600136001"),
    "rejected": Scenario(
        "4008001000", '"Blocked" <+8613300133000>', "rejected", "C-2006", "blocked",
        caller="+8613300133000"),
    "voicemail": Scenario(
        "4008003000", '"New Caller" <13100131000>', "voicemail", None, "mailbox-line",
        lead=True, task=True, hold_s=6, caller="+8613100131000"),
    "unknown on the sales line": Scenario(
        "4008002000", '"Prospect" <13200132000>', "answered", None, "unknown-sales-line",
        lead=True, caller="+8613200132000"),
    "anonymous": Scenario(
        "4008001000", '"Anonymous" <anonymous>', "answered", None, "default"),
    "no caller id": Scenario("4008001000", "", "answered", None, "default"),
    "deadline missed": Scenario(
        "4008001000", '"Slow Case" <+8613700137000>', "answered", "C-2007", "default",
        kind="lead", caller="+8613700137000"),
    "busy, own dialplan": Scenario(
        "4008006000", '"Busy Line" <13500135000>', "busy", None, "default", lead=True,
        task=True, caller="+8613500135000"),
    "failed, own dialplan": Scenario(
        "4008007000", '"No Route" <13500135001>', "failed", None, "default", lead=True,
        task=True, caller="+8613500135001"),
    "misnamed queue": Scenario(
        "4008009000", '"Someone" <13400134000>', "answered", None, "misnamed-queue",
        lead=True, caller="+8613400134000"),
}


@dataclass
class Placed:
    """A call of the wave: its scenario, what the test's AMI user saw, the record."""

    scenario: Scenario
    view: CallView
    record: dict[str, Any] = field(default_factory=dict)
    truth: Truth | None = None
    posted_after_s: float | None = None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory, asterisk_kit: None
              ) -> AsyncIterator[Lab]:
    """Asterisk in UTC+8, callroute serving in this process."""
    async with open_lab(tmp_path_factory.mktemp("calls"), tz="Asia/Shanghai") as lab:
        await lab.start()
        yield lab


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def wave(lab: Lab) -> dict[str, Placed]:
    """Every scenario's call placed at once; returns when every record is posted."""
    views = await asyncio.gather(*(
        lab.observer.originate(s.did, s.callerid, hold_s=s.hold_s, patience_s=s.patience_s,
                               talk_s=s.talk_s)
        for s in SCENARIOS.values()))
    placed = {name: Placed(s, v) for (name, s), v in zip(SCENARIOS.items(), views, strict=True)}
    await lab.observer.wait_ended(views, timeout=90)
    for name, call in placed.items():
        (lab.tmp / f"events-{name.replace(' ', '-')}.txt").write_text(call.view.dump())
        call.record = await lab.record(call.view)
        call.truth = truth_of(lab.asterisk, call.view, lab.zone)
        posted = datetime.fromisoformat(call.record["created_at"].replace("Z", "+00:00"))
        assert call.view.ended_at is not None
        call.posted_after_s = posted.timestamp() - call.view.ended_at
    return placed


def truth(call: Placed) -> Truth:
    assert call.truth is not None
    return call.truth


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_record_matches_what_asterisk_did(wave: dict[str, Placed], name: str) -> None:
    """The posted record agrees, field by field, with Asterisk's Cdrs, queue_log, full.log,
    voicemail file and recording: outcome, times, waits, queue, agent, route, mailbox."""
    call = wave[name]
    assert compare(call.record, truth(call)) == []


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_scenario_took_its_route(wave: dict[str, Placed], name: str) -> None:
    """Asterisk's log shows the route each scenario is about (the rule callroute chose)
    and the call ended as the scenario says (answered by the expected agent, ...)."""
    call, s = wave[name], wave[name].scenario
    t = truth(call)
    assert t.route.get("agistatus") == "SUCCESS"
    assert t.route.get("rule") == s.rule
    assert t.outcome == s.outcome
    if s.answered_by:
        assert t.answered_by == s.answered_by


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_customer_caller_and_crm_objects(wave: dict[str, Placed], name: str) -> None:
    """Each call posts one activity with the right caller and customer, and the CRM
    object the customer is (CRM_KIND, or the lookup after a degraded route) and its
    owner where the scenario has them; a lead only for an unknown caller with a number
    who was not rejected; a call-back task only for a missed, abandoned or voicemail
    call with a number."""
    call, s = wave[name], wave[name].scenario
    assert call.record["caller"] == s.caller
    assert call.record["customer_id"] == s.customer
    assert call.record["customer_kind"] == s.kind
    if s.owner is not None:
        assert call.record["customer_owner"] == s.owner
    assert call.record["anonymous"] is (s.caller is None)


async def test_leads_and_tasks_follow_the_outcome(lab: Lab, wave: dict[str, Placed]) -> None:
    """Leads and tasks, per call: exactly the ones each scenario calls for (none for the
    rejected caller, none without a number), each created once."""
    wrong = {}
    for name, call in wave.items():
        leads = lab.objects("leads", call.view.linkedid)
        tasks = lab.objects("tasks", call.view.linkedid)
        got = (len(leads), len(tasks))
        want = (int(call.scenario.lead), int(call.scenario.task))
        if got != want:
            wrong[name] = {"leads, tasks": got, "want": want}
    assert wrong == {}


async def test_each_call_posted_exactly_once(lab: Lab, wave: dict[str, Placed]) -> None:
    """Several calls at once: one activity per call, none for anything else, each with
    its own call's caller (no crossed records)."""
    activities = lab.objects_all("activities")
    assert sorted(a["call_id"] for a in activities) == sorted(
        c.view.linkedid for c in wave.values())


async def test_times_right_with_asterisk_in_utc_plus_8(lab: Lab, wave: dict[str, Placed]
                                                       ) -> None:
    """Asterisk writes its Cdr times in local time (UTC+8 here, with no zone): the record's
    start is still the call's real start, the Linkedid's epoch, with no time-zone setting
    in callroute's config."""
    if lab.zone_problem:
        pytest.skip(f"Asterisk runs in this host's zone: {lab.zone_problem}")
    assert lab.settings.ami.cdr_timezone is None
    call = wave["owner answers"]
    epoch = int(call.view.linkedid.split(".")[0])
    caller_cdr = next(c for c in call.view.cdrs if c["UniqueID"] == call.view.linkedid)
    local = datetime.strptime(caller_cdr["StartTime"], "%Y-%m-%d %H:%M:%S")
    assert (local - datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)).total_seconds() \
        == pytest.approx(8 * 3600, abs=1)
    started = datetime.fromisoformat(call.record["started_at"].replace("Z", "+00:00"))
    assert 0 <= started.timestamp() - epoch < 1.5  # the epoch is whole seconds


async def test_voicemail_record_has_mailbox_and_length(wave: dict[str, Placed]) -> None:
    """A caller who left a message: outcome voicemail, the mailbox, and the message length
    VoiceMail wrote in the message's .txt file (a few seconds, not zero)."""
    call = wave["voicemail"]
    assert call.record["outcome"] == "voicemail"
    assert call.record["voicemail"] == "8000@default"
    left = truth(call).voicemail_s
    assert left is not None
    assert left >= 2
    assert call.record["voicemail_s"] == truth(call).voicemail_s


async def test_deadline_record_carries_the_customer(wave: dict[str, Placed]) -> None:
    """The CRM answered after the routing deadline: the call took the default route
    (reason deadline), and its record names the customer (found by the time the call
    ended) and says the route was degraded; no lead for a known customer."""
    call = wave["deadline missed"]
    assert truth(call).route.get("reason") == "deadline"
    assert call.record["customer_id"] == "C-2007"
    assert call.record["degraded"] is True
    assert call.record["reason"] == "deadline"


async def test_misnamed_queue_falls_back_to_the_default_queue(
        lab: Lab, wave: dict[str, Placed]) -> None:
    """A rule naming a queue Asterisk does not have: Queue() ends with QUEUESTATUS=UNKNOWN
    and the dialplan sends the caller to the default queue, where an agent answers
    (instead of hanging up)."""
    t = truth(wave["misnamed queue"])
    assert any("queue nosuchqueue QUEUESTATUS=UNKNOWN" in ln for ln in t.lines), t.lines
    assert t.queue == "support"
    assert t.outcome == "answered"


async def test_missed_call_left_the_queue_after_its_wait(wave: dict[str, Placed]) -> None:
    """Nobody can answer in the queue: after the line's queue wait (4 s) QUEUESTATUS is
    TIMEOUT and, with no mailbox, the call ends as missed (not abandoned: Asterisk sends
    QueueCallerAbandon for a timeout too), with the time it waited in the queue."""
    call = wave["missed in queue"]
    t = truth(call)
    assert any("QUEUESTATUS=TIMEOUT" in ln for ln in t.lines), t.lines
    assert call.record["outcome"] == "missed"
    assert call.record["queue_wait_s"] == pytest.approx(4, abs=0.5)


async def test_recording_link_leads_to_the_file(wave: dict[str, Placed]) -> None:
    """The record's recording link downloads the very file MixMonitor wrote; a link with
    a forged signature or a path outside the recordings folder is refused."""
    call = wave["owner answers"]
    wav = truth(call).recording
    assert wav is not None
    url = call.record["recording_url"]
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == wav.read_bytes()
        async with http.get(url[:-4] + "0000") as resp:
            assert resp.status == 403
        base = url.split("/recordings/")[0]
        async with http.get(f"{base}/recordings/..%2Fetc%2Fpasswd?sig=x") as resp:
            assert resp.status in (403, 404)


async def test_queue_strategies_are_the_configured_ones(lab: Lab) -> None:
    """Each queue of queues_callroute.conf runs the strategy it names (queue show)."""
    running = strategies(lab.asterisk.rx("queue show"))
    assert running == {"support": "rrmemory", "vip": "leastrecent", "retention": "rrmemory",
                       "sales": "ringall"}


async def test_records_posted_within_a_second_of_the_hangup(wave: dict[str, Placed]) -> None:
    """With a healthy CRM each record reaches it within a second of the call's end, the
    wait for the Cdr events included."""
    late = {n: c.posted_after_s for n, c in wave.items()
            if c.posted_after_s is None or c.posted_after_s > 1.0}
    assert late == {}
