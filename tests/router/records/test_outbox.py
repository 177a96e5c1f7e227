"""Outbox enqueue: idempotent per record_key, spool fallback, Redis outage end to end."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ami.records import CallRecord
from router.errors import OutboxError
from router.records.spool import Spool
from tests.redis_server import RedisServer
from tests.router.records.outbox_crm import FakeCrm, Harness, call_record, crm_fixture, wait_until  # noqa: F401  (fixtures)


async def test_enqueue_is_idempotent_across_instances(
    redis_url: str, crm: FakeCrm, tmp_path: Path
) -> None:
    """Three instances enqueuing the same records concurrently produce ONE stream entry
    per record_key; the others are told "duplicate"."""
    instances = [Harness(redis_url, crm, tmp_path / f"s{i}") for i in range(3)]
    try:
        results = await asyncio.gather(*(
            inst.outbox.enqueue(call_record(n)) for n in range(50) for inst in instances
        ))
        assert results.count("enqueued") == 50
        assert results.count("duplicate") == 100
        entries = await instances[0].redis.xrange(instances[0].keys.outbox_stream)
        assert sorted(f["key"] for _id, f in entries) == sorted(f"call-{n}" for n in range(50))
        ttl = await instances[0].redis.pttl(instances[0].keys.outbox_dedupe("call-1"))
        assert 0 < ttl <= 7 * 86_400_000
    finally:
        for inst in instances:
            await inst.close()


async def test_enqueue_accepts_a_pydantic_call_record(
    redis_url: str, crm: FakeCrm, tmp_path: Path
) -> None:
    """A CallRecord model is stored as its JSON dump and delivered with its record_key."""
    h = Harness(redis_url, crm, tmp_path / "spool")
    try:
        record = CallRecord(
            record_key="call:1.1", linkedid="1.1", outcome="missed", customer_id="C1",
            caller="+8613800138000", start=datetime(2024, 1, 1, tzinfo=UTC),
        )
        assert await h.outbox.enqueue(record) == "enqueued"
        h.start()
        await wait_until(lambda: crm.objects("task") == {"call:1.1:task"})
        body = next(r.body for r in crm.received if r.key == "call:1.1")
        assert body["linkedid"] == "1.1"
        assert body["start"].startswith("2024-01-01T00:00:00")
    finally:
        await h.close()


async def test_record_without_key_is_refused(redis_url: str, crm: FakeCrm, tmp_path: Path) -> None:
    """A record with no record_key raises ValueError instead of being stored unkeyed."""
    h = Harness(redis_url, crm, tmp_path / "spool")
    try:
        with pytest.raises(ValueError, match="record_key"):
            await h.outbox.enqueue({"linkedid": "1"})
    finally:
        await h.close()


async def test_redis_down_spools_then_drains_and_delivers_once(
    own_redis: RedisServer, crm: FakeCrm, tmp_path: Path
) -> None:
    """Redis stopped mid-delivery: records enqueued meanwhile go to the on-disk spool, the
    worker survives, and when Redis returns the spool is drained and every record is
    delivered exactly once."""
    h = Harness(own_redis.url, crm, tmp_path / "spool")
    try:
        h.start()
        h.start_drainer()
        for n in range(20):
            assert await h.outbox.enqueue(call_record(n)) == "enqueued"
        await wait_until(lambda: len(crm.objects()) == 20)
        own_redis.stop()
        results = [await h.outbox.enqueue(call_record(n)) for n in range(20, 60)]
        assert set(results) == {"spooled"}
        assert h.spool.usage()[0] == 40
        await asyncio.sleep(0.3)  # worker and drainer keep failing without crashing
        own_redis.start()
        await wait_until(lambda: len(crm.objects()) == 60, limit_s=20)
        await wait_until(lambda: h.spool.usage()[0] == 0)
        assert crm.count() == {f"call-{n}": 1 for n in range(60)}
        assert all(not t.done() for t in h.tasks)
    finally:
        await h.close()


async def test_both_redis_and_spool_failing_raises_outbox_error(
    own_redis: RedisServer, crm: FakeCrm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis down and the spool full, enqueue raises OutboxError and logs CRITICAL:
    never a silent loss."""
    h = Harness(own_redis.url, crm, tmp_path / "spool")
    h.outbox.spool = Spool(tmp_path / "tiny", max_records=2, max_bytes=1_000_000)
    try:
        own_redis.stop()
        assert await h.outbox.enqueue(call_record(1)) == "spooled"
        assert await h.outbox.enqueue(call_record(2)) == "spooled"
        with pytest.raises(OutboxError):
            await h.outbox.enqueue(call_record(3))
        assert any(r.levelname == "CRITICAL" and "call-3" in r.getMessage()
                   for r in caplog.records)
    finally:
        await h.close()


async def test_drain_is_idempotent_when_the_record_is_already_enqueued(
    redis_url: str, crm: FakeCrm, tmp_path: Path
) -> None:
    """A spooled record whose key already reached Redis (crash between XADD and unlink) is
    removed from the spool as a duplicate, not enqueued twice."""
    h = Harness(redis_url, crm, tmp_path / "spool")
    try:
        await h.outbox.enqueue(call_record(1))
        h.spool.put("call-1", call_record(1))
        h.spool.put("call-2", call_record(2))
        assert await h.outbox.drain_spool() == 2
        entries = await h.redis.xrange(h.keys.outbox_stream)
        assert sorted(f["key"] for _id, f in entries) == ["call-1", "call-2"]
        assert h.spool.usage() == (0, 0)
    finally:
        await h.close()
