"""Updates of delivered call records (a disposition given after the wrap-up time),
through the real outbox, delivery worker and REST connector against the sample CRM on
loopback: the activity the record created is changed once, never created twice."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from router.crm.config import CrmSettings, sample_crm_section
from router.crm.rest import RestConnector
from router.keys import Keys
from router.records.delivery import DeliveryWorker
from router.records.outbox import Outbox
from router.records.outbox_cli import retry_dead
from router.records.spool import Spool
from router.records.updates import as_original, update_of, update_record
from router.samplecrm import make_app, start_sample_crm, state_of
from tests.router.records.outbox_crm import outbox_settings, wait_until

KEYS = Keys(prefix="u:")


def record(n: int) -> dict[str, Any]:
    """An answered call's record, as the tracker emits it (no disposition)."""
    return {"record_key": f"call:{n}.0", "linkedid": f"{n}.0", "caller": "+8613800138000",
            "customer_id": "C-1001", "outcome": "answered", "answered_by_agent": "7001",
            "start": "2026-11-22T01:10:00+00:00"}


DISPOSED = {"disposition": "sale", "disposition_note": "two units", "disposition_by": "7001"}


@dataclass
class Rig:
    """Outbox, a delivery worker with the REST connector, the sample CRM."""

    crm: web.Application
    outbox: Outbox
    worker: DeliveryWorker
    redis: Redis
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.worker.run(self.stop, grace_s=1.0))

    def activities(self) -> list[dict[str, Any]]:
        return list(state_of(self.crm).objects["activities"].values())

    def requests(self, method: str) -> list[Any]:
        return [r for r in state_of(self.crm).requests
                if r.method == method and r.path.startswith("/api/activities")]


@asynccontextmanager
async def rig_for(redis_url: str, tmp_path: Path, settings: Any = None,
                  **crm: Any) -> AsyncIterator[Rig]:
    """The rig, its CRM's activity step changed by ``crm`` (outbox ``settings``: the
    fast test ones by default); everything stopped after."""
    app = make_app(token="demo-token")
    runner, url = await start_sample_crm("127.0.0.1", 0, app)
    section = sample_crm_section(url)
    section["activity"]["body"].update({"disposition": "{record.disposition}",
                                        "note": "{record.disposition_note}"})
    section["activity"].update(crm)
    connector = RestConnector(CrmSettings.model_validate(section))
    redis = Redis.from_url(redis_url, decode_responses=True)
    settings = settings or outbox_settings()
    spool = Spool(tmp_path / "spool", max_records=100, max_bytes=1_000_000)
    outbox = Outbox(redis, KEYS, settings, spool)
    worker = DeliveryWorker(redis, connector, keys=KEYS, settings=settings)
    rig = Rig(app, outbox, worker, redis, asyncio.Event())
    try:
        yield rig
    finally:
        rig.stop.set()
        if rig.task is not None:
            await asyncio.wait_for(rig.task, 10)
        await connector.aclose()
        await redis.aclose()
        await runner.cleanup()


