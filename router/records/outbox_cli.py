"""``callroute outbox status|list|retry|replay``: look into and repair the outbox.

- ``status``: backlog (stream entries: ready + in flight; plus retries waiting), age of
  the oldest record, dead letters, spooled records, kept delivered records. With Redis
  down it still shows the spool (``redis: down``, exit status 2).
- ``list``: entries with key, state, age, attempts, the last error (what the CRM said,
  masked) and the ledger (what each step already created at the CRM, and steps sent
  whose answer was lost) (``--dead`` for dead letters only, ``--limit``).
- ``retry``: move dead letters (all, or ``--key K`` ...) back into the outbox with a
  fresh attempt count.
- ``replay``: send records again: by ``--key`` (dead ones, or delivered ones still kept
  in ``outbox:sent``), all delivered in a window (``--since``/``--until``, ISO 8601),
  or ``--dead``. A dead letter goes back into the outbox with its ledger: the steps it
  already created are not sent again. A *delivered* record is not sent again (a no-op,
  reported as skipped) unless ``--force``: then its delivered marker and ledger are
  dropped and every step runs again (a step with a ``find`` still looks its object up
  by its key first, and the idempotency keys are unchanged, so a CRM that remembers a
  key answers "duplicate"). ``--force`` on a dead letter also drops its ledger (after a
  person checked an ``unconfirmed`` one at the CRM).

Every command prints a human-readable table, or one JSON document with ``--json``. The
functions below are the programmatic API (also used by the admin API if it wants).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from router.audit import AuditEntry, cli_actor, state_hash
from router.audit import from_settings as audit_from_settings
from router.errors import ConfigError
from router.keys import Keys, keys_from_settings
from router.log import mask_stored, mask_url
from router.records.ledger import LedgerState
from router.records.outbox import Outbox, connect_redis, now_ms
from router.records.spool import Spool
from router.settings import Settings, cli_local_time, config_option

SCAN_CHUNK = 1000
SCAN_LIMIT = 200_000

# KEYS: dead stream, outbox stream; ARGV: dead id, note. Dead letter -> fresh outbox entry.
_REVIVE_LUA = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return false end
local f = {}
local fields = e[1][2]
for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
local id = redis.call('XADD', KEYS[2], '*', 'key', f['key'] or '', 'record', f['record'] or '',
                      'attempt', '0', 'enq', f['enq'] or '0', 'error', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"""


def _age_s(enq_ms: int, now: int) -> float | None:
    return round((now - enq_ms) / 1000, 3) if enq_ms > 0 else None


async def _scan_stream(
    redis: Redis, key: str, limit: int = SCAN_LIMIT, lo: str = "-", hi: str = "+"
) -> list[tuple[str, Any]]:
    """Entries of a stream between ids ``lo`` and ``hi`` (in chunks, up to ``limit``)."""
    out: list[tuple[str, Any]] = []
    start = lo
    while len(out) < limit:
        chunk: Any = await redis.xrange(
            key, min=start, max=hi, count=SCAN_CHUNK
        )
        if not chunk:
            break
        out += chunk
        start = "(" + chunk[-1][0]
        if len(chunk) < SCAN_CHUNK:
            break
    return out[:limit]


async def _in_flight(redis: Redis, keys: Keys, group: str) -> dict[str, tuple[str, int]]:
    """Pending (delivered to a consumer, not acked) entries: id -> (consumer, idle ms)."""
    try:
        rows: Any = await redis.xpending_range(
            keys.outbox_stream, group, min="-", max="+", count=SCAN_LIMIT
        )
    except ResponseError as exc:
        if "NOGROUP" in str(exc):
            return {}
        raise
    return {r["message_id"]: (r["consumer"], int(r["time_since_delivered"])) for r in rows}


