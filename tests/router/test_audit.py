"""The audit trail in a real Redis: fields, filters, retention by MINID, the JSON-lines
mirror, and a Redis outage."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import redis.asyncio as aioredis

from router.audit import AuditEntry, AuditLog, list_entries, state_hash
from router.keys import Keys
from router.metrics import REGISTRY

KEYS = Keys(prefix="a:")
DAY = 86_400.0


class Clock:
    """A settable wall clock."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _entry(who: str = "alice", action: str = "rules.reload") -> AuditEntry:
    return AuditEntry(who=who, role="engineer", action=action, target="rules",
                      source="127.0.0.1", before="b" * 64, after="a" * 64)


def test_state_hash_is_stable_and_distinguishes() -> None:
    """Equal states hash equal whatever the key order; bytes hash as they are; None is
    no state."""
    assert state_hash({"a": 1, "b": [2]}) == state_hash({"b": [2], "a": 1})
    assert state_hash({"a": 1}) != state_hash({"a": 2})
    assert len(state_hash(b"x")) == 64
    assert state_hash(None) == ""


async def test_entries_are_stored_with_every_field_and_read_back(redis_url: str) -> None:
    """An entry comes back from the stream with who, role, action, target, source,
    before/after hashes, outcome, time and id; filters by who and action prefix and
    time window work."""
    redis = aioredis.Redis.from_url(redis_url)
    clock = Clock(1_800_000_000.0)
    log = AuditLog(redis, KEYS, clock=clock)
    try:
        first = await log.write(_entry())
        clock.now += 10
        await log.write(_entry("bob", "user.add"))
        clock.now += 10
        await log.write(_entry("bob", "user.rotate"))
        got = await log.entries()
        assert [e.action for e in got] == ["rules.reload", "user.add", "user.rotate"]
        assert got[0] == first
        assert got[0].to_dict() == {
            "who": "alice", "role": "engineer", "action": "rules.reload", "target": "rules",
            "source": "127.0.0.1", "before": "b" * 64, "after": "a" * 64, "outcome": "ok",
            "at": 1_800_000_000.0, "id": first.id, "time": "2027-01-15T08:00:00.000Z"}
        assert first.id.startswith("1800000000000-")
        assert [e.action for e in await log.entries(who="bob")] == ["user.add", "user.rotate"]
        assert [e.action for e in await log.entries(action="user.")] == ["user.add",
                                                                          "user.rotate"]
        assert [e.who for e in await log.entries(since=1_800_000_005.0,
                                                 until=1_800_000_015.0)] == ["bob"]
        assert len(await list_entries(redis, KEYS, limit=2)) == 2
    finally:
        await redis.aclose()


async def test_entries_older_than_the_retention_are_trimmed(redis_url: str) -> None:
    """XADD trims by MINID: once the clock has moved past the retention (180 days), the
    next entry removes every older one; entries within the retention stay."""
    redis = aioredis.Redis.from_url(redis_url)
    clock = Clock(1_700_000_000.0)
    log = AuditLog(redis, KEYS, retention_days=180, clock=clock)
    try:
        for _ in range(300):
            await log.write(_entry())
        clock.now += 100 * DAY
        await log.write(_entry("middle"))
        assert len(await log.entries(limit=1000)) == 301
        clock.now += 81 * DAY
        await log.write(_entry("late"))
        assert [e.who for e in await log.entries(limit=1000)] == ["middle", "late"]
    finally:
        await redis.aclose()


async def test_mirror_file_gets_json_lines_even_when_redis_is_down(tmp_path: Path) -> None:
    """With a mirror file, each entry is one JSON line (file mode 0600); when Redis cannot
    be reached the entry still reaches the file and the failure is counted."""
    path = tmp_path / "audit" / "audit.jsonl"
    redis = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    log = AuditLog(redis, KEYS, mirror=path, clock=Clock(1_800_000_000.0))
    failed = REGISTRY.get_sample_value("callroute_audit_entries_total",
                                       {"outcome": "redis_failed"}) or 0.0
    try:
        entry = await log.write(_entry())
        await log.write(_entry("bob"))
    finally:
        await redis.aclose()
    assert entry.id == ""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["who"] for line in lines] == ["alice", "bob"]
    assert lines[0]["action"] == "rules.reload"
    assert lines[0]["time"] == "2027-01-15T08:00:00.000Z"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert REGISTRY.get_sample_value("callroute_audit_entries_total",
                                     {"outcome": "redis_failed"}) == failed + 2


async def test_record_writes_in_the_background(redis_url: str) -> None:
    """`record` (for signal handlers) writes without awaiting; `aclose` waits for it."""
    redis = aioredis.Redis.from_url(redis_url)
    log = AuditLog(redis, KEYS)
    try:
        log.record(_entry("system"))
        await log.aclose()
        assert [e.who for e in await log.entries()] == ["system"]
    finally:
        await redis.aclose()