@pytest.fixture
async def rig(redis_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    """The sample CRM's activity step with its PATCH update (sample_crm_section)."""
    async with rig_for(redis_url, tmp_path) as r:
        yield r


def test_an_update_record_names_what_it_updates() -> None:
    """update_record keeps the original's fields with the changes, under a key of its own
    that names the original; as_original gives the templates the original's key back."""
    update = update_record(record(1), DISPOSED)
    assert update["record_key"] == "call:1.0:disposition"
    assert update_of(update) == ("call:1.0", "call")
    assert update_of(record(1)) is None
    seen = as_original(update)
    assert seen["record_key"] == "call:1.0"
    assert (seen["disposition"], seen["caller"]) == ("sale", "+8613800138000")
    assert "update_of" not in seen


async def test_a_late_disposition_updates_the_one_activity_once(rig: Rig) -> None:
    """The record is delivered (one activity, no disposition); the update goes through
    the outbox as a PATCH of that activity by its id: still one activity, now with the
    disposition and note. The same update enqueued again is a duplicate, and the same
    entry delivered again (a crash before its ack) sends nothing more."""
    rig.start()
    assert await rig.outbox.enqueue(record(1)) == "enqueued"
    await wait_until(lambda: len(rig.activities()) == 1)
    (activity,) = rig.activities()
    assert activity["disposition"] is None
    assert await rig.outbox.enqueue(update_record(record(1), DISPOSED)) == "enqueued"
    await wait_until(lambda: rig.activities()[0].get("disposition") == "sale")
    (activity,) = rig.activities()
    assert (activity["note"], activity["call_id"]) == ("two units", "1.0")
    patches = rig.requests("PATCH")
    assert [r.path for r in patches] == [f"/api/activities/{activity['id']}"]
    assert patches[0].body == {"disposition": "sale", "note": "two units"}
    assert await rig.outbox.enqueue(update_record(record(1), DISPOSED)) == "duplicate"
    again = json.dumps(update_record(record(1), DISPOSED))
    entry_id = await rig.redis.xadd(KEYS.outbox_stream, {
        "key": "call:1.0:disposition", "record": again, "attempt": "0", "enq": "0",
        "error": ""})
    await wait_until(lambda: rig.worker.stats["duplicate"] >= 1)
    assert not await rig.redis.xrange(KEYS.outbox_stream, entry_id, entry_id)
    assert len(rig.requests("PATCH")) == 1
    assert len(rig.requests("POST")) == 1
    assert len(rig.activities()) == 1


async def test_an_update_waits_for_its_record_and_survives_a_crm_error(rig: Rig) -> None:
    """An update enqueued before its record was enqueued waits (deferred, no attempt
    spent, not dead); the CRM failing the PATCH once (503) is a normal retry; in the end
    the record is posted once and patched with the disposition."""
    assert await rig.outbox.enqueue(update_record(record(2), DISPOSED)) == "enqueued"
    state_of(rig.crm).faults.add("status", path="/api/activities/", method="PATCH",
                                 status=503, count=1)
    rig.start()
    await wait_until(lambda: rig.worker.stats["deferred"] >= 2)
    [member] = await rig.redis.zrange(KEYS.outbox_retry, 0, -1)
    waiting = json.loads(member)
    assert (waiting["key"], waiting["attempt"]) == ("call:2.0:disposition", "0")
    assert waiting["error"] == "waiting for its original call:2.0 (not in the outbox yet)"
    assert rig.worker.stats["retry"] == 0
    assert rig.activities() == []
    assert await rig.outbox.enqueue(record(2)) == "enqueued"
    await wait_until(lambda: bool(rig.activities()) and
                     rig.activities()[0].get("disposition") == "sale")
    assert len(rig.activities()) == 1
    assert rig.worker.stats["dead"] == 0
    assert rig.worker.stats["retry"] == 1  # the refused PATCH
    assert len(rig.requests("PATCH")) == 2  # the refused one and the one that took


async def retry_members(redis: Redis) -> list[dict[str, Any]]:
    """The entries waiting in the retry set now."""
    return [json.loads(m) for m in await redis.zrange(KEYS.outbox_retry, 0, -1)]


async def test_an_update_outlasts_a_crm_outage_longer_than_its_retries(
    redis_url: str, tmp_path: Path,
) -> None:
    """The CRM answers every activity POST "429, come back in 1 s" for 2.5 s, five times
    max_attempts x backoff_max (5 x 0.1 s): the record's own retries wait the CRM out and
    it is posted in the end; its update, enqueued at the same time, waits for it all
    along without spending an attempt (deferred: attempt 0 each time it is seen in the
    retry set), is never dead-lettered, and then PATCHes the one activity once."""
    settings = outbox_settings(max_attempts=5)
    async with rig_for(redis_url, tmp_path, settings) as rig:
        faults = state_of(rig.crm).faults
        faults.add("status", path="/api/activities", method="POST", status=429,
                   retry_after="1")
        assert await rig.outbox.enqueue(record(4)) == "enqueued"
        assert await rig.outbox.enqueue(update_record(record(4), DISPOSED)) == "enqueued"
        rig.start()
        seen: set[str] = set()
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.5
        while loop.time() < until:
            for member in await retry_members(rig.redis):
                if member["key"] == "call:4.0:disposition":
                    seen.add(member["attempt"])
            await asyncio.sleep(0.01)
        assert rig.worker.stats["deferred"] >= 10
        assert seen == {"0"}
        assert rig.activities() == []
        assert await rig.redis.xlen(KEYS.outbox_dead) == 0
        faults.clear()
        await wait_until(lambda: bool(rig.activities()) and
                         rig.activities()[0].get("disposition") == "sale", limit_s=15)
        assert len(rig.activities()) == 1
        assert len(rig.requests("PATCH")) == 1
        assert rig.worker.stats["dead"] == 0
        assert await rig.redis.xlen(KEYS.outbox_dead) == 0


async def test_an_update_is_dead_lettered_only_after_its_dead_original(
    redis_url: str, tmp_path: Path,
) -> None:
    """The CRM is down (503) longer than max_attempts x backoff: the record is
    dead-lettered after its 3 attempts; its update, which spent none, follows it into
    the dead letters (never before it) as original_dead, saying to retry both. Once the
    CRM is back, retrying both posts the one activity, then patches it once."""
    settings = outbox_settings(max_attempts=3)
    async with rig_for(redis_url, tmp_path, settings) as rig:
        faults = state_of(rig.crm).faults
        faults.add("status", path="/api/activities", method="POST", status=503)
        assert await rig.outbox.enqueue(record(5)) == "enqueued"
        assert await rig.outbox.enqueue(update_record(record(5), DISPOSED)) == "enqueued"
        rig.start()
        await wait_until(lambda: rig.worker.stats["dead"] == 2)
        first, second = [f for _, f in await rig.redis.xrange(KEYS.outbox_dead)]
        assert (first["key"], first["reason"], first["attempt"]) == \
            ("call:5.0", "max_attempts", "3")
        assert (second["key"], second["reason"], second["attempt"]) == \
            ("call:5.0:disposition", "original_dead", "0")
        assert second["error"] == (
            "its original call:5.0 was dead-lettered: retry both (callroute outbox retry "
            "--key call:5.0 --key call:5.0:disposition)")
        assert rig.worker.stats["deferred"] >= 1
        assert rig.activities() == []
        faults.clear()
        assert await retry_dead(rig.redis, KEYS, ["call:5.0:disposition", "call:5.0"]) == \
            ["call:5.0", "call:5.0:disposition"]
        await wait_until(lambda: bool(rig.activities()) and
                         rig.activities()[0].get("disposition") == "sale")
        assert len(rig.activities()) == 1
        assert len(rig.requests("PATCH")) == 1
        assert await rig.redis.xlen(KEYS.outbox_dead) == 0


async def test_an_update_whose_original_never_comes_is_dead_lettered_in_the_end(
    rig: Rig,
) -> None:
    """An update whose original is never enqueued (spooled on an instance cut off from
    Redis, or lost) waits orphan_wait_s without spending an attempt, then is
    dead-lettered as original_missing; nothing is sent to the CRM."""
    rig.worker.orphan_wait_s = 0.5
    assert await rig.outbox.enqueue(update_record(record(6), DISPOSED)) == "enqueued"
    rig.start()
    await wait_until(lambda: rig.worker.stats["dead"] == 1)
    [(_, dead)] = await rig.redis.xrange(KEYS.outbox_dead)
    assert (dead["key"], dead["reason"], dead["attempt"]) == \
        ("call:6.0:disposition", "original_missing", "0")
    assert "its original call:6.0 was not enqueued in" in dead["error"]
    assert rig.worker.stats["deferred"] >= 2
    assert not state_of(rig.crm).requests


async def test_a_connector_without_an_update_dead_letters_it(redis_url: str,
                                                             tmp_path: Path) -> None:
    """A CRM whose call step has no update request: the update is dead-lettered as
    rejected (kept for a person), the activity is left as it was."""
    async with rig_for(redis_url, tmp_path, update=None) as rig:
        rig.start()
        await rig.outbox.enqueue(record(3))
        await wait_until(lambda: len(rig.activities()) == 1)
        await rig.outbox.enqueue(update_record(record(3), DISPOSED))
        await wait_until(lambda: rig.worker.stats["dead"] == 1)
        [(_, dead)] = await rig.redis.xrange(KEYS.outbox_dead)
        assert (dead["key"], dead["reason"]) == ("call:3.0:disposition", "rejected")
        assert "no update request" in dead["error"]
        assert rig.requests("PATCH") == []
