"""One activity per call even when the CRM has no idempotency keys and answers get lost:
the delivery ledger, find-by-key after a lost answer, replay that needs --force.
Real Redis, a real RestConnector, and a HubSpot-shaped loopback CRM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from router.crm.config import CrmSettings
from router.crm.rest import RestConnector
from router.keys import Keys
from router.metrics import REGISTRY
from router.records.delivery import DeliveryWorker
from router.records.ledger import Ledger
from router.records.outbox import Outbox
from router.records.outbox_cli import list_entries, replay
from router.records.spool import Spool
from tests.router.records.noidem_crm import (  # noqa: F401  (fixture)
    TOKEN,
    NoIdemCrm,
    hubspot_settings,
    noidem_fixture,
)
from tests.router.records.outbox_crm import call_record, outbox_settings, wait_until

KEYS = Keys(prefix="t:")
ROOT = Path(__file__).resolve().parents[3]


def steps(outcome: str) -> float:
    """callroute_ledger_steps{outcome}."""
    return REGISTRY.get_sample_value("callroute_ledger_steps_total", {"outcome": outcome}) or 0.0


class Rig:
    """An outbox and one delivery worker posting through a RestConnector (no leads
    unless ``create_leads=True`` is given among the outbox settings)."""

    def __init__(self, redis_url: str, settings: CrmSettings, spool: Path,
                 **outbox: Any) -> None:
        self.redis = Redis.from_url(redis_url, decode_responses=True)
        self.outbox_settings = outbox_settings(**{"create_leads": False, **outbox})
        self.outbox = Outbox(self.redis, KEYS, self.outbox_settings,
                             Spool(spool, max_records=100, max_bytes=10_000_000))
        self.sink = RestConnector(settings)
        self.worker = DeliveryWorker(self.redis, self.sink, keys=KEYS,
                                     settings=self.outbox_settings, consumer="w1")
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.worker.run(self.stop, grace_s=1.0))

    async def delivered(self, key: str, limit_s: float = 10.0) -> None:
        """Wait until ``key`` has its delivered marker."""
        for _ in range(int(limit_s / 0.02)):
            if await self.redis.exists(KEYS.delivered(key)):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{key} not delivered (dead letters: {await self.dead()})")

    async def dead(self) -> list[dict[str, str]]:
        return [f for _id, f in await self.redis.xrange(KEYS.outbox_dead)]

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 10)
        await self.sink.aclose()
        await self.redis.aclose()


@pytest.fixture
async def make_rig(redis_url: str, tmp_path: Path) -> AsyncIterator[Any]:
    """Builds rigs (closed after the test)."""
    rigs: list[Rig] = []

    def make(settings: CrmSettings, **outbox: Any) -> Rig:
        rig = Rig(redis_url, settings, tmp_path / f"spool{len(rigs)}", **outbox)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.close()


@pytest.mark.parametrize("lost", ["drop", "stall"])
async def test_lost_answer_after_commit_is_found_not_created_again(
    noidem: NoIdemCrm, make_rig: Any, lost: str
) -> None:
    """The CRM commits the activity, then drops the connection (or answers after the
    client's timeout). The retry finds the activity by the key written into it and
    posts nothing: ONE activity, one create and one search at the CRM, and the ledger
    holds the CRM's id."""
    noidem.lose["call-1"] = lost
    noidem.stall_s = 1.5
    rig = make_rig(hubspot_settings(noidem.url, timeout_s=0.5))
    found = steps("found")
    await rig.outbox.enqueue(call_record(1))
    rig.start()
    await rig.delivered("call-1")
    assert noidem.keys("calls") == ["call-1"]
    assert noidem.creates == ["call-1"]
    assert len(noidem.searches) == 1
    state = await Ledger(rig.redis, KEYS, 60).read("call-1")
    assert state.done["call"].id == noidem.objects[0].id
    assert state.done["call"].how == "found"
    assert state.sent == {}
    assert steps("found") == found + 1


async def test_lost_answer_before_commit_is_posted_again(
    noidem: NoIdemCrm, make_rig: Any
) -> None:
    """The connection drops before the CRM committed: the search finds nothing, so the
    activity is posted again, once."""
    noidem.lose["call-2"] = "drop_before"
    rig = make_rig(hubspot_settings(noidem.url))
    await rig.outbox.enqueue(call_record(2))
    rig.start()
    await rig.delivered("call-2")
    assert noidem.keys("calls") == ["call-2"]
    assert noidem.creates == ["call-2", "call-2"]
    assert len(noidem.searches) == 1


async def test_without_find_or_idempotency_a_lost_answer_is_held_not_duplicated(
    noidem: NoIdemCrm, make_rig: Any
) -> None:
    """No find step and no idempotency header: after a lost answer nothing can tell
    whether the activity exists, so the record is dead-lettered as unconfirmed (with
    what to do) instead of being posted twice; replaying the dead letter (not forced)
    holds it again; the CRM still has ONE activity."""
    noidem.lose["call-3"] = "drop"
    rig = make_rig(hubspot_settings(noidem.url, find=False))
    await rig.outbox.enqueue(call_record(3))
    rig.start()
    await wait_until_dead(rig, 1)
    (dead,) = await rig.dead()
    assert dead["reason"] == "unconfirmed"
    assert "replay --force" in dead["error"]
    rows = await list_entries(rig.redis, KEYS, "delivery")
    assert rows[0]["reason"] == "unconfirmed"
    assert rows[0]["ledger"] == {"done": {}, "unconfirmed": ["call"]}
    assert (await replay(rig.redis, KEYS, record_keys=["call-3"])).queued == ["call-3"]
    await wait_until_dead(rig, 1)
    assert noidem.keys("calls") == ["call-3"]


async def wait_until_dead(rig: Rig, count: int) -> None:
    """Wait until the dead letter stream holds ``count`` entries and nothing is left."""
    for _ in range(500):
        if len(await rig.dead()) == count and await rig.redis.xlen(KEYS.outbox_stream) == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not dead-lettered")


@pytest.mark.parametrize(("settle_s", "objects"), [(1.5, 1), (0.0, 2)])
async def test_search_that_lags_is_not_believed_before_settle_s(
    noidem: NoIdemCrm, make_rig: Any, settle_s: float, objects: int
) -> None:
    """HubSpot's search shows a new object only after a while. With settle_s longer than
    the lag, a "not found" right after the lost answer is not believed and the search is
    repeated until the object shows: one activity. With settle_s 0 the same lag makes
    the worker post a duplicate (what settle_s is for)."""
    noidem.index_lag_s = 0.6
    noidem.lose["call-4"] = "drop"
    rig = make_rig(hubspot_settings(noidem.url, settle_s=settle_s))
    await rig.outbox.enqueue(call_record(4))
    rig.start()
    await rig.delivered("call-4")
    assert noidem.keys("calls") == ["call-4"] * objects


async def test_a_retry_after_a_later_step_failed_skips_the_steps_in_the_ledger(
    noidem: NoIdemCrm, make_rig: Any
) -> None:
    """A missed call posts an activity and a task. The task's answer is lost: the retry
    skips the activity (in the ledger) and finds the task: one of each."""
    noidem.lose["call-5:task"] = "drop"
    rig = make_rig(hubspot_settings(noidem.url))
    skipped = steps("skipped")
    await rig.outbox.enqueue(call_record(5, outcome="missed"))
    rig.start()
    await rig.delivered("call-5")
    assert noidem.keys("calls") == ["call-5"]
    assert noidem.keys("tasks") == ["call-5:task"]
    assert noidem.creates == ["call-5", "call-5:task"]
    assert steps("skipped") == skipped + 1
    state = await Ledger(rig.redis, KEYS, 60).read("call-5")
    assert {s: e.how for s, e in state.done.items()} == {"call": "created", "task": "found"}


async def test_replay_of_a_delivered_record_is_a_no_op_unless_forced(
    noidem: NoIdemCrm, make_rig: Any
) -> None:
    """replay of a delivered record sends nothing (skipped); --force drops its ledger and
    posts every step again (a second activity: what --force is for, when the CRM lost
    or deleted the first)."""
    rig = make_rig(hubspot_settings(noidem.url))
    await rig.outbox.enqueue(call_record(6))
    rig.start()
    await rig.delivered("call-6")
    done = await replay(rig.redis, KEYS, record_keys=["call-6"])
    assert (done.queued, done.skipped) == ([], ["call-6"])
    await asyncio.sleep(0.3)
    assert noidem.creates == ["call-6"]
    done = await replay(rig.redis, KEYS, record_keys=["call-6"], force=True)
    assert done.queued == ["call-6"]
    await wait_until(lambda: len(noidem.creates) == 2)
    assert noidem.keys("calls") == ["call-6", "call-6"]


async def test_a_4xx_says_why_in_the_dead_letter_the_log_and_outbox_list(
    noidem: NoIdemCrm, make_rig: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """HubSpot's 400 VALIDATION_ERROR body (naming the property) is in the log line, the
    dead letter and outbox list; the phone number it quotes and the token are masked."""
    caplog.set_level(logging.WARNING)
    noidem.reject = True
    rig = make_rig(hubspot_settings(noidem.url))
    await rig.outbox.enqueue(call_record(7, caller="+14155550199"))
    rig.start()
    await wait_until_dead(rig, 1)
    (dead,) = await rig.dead()
    assert dead["reason"] == "rejected"
    for text in (dead["error"], caplog.text,
                 json.dumps(await list_entries(rig.redis, KEYS, "delivery"))):
        assert "VALIDATION_ERROR" in text
        assert "hs_call_duration" in text
        assert "+14155550199" not in text
        assert TOKEN not in text
    assert "***99" in dead["error"]
    assert await rig.redis.hgetall(KEYS.outbox_ledger("call-7")) == {}


@pytest.mark.parametrize(("flags", "outcome"), [((), "delivered"), (("--no-find",), "dead")])
async def test_worker_killed_after_the_crm_committed(
    noidem: NoIdemCrm, redis_url: str, tmp_path: Path, flags: tuple[str, ...], outcome: str
) -> None:
    """The worker is SIGKILLed after the CRM committed the activity but before the answer
    arrived. The next worker reclaims the entry; the ledger says the step was sent: with
    the find step it finds the activity and acks; without it (and no idempotency) it
    dead-letters the record as unconfirmed. Either way the CRM has ONE activity."""
    from tests.router.records.test_delivery_crash import kill

    noidem.hold_keys.add("call-8")
    rig = Rig(redis_url, hubspot_settings(noidem.url), tmp_path / "spool")
    first = await spawn_worker(redis_url, noidem, *flags)
    try:
        await rig.outbox.enqueue(call_record(8))
        await asyncio.wait_for(noidem.committed.wait(), 10)
        await kill(first)
        noidem.hold_keys.clear()
        noidem.release.set()
        assert (await rig.redis.hgetall(KEYS.outbox_ledger("call-8"))).keys() == {"call:sent"}
        second = await spawn_worker(redis_url, noidem, *flags)
        try:
            if outcome == "delivered":
                await rig.delivered("call-8")
                assert len(noidem.searches) == 1
            else:
                await wait_until_dead(rig, 1)
                assert (await rig.dead())[0]["reason"] == "unconfirmed"
        finally:
            await kill(second)
    finally:
        if first.returncode is None:
            await kill(first)
        await rig.close()
    assert noidem.keys("calls") == ["call-8"]
    assert noidem.creates == ["call-8"]


async def spawn_worker(redis_url: str, crm: NoIdemCrm, *flags: str) -> Any:
    """Start a ledger worker process and wait for its READY line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.router.records.ledger_worker_proc", redis_url, crm.url,
        "t:", *flags, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.strip() == b"READY"
    return proc


async def test_lost_answer_repost_is_chosen_per_step(
    noidem: NoIdemCrm, make_rig: Any
) -> None:
    """A step without find that says lost_answer: repost is posted again after a lost
    answer (a duplicate accepted by choice); without the setting it would be held."""
    settings = hubspot_settings(noidem.url, find=False)
    data = settings.model_dump(mode="json", exclude={"lookups", "auth"})
    data["records"][0]["lost_answer"] = "repost"
    data["auth"] = {"type": "bearer", "token": TOKEN}
    noidem.lose["call-9"] = "drop"
    rig = make_rig(CrmSettings.model_validate(data))
    await rig.outbox.enqueue(call_record(9))
    rig.start()
    await rig.delivered("call-9")
    assert noidem.keys("calls") == ["call-9", "call-9"]
    assert await rig.dead() == []
