"""``callroute outbox status|list|retry|replay`` against a real Redis and loopback CRM."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from router.keys import Keys
from router.records.ledger import Ledger
from router.records.outbox_cli import Replayed, register, replay, retry_dead, status
from router.settings import load_settings
from tests.router.records.outbox_crm import (  # noqa: F401  (fixtures)
    FakeCrm,
    Harness,
    call_record,
    crm_fixture,
    harness_fixture,
    wait_until,
)

KEYS = Keys(prefix="t:")  # the harness's

def config_file(tmp_path: Path, redis_url: str) -> Path:
    """A config file pointing at the test Redis with the harness prefix and spool."""
    path = tmp_path / "config.yaml"
    path.write_text(
        f"redis:\n  url: {redis_url}\n  prefix: 't:'\noutbox:\n  spool_dir: spool\n"
        "crm:\n  base_url: http://127.0.0.1:1\n"
    )
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Parse like ``callroute`` does and run the outbox handler in a worker thread."""
    parser = argparse.ArgumentParser(prog="callroute")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    settings = load_settings(args.config)
    code: int = args.outbox_handler(settings, args)
    return code, capsys.readouterr().out


async def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run the CLI off the event loop (it calls asyncio.run itself)."""
    return await asyncio.to_thread(run_cli, argv, capsys)


async def make_dead(h: Harness, crm: FakeCrm, n: int) -> None:
    """Enqueue n records the CRM rejects (400) and wait until they are dead letters."""
    crm.faults = [(400, {})] * n
    for i in range(n):
        await h.outbox.enqueue(call_record(i))
    h.start("dl")
    await wait_until(lambda: len(crm.received) == n)
    for _ in range(200):
        if await h.redis.xlen(h.keys.outbox_dead) == n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("records not dead-lettered")


async def test_status_and_list_show_backlog_dead_and_spool(
    h: Harness, crm: FakeCrm, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """status reports depth, oldest age, dead letters and spool size (JSON and text);
    list shows keys, states, attempts and the whole last error."""
    await make_dead(h, crm, 2)
    await h.stop_workers()
    for n in range(10, 13):
        await h.outbox.enqueue(call_record(n))
    h.spool.put("call-99", call_record(99))
    cfg = config_file(tmp_path, redis_url)
    code, out = await cli(["outbox", "status", "--config", str(cfg), "--json"], capsys)
    data = json.loads(out)
    assert code == 0
    assert (data["depth"], data["dead"], data["spool_records"]) == (3, 2, 1)
    assert data["oldest_age_s"] is not None
    assert data["oldest_age_s"] >= 0
    code, out = await cli(["outbox", "status", "--config", str(cfg)], capsys)
    assert "depth" in out
    assert "spool_records" in out
    code, out = await cli(["outbox", "list", "--config", str(cfg), "--json"], capsys)
    rows: list[dict[str, Any]] = json.loads(out)
    states = {r["key"]: r["state"] for r in rows}
    assert states == {"call-0": "dead", "call-1": "dead", "call-10": "ready",
                      "call-11": "ready", "call-12": "ready"}
    dead = next(r for r in rows if r["key"] == "call-0")
    assert dead["attempts"] == 1
    assert dead["last_error"].startswith("4xx")
    assert dead["reason"] == "rejected"
    code, out = await cli(["outbox", "list", "--dead", "--config", str(cfg)], capsys)
    assert "call-0" in out
    assert "call-10" not in out
    assert "\n    last error: 4xx: HTTP 400\n" in out


async def test_retry_moves_dead_letters_back_and_they_are_delivered(
    h: Harness, crm: FakeCrm, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """outbox retry --key K revives only that dead letter; it is then delivered once.
    retry without keys revives all the rest."""
    await make_dead(h, crm, 3)
    cfg = config_file(tmp_path, redis_url)
    code, out = await cli(
        ["outbox", "retry", "--key", "call-1", "--config", str(cfg), "--json"], capsys
    )
    assert (code, json.loads(out)) == (0, {"retried": ["call-1"]})
    await wait_until(lambda: crm.objects() == {"call-1"})
    assert await h.redis.xlen(h.keys.outbox_dead) == 2
    assert sorted(await retry_dead(h.redis, h.keys)) == ["call-0", "call-2"]
    await wait_until(lambda: crm.objects() == {"call-0", "call-1", "call-2"})
    assert crm.count() == {"call-0": 2, "call-1": 2, "call-2": 2}


async def test_replay_of_delivered_records_is_a_no_op_unless_forced(
    h: Harness, crm: FakeCrm, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """replay --since of delivered records sends nothing and reports them skipped; with
    --force they are sent again with the same idempotency key (the CRM answers duplicate:
    still one object per key); replay of a key outside the kept set queues nothing."""
    for n in range(3):
        await h.outbox.enqueue(call_record(n))
    h.start()
    await wait_until(lambda: len(crm.objects()) == 3)
    cfg = config_file(tmp_path, redis_url)
    since = ["--since", "2000-01-01T00:00:00+00:00", "--config", str(cfg)]
    code, out = await cli(["outbox", "replay", *since, "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert (data["replayed"], sorted(data["skipped"])) == ([], ["call-0", "call-1", "call-2"])
    code, out = await cli(["outbox", "replay", *since], capsys)
    assert "3 already delivered, not sent again (--force" in out
    await asyncio.sleep(0.3)
    assert len(crm.received) == 3
    code, out = await cli(["outbox", "replay", *since, "--force", "--json"], capsys)
    assert code == 0
    assert sorted(json.loads(out)["replayed"]) == ["call-0", "call-1", "call-2"]
    await wait_until(lambda: len(crm.received) == 6)
    assert crm.count() == {"call-0": 2, "call-1": 2, "call-2": 2}
    assert len(crm.objects()) == 3
    assert await replay(h.redis, h.keys, record_keys=["nope"]) == Replayed([], [])
    code, out = await cli(["outbox", "replay", "--config", str(cfg)], capsys)
    assert code == 2


class Watched(Redis):
    """The test Redis, noting at each script call (a dead letter going back into the
    outbox) whether record call-0 still had its ledger or delivered marker."""

    seen: list[int]

    def register_script(self, script: Any) -> Any:
        real = super().register_script(script)

        async def call(**kwargs: Any) -> Any:
            self.seen.append(await self.exists(KEYS.outbox_ledger("call-0"),
                                               KEYS.delivered("call-0")))
            return await real(**kwargs)

        return call


async def test_forced_replay_of_a_dead_letter_forgets_its_ledger_before_reviving_it(
    h: Harness, crm: FakeCrm, redis_url: str
) -> None:
    """replay --force of a dead letter (a step sent, its answer lost) drops the record's
    ledger *before* the entry is back in the stream: a running worker that takes it at
    once must not see the old ledger and dead-letter it again as unconfirmed."""
    await make_dead(h, crm, 1)
    await h.stop_workers()
    await Ledger(h.redis, h.keys, 60).sending("call-0", "call", 1)
    watched = Watched.from_url(redis_url, decode_responses=True)
    watched.seen = []
    try:
        assert await replay(watched, h.keys, record_keys=["call-0"], force=True) == \
            Replayed(["call-0"], [])
    finally:
        await watched.aclose()
    assert watched.seen == [0]
    assert await h.redis.xlen(h.keys.outbox_dead) == 0
    h.start()
    await wait_until(lambda: crm.objects() == {"call-0"})


async def test_status_without_redis_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With Redis unreachable the command exits 2, says Redis is down and still shows
    what is known without it (the records waiting in the disk spool), no traceback."""
    from tests.redis_server import free_port

    cfg = config_file(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    from router.records.spool import Spool

    Spool(tmp_path / "spool", max_records=10, max_bytes=1 << 20).put("k1", {"linkedid": "1"})
    code, out = await cli(["outbox", "status", "--config", str(cfg)], capsys)
    assert code == 2
    lines = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    assert lines["redis"] == "down"
    assert "Connect" in lines["error"]
    assert lines["depth"] == "-"
    assert lines["spool_records"] == "1"


async def test_status_counts_pending_and_retry(h: Harness) -> None:
    """status splits the stream into ready and in-flight entries and counts retries."""
    await h.outbox.enqueue(call_record(1))
    await h.outbox.enqueue(call_record(2))
    worker = h.worker("x")
    from router.records.outbox import ensure_group

    await ensure_group(h.redis, h.keys, "delivery")
    (entry,) = await worker.read(1, None)
    await h.redis.zadd(h.keys.outbox_retry, {entry.retry_member(1, "5xx: boom"): 1})
    data = await status(h.redis, h.keys, "delivery", h.spool)
    assert (data["ready"], data["in_flight"], data["waiting_retry"]) == (1, 1, 1)
    assert data["depth"] == 3