async def list_entries(
    redis: Redis, keys: Keys, group: str, *, dead_only: bool = False, limit: int = 100,
    ledger: bool = True,
) -> list[dict[str, Any]]:
    """Outbox entries (ready, in_flight, retry) and dead letters, oldest first; with
    ``ledger``, each with what its steps already created at the CRM."""
    now = now_ms()
    rows: list[dict[str, Any]] = []
    if not dead_only:
        flight = await _in_flight(redis, keys, group)
        for eid, f in await _scan_stream(redis, keys.outbox_stream):
            consumer = flight.get(eid, ("", 0))[0]
            rows.append(_row(eid, f, "in_flight" if eid in flight else "ready", now,
                             consumer=consumer or None))
        retries: Any = await redis.zrange(
            keys.outbox_retry, 0, SCAN_LIMIT, withscores=True
        )
        for member, score in retries:
            try:
                f = json.loads(member)
            except ValueError:
                continue
            rows.append(_row("", f, "retry", now, due_in_s=round((score - now) / 1000, 3)))
    for eid, f in await _scan_stream(redis, keys.outbox_dead):
        rows.append(_row(eid, f, "dead", now, reason=f.get("reason")))
    rows.sort(key=lambda r: -(r["age_s"] or 0))
    rows = rows[:limit]
    if not ledger:
        return rows
    async with redis.pipeline(transaction=False) as pipe:
        for row in rows:
            pipe.hgetall(keys.outbox_ledger(row["key"]))
        ledgers = await pipe.execute()
    for row, fields in zip(rows, ledgers, strict=True):
        # what the CRM already holds of this record, and steps sent without an answer
        row["ledger"] = LedgerState.parse(fields or {}).as_dict()
    return rows


def _row(eid: str, f: dict[str, Any], state: str, now: int, **extra: Any) -> dict[str, Any]:
    try:
        enq = int(f.get("enq", 0))
        attempts = int(f.get("attempt", 0))
    except (TypeError, ValueError):
        enq, attempts = 0, 0
    row = {"key": f.get("key", ""), "state": state, "id": eid or None,
           "age_s": _age_s(enq, now), "attempts": attempts,
           # stored masked; an entry stored before that had its numbers in clear
           "last_error": mask_stored(str(f.get("error") or "")) or None}
    row.update(extra)
    return row


async def status(redis: Redis, keys: Keys, group: str, spool: Spool) -> dict[str, Any]:
    """Depth (ready + in flight + waiting retry), oldest age, dead letters, spool size.

    Never raises for Redis: while Redis cannot be read, the answer has what is known
    without it (the disk spool, where records wait meanwhile) and ``"redis": "down"``
    with the error; the counts kept in Redis are None."""
    spooled, spool_bytes = await asyncio.to_thread(spool.usage)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.xlen(keys.outbox_stream)
            pipe.zcard(keys.outbox_retry)
            pipe.xlen(keys.outbox_dead)
            pipe.xlen(keys.outbox_sent)
            stream_len, retry, dead, sent = await pipe.execute()
        flight = await _in_flight(redis, keys, group)
        rows = await list_entries(redis, keys, group, limit=SCAN_LIMIT, ledger=False)
    except (RedisError, OSError, TimeoutError) as exc:
        return {
            "redis": "down", "error": f"{type(exc).__name__}: {exc}",
            "depth": None, "ready": None, "in_flight": None, "waiting_retry": None,
            "oldest_age_s": None, "dead": None,
            "spool_records": spooled, "spool_bytes": spool_bytes, "kept_delivered": None,
        }
    waiting = [r for r in rows if r["state"] != "dead" and r["age_s"] is not None]
    return {
        "redis": "up",
        "depth": int(stream_len) + int(retry),
        "ready": int(stream_len) - len(flight),
        "in_flight": len(flight),
        "waiting_retry": int(retry),
        "oldest_age_s": max((r["age_s"] for r in waiting), default=None),
        "dead": int(dead),
        "spool_records": spooled,
        "spool_bytes": spool_bytes,
        "kept_delivered": int(sent),
    }


async def _dead_letters(redis: Redis, keys: Keys, record_keys: Sequence[str] | None
                        ) -> list[tuple[str, str]]:
    """``(dead letter id, record key)`` of the dead letters (all, or ``record_keys``')."""
    wanted = set(record_keys) if record_keys else None
    return [(eid, f.get("key", "")) for eid, f in await _scan_stream(redis, keys.outbox_dead)
            if wanted is None or f.get("key") in wanted]


