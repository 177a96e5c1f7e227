"""A delivery worker killed with SIGKILL between send and ack loses and duplicates nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from tests.router.records.outbox_crm import FakeCrm, Harness, call_record, crm_fixture, wait_until  # noqa: F401  (fixtures)
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[3]


async def spawn(redis_url: str, crm: FakeCrm, *flags: str) -> asyncio.subprocess.Process:
    """Start a worker process and wait for its READY line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.router.records.outbox_worker_proc", redis_url, crm.url, "t:",
        *flags, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.strip() == b"READY"
    return proc


async def kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL, as a crash or the OOM killer would."""
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL


async def test_killed_while_crm_answers_is_reposted_with_same_key(
    redis_url: str, crm: FakeCrm, tmp_path: Path
) -> None:
    """The worker dies after the CRM received (and processed) the POST but before any
    answer or XACK; a new worker reclaims the entry and re-posts with the SAME
    idempotency key, so the CRM sees the key twice and has ONE activity."""
    h = Harness(redis_url, crm, tmp_path / "spool")
    crm.stall_keys.add("call-1")
    first = await spawn(redis_url, crm)
    try:
        await h.outbox.enqueue(call_record(1))
        await asyncio.wait_for(crm.stalled.wait(), 10)
        await kill(first)
        crm.release.set()
        crm.stall_keys.clear()
        pending = await h.redis.xpending(h.keys.outbox_stream, "delivery")
        assert pending["pending"] == 1
        second = await spawn(redis_url, crm)
        try:
            await wait_until(lambda: crm.count()["call-1"] == 2)
            await wait_until(lambda: len(crm.received) == 2)
            assert crm.objects() == {"call-1"}
            await wait_for(lambda: h.redis.exists(h.keys.delivered("call-1")), 5)
            assert await h.redis.exists(h.keys.delivered("call-1")) == 1
            assert await h.redis.xlen(h.keys.outbox_stream) == 0
        finally:
            await kill(second)
    finally:
        if first.returncode is None:
            await kill(first)
        await h.close()


async def test_killed_after_send_before_ack_does_not_resend(
    redis_url: str, crm: FakeCrm, tmp_path: Path
) -> None:
    """The worker dies after the CRM answered (step marker written) but before XACK; the
    new worker reclaims the entry, sees the step is done and acks it without posting:
    the CRM received exactly one request."""
    h = Harness(redis_url, crm, tmp_path / "spool")
    first = await spawn(redis_url, crm, "--hang-before-ack")
    try:
        await h.outbox.enqueue(call_record(1))
        assert first.stdout is not None
        line = await asyncio.wait_for(first.stdout.readline(), 10)
        assert line.strip() == b"SENT call-1"
        await kill(first)
        assert (await h.redis.xpending(h.keys.outbox_stream, "delivery"))["pending"] == 1
        second = await spawn(redis_url, crm)
        try:
            await wait_for(lambda: h.redis.exists(h.keys.delivered("call-1")), 5)
            assert await h.redis.exists(h.keys.delivered("call-1")) == 1
            assert await h.redis.xlen(h.keys.outbox_stream) == 0
            assert crm.count() == {"call-1": 1}
        finally:
            await kill(second)
    finally:
        if first.returncode is None:
            await kill(first)
        await h.close()
