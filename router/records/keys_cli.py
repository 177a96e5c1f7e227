"""``callroute keys generate|status|rotate``: the encryption keys at rest (router.crypto).

- ``generate``: print a fresh ``<id>:<base64>`` key line to put first in
  ``encryption.keys`` (or its ``keys_file``).
- ``status``: which key ids the stored values use: outbox stream, retry set, dead
  letters, kept delivered records, spool files, cached customers and the saved states
  of calls in progress (``ami.parking``; both a ``SCAN``).
- ``rotate``: re-encrypt the outbox with the current key: stream entries not being
  delivered right now (each one atomically re-added and the old one deleted, in one Lua
  script), the retry set, the dead letters and the spool files. Kept delivered records
  (``outbox:sent``, ordered by delivery time for ``outbox replay --since``) and cached
  customers are not rewritten: they roll out by themselves (``sent_keep`` newer
  deliveries; ``positive_ttl_s + stale_max_age_s``), and ``status`` shows when the old
  key can go. The saved states of calls in progress (``ami.parking``) are re-sealed too
  (a call up for hours, one parked at a stop or left by a killed run is rewritten by no
  one else until the next start), each only if unchanged meanwhile. The rotation is
  written to the audit trail. A value it cannot re-encrypt (its key no longer
  configured, or corrupt) is left as it is and the rotation goes on with the others;
  they are listed at the end by place and id (stream id, record key, spool file name,
  a call's Linkedid) with the reason, never their content, and the command exits 3.

Exit statuses: 0 done; 1 no encryption key configured; 2 Redis unavailable; 3 (rotate)
some values could not be re-encrypted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from redis.asyncio import Redis
from redis.client import NEVER_DECODE
from redis.exceptions import RedisError, ResponseError

from router.audit import AuditEntry, cli_actor, state_hash
from router.audit import from_settings as audit_from_settings
from router.crypto import KeyRing, generate_key_line, key_id_of, keyring_from_settings
from router.errors import CryptoError, OutboxError
from router.keys import Keys, keys_from_settings
from router.log import mask_url
from router.records.outbox import Outbox, connect_redis, ensure_group
from router.settings import Settings, config_option

SCAN_CHUNK = 500
PLAIN = "(plain)"
#: what ``status`` counts a value under that it cannot read (a retry member not JSON)
UNREADABLE = "(unreadable)"
#: ``keys rotate``'s exit status when some values could not be re-encrypted
EXIT_NOT_REENCRYPTED = 3

ROTATE_EPILOG = """\
A value that cannot be re-encrypted (encrypted with a key no longer in encryption.keys,
or corrupt) is left as it is and the others are still rotated; each is listed at the
end with where it is and its id (stream entry id, record key or spool file name), never
its content. Exit status: 0: done; 1: no encryption key configured; 2: Redis unavailable;
3: some values could not be re-encrypted (listed).
"""

# KEYS: stream, and for the dead letters the record's died marker; ARGV: group ('' for
# none), id, new record. Re-adds the entry with the new record unless a consumer holds it
# (pending): 1 done, 0 skipped. A died marker naming the old id names the new one after.
_RESTREAM_LUA = """
if ARGV[1] ~= '' then
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
  if #p > 0 then return 0 end