async def _revive(redis: Redis, keys: Keys, letters: Sequence[tuple[str, str]]) -> list[str]:
    """Move these dead letters back into the outbox; the record keys of those moved."""
    revive = redis.register_script(_REVIVE_LUA)
    moved: list[str] = []
    for eid, key in letters:
        if await revive(keys=[keys.outbox_dead, keys.outbox_stream],
                        args=[eid, f"retried from dead letters at {now_ms()}"]):
            moved.append(key)
    return moved


async def _clear_markers(redis: Redis, keys: Keys, record_key: str) -> None:
    await redis.delete(keys.delivered(record_key), keys.outbox_ledger(record_key))


@dataclass(frozen=True)
class Replayed:
    """What a replay did: records queued again, and delivered ones left alone."""

    queued: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


async def retry_dead(
    redis: Redis, keys: Keys, record_keys: Sequence[str] | None = None
) -> list[str]:
    """Move dead letters (all, or those of ``record_keys``) back into the outbox;
    return the record keys moved. Steps already done stay done."""
    return await _revive(redis, keys, await _dead_letters(redis, keys, record_keys))


async def replay(
    redis: Redis,
    keys: Keys,
    *,
    record_keys: Sequence[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    dead: bool = False,
    force: bool = False,
) -> Replayed:
    """Send records again: dead letters (by key, or all with ``dead``) go back into the
    outbox; delivered ones (kept in ``outbox:sent``, by key or delivery window) only
    with ``force``, which drops their delivered marker and ledger (see the module)."""
    queued: list[str] = []
    if dead or record_keys:
        letters = await _dead_letters(redis, keys, record_keys if not dead else None)
        if force:  # before they are back in the stream, where a worker takes them at once
            for key in dict.fromkeys(key for _eid, key in letters):
                await _clear_markers(redis, keys, key)
        queued += await _revive(redis, keys, letters)
    skipped: list[str] = []
    if record_keys or since or until:
        lo = f"{int(since.timestamp() * 1000)}-0" if since else "-"
        hi = f"{int(until.timestamp() * 1000)}-0" if until else "+"
        wanted = set(record_keys) if record_keys else None
        latest: dict[str, dict[str, Any]] = {}
        for _eid, f in await _scan_stream(redis, keys.outbox_sent, lo=lo, hi=hi):
            if (wanted is None or f.get("key") in wanted) and f.get("key") not in queued:
                latest[f["key"]] = f
        for key, f in latest.items():
            if not force:
                skipped.append(key)
                continue
            await _clear_markers(redis, keys, key)
            await redis.xadd(keys.outbox_stream, {
                "key": key, "record": f.get("record", ""), "attempt": "0",
                "enq": str(now_ms()), "error": "replayed (forced)",
            })
            queued.append(key)
    return Replayed(queued, skipped)


# --- command line ------------------------------------------------------------------------
Handler = Callable[[Settings, argparse.Namespace], int]


def _common(parser: argparse.ArgumentParser) -> None:
    config_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``outbox status|list|retry|replay`` to the ``callroute`` parser; each sets
    ``outbox_handler(settings, args) -> exit code``."""
    outbox = subparsers.add_parser(
        "outbox", help="inspect and re-send call records (status, list, retry, replay)",
        description="Inspect and repair the delivery of call records to the CRM.")
    sub = outbox.add_subparsers(dest="outbox_command", required=True)
    p = sub.add_parser("status", help="backlog, oldest age, dead letters, spool")
    _common(p)
    p.set_defaults(outbox_handler=_sync(_cmd_status))
    p = sub.add_parser("list", help="list entries (pending, retrying, dead)")
    _common(p)
    p.add_argument("--dead", action="store_true", help="dead letters only")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(outbox_handler=_sync(_cmd_list))
    p = sub.add_parser("retry", help="move dead letters back into the outbox")
    _common(p)
    p.add_argument("--key", action="append", help="record key (repeatable); default: all")
    p.set_defaults(outbox_handler=_sync(_cmd_retry))
    p = sub.add_parser("replay", help="send records again")
    _common(p)
    p.add_argument("--key", action="append", help="record key (repeatable)")
    p.add_argument("--since", type=cli_local_time, help="delivered at or after (ISO 8601)")
    p.add_argument("--until", type=cli_local_time, help="delivered before (ISO 8601)")
    p.add_argument("--dead", action="store_true", help="all dead letters")
    p.add_argument("--force", action="store_true",
                   help="also send delivered records again, and forget what dead ones created")
    p.set_defaults(outbox_handler=_sync(_cmd_replay))


def _sync(
    func: Callable[[Redis, Settings, argparse.Namespace], Coroutine[Any, Any, int]],
) -> Handler:
    def handler(settings: Settings, args: argparse.Namespace) -> int:
        async def main() -> int:
            redis = connect_redis(settings)
            try:
                return await func(redis, settings, args)
            except (RedisError, OSError) as exc:
                where = mask_url(settings.redis.url)
                print(f"callroute outbox: Redis unavailable at {where}: {exc}")
                return 2
            finally:
                await redis.aclose()

        return asyncio.run(main())

    return handler


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else text)


async def _cmd_status(redis: Redis, settings: Settings, args: argparse.Namespace) -> int:
    spool = Outbox.from_settings(settings, redis).spool
    data = await status(redis, keys_from_settings(settings), settings.outbox.group, spool)
    width = max(len(k) for k in data)
    _emit(args, data, "\n".join(f"{k:<{width}}  {v if v is not None else '-'}"
                                for k, v in data.items()))
    return 2 if data["redis"] == "down" else 0


async def _cmd_list(redis: Redis, settings: Settings, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    rows = await list_entries(redis, keys_from_settings(settings), settings.outbox.group,
                              dead_only=args.dead, limit=args.limit)
    lines = [f"{'KEY':<40} {'STATE':<9} {'AGE_S':>9} {'TRIES':>5}  REASON"]
    for r in rows:
        age = "-" if r["age_s"] is None else f"{r['age_s']:.1f}"
        lines.append(f"{r['key']:<40} {r['state']:<9} {age:>9} {r['attempts']:>5}  "
                     f"{r.get('reason') or ''}")
        if r["last_error"]:  # whole: it holds what the CRM said (masked, bounded)
            lines.append(f"    last error: {r['last_error']}")
        ledger = r.get("ledger") or {}
        done = ", ".join(f"{step}={d['id'] or '?'} ({d['how']})"
                         for step, d in (ledger.get("done") or {}).items())
        if done or ledger.get("unconfirmed"):
            lines.append(f"    at the CRM: {done or '-'}"
                         + (f"; sent, answer lost: {', '.join(ledger['unconfirmed'])}"
                            if ledger.get("unconfirmed") else ""))
    if not rows:
        lines.append("(no entries)")
    _emit(args, rows, "\n".join(lines))
    return 0


async def _audit(redis: Redis, settings: Settings, action: str, done: list[str],
                 asked: Any) -> None:
    """One audit entry for a retry or replay run from the command line."""
    who, role, source = cli_actor()
    audit = audit_from_settings(settings, redis)
    await audit.write(AuditEntry(who=who, role=role, action=action,
                                 target=",".join(done)[:2000] or "-", source=source,
                                 before=state_hash(asked), after=state_hash(sorted(done))))


async def _cmd_retry(redis: Redis, settings: Settings, args: argparse.Namespace) -> int:
    moved = await retry_dead(redis, keys_from_settings(settings), args.key)
    await _audit(redis, settings, "outbox.retry", moved, sorted(args.key or ["*"]))
    _emit(args, {"retried": moved}, f"moved {len(moved)} dead letter(s) back to the outbox")
    return 0 if moved or not args.key else 1


async def _cmd_replay(redis: Redis, settings: Settings, args: argparse.Namespace) -> int:
    if not (args.key or args.since or args.until or args.dead):
        print("callroute outbox replay: give --key, --since/--until or --dead")
        return 2
    done = await replay(redis, keys_from_settings(settings), record_keys=args.key,
                        since=args.since, until=args.until, dead=args.dead, force=args.force)
    await _audit(redis, settings, "outbox.replay", done.queued,
                 {"keys": args.key, "since": args.since, "until": args.until,
                  "dead": args.dead, "force": args.force})
    text = f"queued {len(done.queued)} record(s) for delivery again"
    if done.skipped:
        text += (f"; {len(done.skipped)} already delivered, not sent again "
                 f"(--force to send them anyway): {', '.join(done.skipped[:10])}")
    _emit(args, {"replayed": done.queued, "skipped": done.skipped}, text)
    return 0 if done.queued or done.skipped else 1

