"""``callroute serve`` as a process against a real Asterisk 22: its AMI user's privileges,
an orderly stop, a kill in the middle of a call, and the dialplan's own fallback while
callroute is stopped. Asterisk runs in this host's zone here (UTC on the CI machine)."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.asterisk.harness import CALLROUTE_SECRET, CONF, Observer
from tests.asterisk.lab import Lab, open_lab
from tests.asterisk.truth import TOLERANCE_S, _time, compare, truth_of

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory, asterisk_kit: None
              ) -> AsyncIterator[Lab]:
    """Asterisk in the host's zone; each test starts callroute as it needs it."""
    async with open_lab(tmp_path_factory.mktemp("service"), tz=None) as lab:
        yield lab


def shipped_permissions() -> dict[str, set[str]]:
    """read/write classes of the callroute user in asterisk-conf/manager_callroute.conf."""
    text = (CONF / "manager_callroute.conf").read_text()
    return {k: {c.strip() for c in v.split(",")}
            for k, v in re.findall(r"^(read|write)\s*=\s*(.+)$", text, re.M)}


async def test_ami_user_has_exactly_the_shipped_privileges(lab: Lab) -> None:
    """The running Asterisk gives user callroute exactly the classes of
    manager_callroute.conf; with them every action callroute sends succeeds, while
    Originate and Command are refused."""
    shown = lab.asterisk.rx("manager show user callroute")
    perms = {k: {c.strip() for c in v.split(",")}
             for k, v in re.findall(r"^\s*(read|write) perm:\s*(.+)$", shown, re.M)}
    assert perms == shipped_permissions()
    ami = Observer(lab.asterisk.ami_port)
    try:
        login = await ami.connect("callroute", CALLROUTE_SECRET)
        assert login.response == "Success"
        for name, fields in [("Ping", {}), ("Getvar", {"Variable": "STRFTIME(,,%z)"}),
                             ("Getvar", {"Variable": "DEVICE_STATE(Local/7001@agents)"})]:
            answer = await ami.action(name, **fields)
            assert answer.response == "Success", (name, answer.headers)
        for name in ("QueueStatus", "CoreShowChannels"):
            answer, _ = await ami.listing(name)
            assert answer.response == "Success", (name, answer.headers)
        refused = await ami.action("Originate", Channel="Local/4008001000@from-trunk",
                                   Application="Wait", Data="1")
        assert refused.response == "Error"
        assert "Permission denied" in (refused.get("Message") or "")
        command = await ami.action("Command", Command="core show version")
        assert command.response == "Error"
    finally:
        await ami.close()