end
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #e == 0 then return 0 end
local f = e[1][2]
local out = {}
for i = 1, #f, 2 do
  out[#out + 1] = f[i]
  if f[i] == 'record' then out[#out + 1] = ARGV[3] else out[#out + 1] = f[i + 1] end
end
local id = redis.call('XADD', KEYS[1], '*', unpack(out))
redis.call('XDEL', KEYS[1], ARGV[2])
if KEYS[2] and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('SET', KEYS[2], id, 'KEEPTTL')
end
return 1
"""

# KEYS: retry set; ARGV: old member, new member. Swaps a member keeping its score.
_RESET_LUA = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[1], score, ARGV[2])
return 1
"""

# KEYS: a hash of calls in progress; ARGV: field, old value, new value. Swaps a state only
# if it is still the one read (a checkpoint or the call's removal since wins).
_REHASH_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""


@dataclass(frozen=True)
class NotReencrypted:
    """A value ``rotate`` left as it was: where, its id, its record's key and why (the
    reason names key ids at most: never the value's content)."""

    place: str
    id: str
    key: str
    error: str


def _reason(exc: Exception) -> str:
    """Why a value could not be re-encrypted, without any of its content."""
    if isinstance(exc, CryptoError | OutboxError):
        return str(exc)  # key ids, a file name: no plaintext
    if isinstance(exc, UnicodeError):
        return "not UTF-8 text"
    return f"unreadable ({type(exc).__name__})"


def _reseal(crypto: KeyRing, value: str, context: str) -> str | None:
    """``value`` under the current key, or None when it already is (or stays plain)."""
    if key_id_of(value) == crypto.current:
        return None
    return crypto.seal(crypto.open(value, context), context)


async def _stream(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    out: list[tuple[str, dict[str, str]]] = []
    start = "-"
    while True:
        chunk: Any = await redis.xrange(key, min=start, max="+", count=SCAN_CHUNK)
        out += chunk
        if len(chunk) < SCAN_CHUNK:
            return out
        start = "(" + chunk[-1][0]


async def rotate(redis: Redis, keys: Keys, group: str, outbox: Outbox,
                 failed: list[NotReencrypted] | None = None) -> dict[str, int]:
    """Re-encrypt the outbox and the spool with the current key; counts per place
    (``skipped_in_flight``: entries being delivered now, to be run again later). A value
    that cannot be (its key dropped, corrupt) is left as it is and appended to
    ``failed``; the others are still done."""
    failed = [] if failed is None else failed
    crypto = outbox.crypto
    if not crypto.enabled:
        raise CryptoError("no encryption key is configured (encryption.keys): nothing to "
                          "rotate to")
    await ensure_group(redis, keys, group)
    restream = redis.register_script(_RESTREAM_LUA)
    reset = redis.register_script(_RESET_LUA)
    done: Counter[str] = Counter()
    for stream, grp, name in ((keys.outbox_stream, group, "stream"),
                              (keys.outbox_dead, "", "dead")):
        for eid, fields in await _stream(redis, stream):
            record_key = fields.get("key", "")
            try:
                new = _reseal(crypto, fields.get("record", ""), record_key)
            except (CryptoError, ValueError) as exc:
                failed.append(NotReencrypted(name, eid, record_key, _reason(exc)))
                continue
            if new is None:
                continue
            # a dead letter's new id is what its record's died marker must name (the
            # record's updates look their original up there)
            marker = [keys.outbox_died(record_key)] if name == "dead" else []
            if await restream(keys=[stream, *marker], args=[grp, eid, new]):
                done[name] += 1
            else:
                done["skipped_in_flight"] += 1
    members: Any = await redis.zrange(keys.outbox_retry, 0, -1)
    for member in members:
        try:
            fields = json.loads(member)
            if not isinstance(fields, dict):
                raise ValueError("a retry member is not a JSON object")
        except ValueError as exc:
            failed.append(NotReencrypted("retry", "(unreadable member)", "", _reason(exc)))
            continue
        record_key = str(fields.get("key", ""))
        try:
            new = _reseal(crypto, str(fields.get("record", "")), record_key)
        except (CryptoError, ValueError) as exc:
            failed.append(NotReencrypted("retry", record_key, record_key, _reason(exc)))
            continue
        if new is None:
            continue
        fresh = json.dumps({**fields, "record": new}, separators=(",", ":"))
        if await reset(keys=[keys.outbox_retry], args=[member, fresh]):
            done["retry"] += 1
    spool = outbox.spool
    for path in await asyncio.to_thread(spool.files):
        try:
            if await asyncio.to_thread(spool.rewrite, path):
                done["spool"] += 1
        except (CryptoError, OutboxError, ValueError) as exc:
            failed.append(NotReencrypted("spool", path.name, "", _reason(exc)))
    done["parked"] += await _rotate_parked(redis, keys, crypto, failed)
    return {name: n for name, n in done.items() if n}


async def _rotate_parked(redis: Redis, keys: Keys, crypto: KeyRing,
                         failed: list[NotReencrypted]) -> int:
    """Re-seal the saved states of calls in progress (``ami.parking``: one hash per
    Asterisk, each state sealed for its hash and field); a state changed or removed
    meanwhile is left to its run. Returns how many were re-sealed."""
    rehash = redis.register_script(_REHASH_LUA)
    count = 0
    async for key in redis.scan_iter(match=keys.parked_calls("*"), count=SCAN_CHUNK):
        cursor = 0
        while True:
            # undecoded: a value that is no text is one failure, not the end of the run
            cursor, chunk = await redis.execute_command(  # type: ignore[no-untyped-call]
                "HSCAN", key, cursor, "COUNT", SCAN_CHUNK, **{NEVER_DECODE: True})
            for raw_field, raw in chunk.items():
                field = raw_field.decode(errors="replace")
                try:
                    value = raw.decode()
                    new = _reseal(crypto, value, f"{key}:{field}")
                except (CryptoError, ValueError) as exc:
                    failed.append(NotReencrypted("parked", field, "", _reason(exc)))
                    continue
                if new is not None and await rehash(keys=[key], args=[raw_field, value, new]):
                    count += 1
            if not int(cursor):
                break
    return count


async def status(redis: Redis, keys: Keys, outbox: Outbox) -> dict[str, dict[str, int]]:
    """Values per key id (``(plain)``: not encrypted) in each place."""
    places: dict[str, Counter[str]] = {}
    for name, stream in (("stream", keys.outbox_stream), ("dead", keys.outbox_dead),
                         ("sent", keys.outbox_sent)):
        places[name] = Counter(key_id_of(f.get("record", "")) or PLAIN
                               for _, f in await _stream(redis, stream))
    members: Any = await redis.zrange(keys.outbox_retry, 0, -1)
    places["retry"] = Counter(_retry_key_id(m) for m in members)
    spool = outbox.spool
    spooled: Counter[str] = Counter()
    for path in await asyncio.to_thread(spool.files):
        try:
            raw = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            continue
        spooled[key_id_of(raw) or PLAIN] += 1
    places["spool"] = spooled
    cached: Counter[str] = Counter()
    async for key in redis.scan_iter(match=keys.customer_by_hash("*"), count=SCAN_CHUNK):
        value = await redis.get(key)
        if value is not None:
            cached[key_id_of(value) or PLAIN] += 1
    places["cache"] = cached
    parked: Counter[str] = Counter()
    async for key in redis.scan_iter(match=keys.parked_calls("*"), count=SCAN_CHUNK):
        # undecoded: a value that is no text is counted unreadable, not a traceback
        values: Any = await redis.execute_command(  # type: ignore[no-untyped-call]
            "HVALS", key, **{NEVER_DECODE: True})
        parked.update(_parked_key_id(v) for v in values)
    places["parked"] = parked
    return {name: dict(c) for name, c in places.items()}


def _parked_key_id(value: bytes) -> str:
    """The key id of a call's saved state (PLAIN, or UNREADABLE when it is no text)."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return UNREADABLE
    return key_id_of(text) or PLAIN


def _retry_key_id(member: str) -> str:
    """The key id of a retry member's record (PLAIN, or UNREADABLE for a bad member)."""
    try:
        fields = json.loads(member)
        record = fields.get("record", "") if isinstance(fields, dict) else None
    except ValueError:
        record = None
    if not isinstance(record, str):
        return UNREADABLE
    return key_id_of(record) or PLAIN


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``keys generate|status|rotate`` to the ``callroute`` parser."""
    parser = subparsers.add_parser("keys", help="encryption keys at rest")
    sub = parser.add_subparsers(dest="keys_command", required=True)
    p = sub.add_parser("generate", help="print a new key line for encryption.keys")
    p.add_argument("--id", help="the key id (default: k + 8 random hex digits)")
    config_option(p)
    p.set_defaults(security_handler=_generate)
    for name, what in (("status", "which key each stored value uses"),
                       ("rotate", "re-encrypt the outbox, the spool and the saved "
                                  "states of calls in progress with the current key")):
        p = sub.add_parser(name, help=what, description=what,
                           epilog=ROTATE_EPILOG if name == "rotate" else None)
        config_option(p)
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(security_handler=_run(name))


def _generate(_settings: Settings, args: argparse.Namespace) -> int:
    print(generate_key_line(args.id))
    return 0


def _run(name: str) -> Any:
    def handler(settings: Settings, args: argparse.Namespace) -> int:
        async def main() -> int:
            failed: list[NotReencrypted] = []
            redis = connect_redis(settings)
            outbox = Outbox.from_settings(settings, redis)
            keys = keys_from_settings(settings)
            try:
                if name == "status":
                    data: Any = await status(redis, keys, outbox)
                    ring = keyring_from_settings(settings)
                    data = {"current": ring.current, "configured": ring.key_ids, **data}
                else:
                    data = await rotate(redis, keys, settings.outbox.group, outbox, failed)
                    who, role, source = cli_actor()
                    audit = audit_from_settings(settings, redis)
                    await audit.write(AuditEntry(
                        who=who, role=role, action="keys.rotate",
                        target=f"key:{outbox.crypto.current}", source=source,
                        after=state_hash(data)))
            except CryptoError as exc:
                print(f"callroute keys: {exc}")
                return 1
            except (RedisError, OSError, ResponseError) as exc:
                print(f"callroute keys: Redis unavailable at {mask_url(settings.redis.url)}: "
                      f"{exc}")
                return 2
            finally:
                await redis.aclose()
            if args.json:
                if failed:  # what rotate left as it was, beside its counts
                    data = {**data, "not_reencrypted": [asdict(f) for f in failed]}
                print(json.dumps(data, indent=2))
            elif name == "status":
                print(f"current key: {data.pop('current') or '(none: encryption is off)'}")
                print(f"configured:  {', '.join(data.pop('configured')) or '-'}")
                for place, counts in data.items():
                    shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "empty"
                    print(f"{place:<7} {shown}")
            else:
                print("re-encrypted: " + (", ".join(f"{k} {v}" for k, v in sorted(data.items()))
                                          or "nothing (all under the current key)"))
                if failed:
                    print(f"could not re-encrypt {len(failed)} value(s), left as they are:")
                    for f in failed:
                        record = f" (record {f.key})" if f.key and f.key != f.id else ""
                        print(f"  {f.place} {f.id}{record}: {f.error}")
            return EXIT_NOT_REENCRYPTED if failed else 0

        return asyncio.run(main())

    return handler