async def test_orderly_stop_logs_no_warning(lab: Lab) -> None:
    """SIGTERM: callroute logs off and stops (exit 0) without a single warning from
    "shutting down" on: its own Logoff closing the AMI connection is not reported as a
    lost connection."""
    await lab.spawn()
    assert await lab.end_process(signal.SIGTERM) == 0
    log = lab.proc_logs[-1].read_text()
    assert "AMI logged in" in log
    assert "shutting down" in log
    stopping = log[log.index("shutting down"):]
    bad = [ln for ln in stopping.splitlines()
           if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", ln)]
    assert bad == []


async def test_killed_mid_call_the_record_is_posted_once(lab: Lab) -> None:
    """callroute is killed (SIGKILL) while an agent talks to a customer and started again:
    the restarted process adopts the call from CoreShowChannels and posts exactly one
    record for it, flagged incomplete, with the customer (looked up after the call), the
    agent who answered and the times Asterisk shows."""
    await lab.spawn()
    view = await lab.observer.originate("4008001000", '"Li Lei" <+8613800138000>',
                                        hold_s=20, talk_s=5)
    await lab.observer.wait(lambda: any(m.get("DialStatus") == "ANSWER"
                                        for m in view.named("DialEnd")), 10)
    assert await lab.end_process(signal.SIGKILL) == -signal.SIGKILL
    await lab.spawn()
    try:
        await lab.observer.wait_ended([view], timeout=30)
        record = await lab.record(view)
        await asyncio.sleep(1.0)  # nothing else comes for this call
        assert len(lab.objects("activities", view.linkedid)) == 1
        truth = truth_of(lab.asterisk, view, lab.zone)
        assert record["incomplete"] is True
        assert record["outcome"] == "answered" == truth.outcome
        assert record["answered_by"] == "Local/7003@agents" == truth.answered_by
        assert record["customer_id"] == "C-2001"
        assert record["caller"] == "+8613800138000"
        for field, want in (("started_at", truth.start), ("ended_at", truth.end),
                            ("answered_at", truth.answer)):
            got = _time(record[field])
            assert got is not None, field
            assert want is not None, field
            assert abs((got - want).total_seconds()) <= TOLERANCE_S, field
        assert lab.objects("leads", view.linkedid) == []
    finally:
        await lab.end_process(signal.SIGTERM)


async def test_stopped_while_the_caller_waits_the_real_record_is_posted_once(lab: Lab) -> None:
    """callroute is stopped (SIGTERM, a rolling upgrade) while the caller waits in the
    queue and started again; an agent answers meanwhile: the call was parked, not posted
    as a guess, and the restarted process posts exactly one record, the real one, as
    Asterisk shows it (answered, by whom, when, the route decided before the stop), and
    no call-back task. (The agent rings 15 s: the restart, slow on a loaded machine,
    is over before the answer, which it follows.)"""
    await lab.spawn()
    view = await lab.observer.originate("4008001000", '"Li Lei" <+8613800138000>',
                                        hold_s=20, talk_s=2, variables={"__RING_S": "15"})
    await lab.observer.wait(lambda: bool(view.named("QueueCallerJoin")), 20)
    assert await lab.end_process(signal.SIGTERM) == 0
    stopping = lab.proc_logs[-1].read_text()
    assert "shutdown: 1 call(s) in progress parked" in stopping, stopping[-3000:]
    assert lab.objects("activities", view.linkedid) == []
    await lab.spawn()
    try:
        assert not view.named("AgentConnect"), "the restart took longer than the ring"
        await lab.observer.wait_ended([view], timeout=50)
        record = await lab.record(view)
        await asyncio.sleep(1.0)  # nothing else comes for this call
        assert len(lab.objects("activities", view.linkedid)) == 1
        truth = truth_of(lab.asterisk, view, lab.zone)
        assert truth.outcome == "answered"
        assert truth.answered_by == "Local/7101@agents"
        assert compare(record, truth) == [], view.dump()
        assert record["customer_id"] == "C-2001"
        assert record["incomplete"] is True  # events of the restart's gap may be missing
        assert lab.objects("tasks", view.linkedid) == []
        assert "1 found, 1 still up" in lab.proc_logs[-1].read_text()
    finally:
        await lab.end_process(signal.SIGTERM)


async def test_killed_and_the_call_ends_meanwhile_its_record_is_posted_once(lab: Lab) -> None:
    """callroute is killed (SIGKILL) while an agent talks to a customer, and the call ends
    before it is started again: the restarted process posts one record for it from the
    call's last checkpoint, flagged incomplete, with the customer, the route, the agent
    who answered and the start Asterisk shows; it ends no earlier than the kill."""
    await lab.spawn()
    view = await lab.observer.originate("4008001000", '"Li Lei" <+8613800138000>',
                                        hold_s=20, talk_s=4)
    await lab.observer.wait(lambda: any(m.get("DialStatus") == "ANSWER"
                                        for m in view.named("DialEnd")), 10)
    await asyncio.sleep(1.5)  # a checkpoint is written about every second
    killed_at = time.time()
    assert await lab.end_process(signal.SIGKILL) == -signal.SIGKILL
    await lab.observer.wait_ended([view], timeout=30)
    await lab.spawn()
    try:
        record = await lab.record(view, timeout=30)
        await asyncio.sleep(1.0)
        assert len(lab.objects("activities", view.linkedid)) == 1
        truth = truth_of(lab.asterisk, view, lab.zone)
        assert record["incomplete"] is True
        assert record["customer_id"] == "C-2001"
        assert record["caller"] == "+8613800138000"
        assert (record["rule"], record["reason"]) == ("vip-owner", "rule")
        assert record["outcome"] == "answered" == truth.outcome
        assert record["answered_by"] == "Local/7003@agents" == truth.answered_by
        started, ended = _time(record["started_at"]), _time(record["ended_at"])
        assert started is not None
        assert ended is not None
        assert abs((started - truth.start).total_seconds()) <= TOLERANCE_S
        assert killed_at - TOLERANCE_S <= ended.timestamp() <= truth.end.timestamp() + \
            TOLERANCE_S
        assert "1 ended meanwhile (posted as incomplete)" in lab.proc_logs[-1].read_text()
    finally:
        await lab.end_process(signal.SIGTERM)


async def test_crm_down_and_killed_after_the_call_delivers_once(lab: Lab) -> None:
    """The CRM refuses the call record (503) when the call ends, callroute is killed with
    the record in its outbox, started again, and the CRM comes back: the record is
    delivered once."""
    from router.samplecrm import state_of

    faults = state_of(lab.crm).faults
    await lab.spawn()
    faults.add("status", path="/api/activities", method="POST", status=503)
    view = await lab.observer.originate("4008002000", '"Prospect" <13200132999>',
                                        hold_s=2, talk_s=1)
    await lab.observer.wait_ended([view], timeout=30)
    requests = state_of(lab.crm).requests

    def refused() -> bool:
        return any(r.path == "/api/activities" and r.body and
                   r.body.get("call_id") == view.linkedid for r in requests)

    await lab.observer.wait(refused, 10)
    assert await lab.end_process(signal.SIGKILL) == -signal.SIGKILL
    faults.clear()
    await lab.spawn()
    try:
        record = await lab.record(view, timeout=30)
        await asyncio.sleep(1.0)
        assert len(lab.objects("activities", view.linkedid)) == 1
        assert record["outcome"] == "answered"
        assert len(lab.objects("leads", view.linkedid)) == 1
    finally:
        await lab.end_process(signal.SIGTERM)


async def test_callroute_stopped_the_dialplan_falls_back(lab: Lab) -> None:
    """With callroute stopped the AGI fails (AGISTATUS=FAILURE) and the dialplan sends the
    caller to its own default queue, where an agent answers."""
    view = await lab.observer.originate("4008001000", '"Li Lei" <+8613800138000>',
                                        hold_s=2, talk_s=1)
    await lab.observer.wait_ended([view], timeout=40)
    truth = truth_of(lab.asterisk, view, lab.zone)
    assert truth.route.get("agistatus") == "FAILURE"
    assert any("no usable route (AGISTATUS=FAILURE), queue support" in ln
               for ln in truth.lines), truth.lines
    assert truth.queue == "support"
    assert truth.outcome == "answered"
    assert truth.answered_by in ("Local/7001@agents", "Local/7002@agents")

