"""Encryption at rest with real Redis: the key ring, the cache, the outbox and spool,
rotation, and a whole Redis dump and spool searched for plaintext numbers and names."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from router.crm.auth import Token, TokenStore
from router.crypto import KeyRing, generate_key_line, key_id_of
from router.errors import ConfigError, CryptoError
from router.keys import Keys
from router.lookup.cache import CacheEntry, TwoLevelCache, redis_client
from router.models import Customer
from router.records import keys_cli
from router.records.updates import original_state
from router.settings import CacheSettings, RedisSettings
from tests.redis_server import RedisServer
from tests.router.records.outbox_crm import (  # noqa: F401  (fixtures)
    FakeCrm,
    Harness,
    call_record,
    crm_fixture,
    harness_fixture,
    wait_until,
)

K1 = "k1:" + base64.b64encode(b"1" * 32).decode()
K2 = "k2:" + base64.b64encode(b"2" * 32).decode()
KEYS = Keys(prefix="t:", secret=b"s")
LI_LEI = Customer(id="C-1001", name="Li Lei", tier="gold", owner="7001")
NUMBER = "+8613800138000"
#: The CRM's OAuth2 access and (rotated) refresh token, shared through Redis.
ACCESS_TOKEN, REFRESH_TOKEN = "pat-access-7f3a91c2", "pat-refresh-0b8e44d1"
#: Every form of the fixtures' numbers and names, and the CRM's tokens, that a dump must
#: not show.
PLAINTEXT = [b"13800138000", b"13900139000", b"Li Lei", b"Han Meimei",
             "李雷".encode(), b"\xe6\x9d\x8e", ACCESS_TOKEN.encode(), REFRESH_TOKEN.encode()]


def ring(*lines: str) -> KeyRing:
    return KeyRing.parse(",".join(lines))


# --- the key ring --------------------------------------------------------------------------
def test_seal_and_open_round_trip_bound_to_their_context() -> None:
    """A sealed value names its key, hides the plaintext, opens back only under the same
    context; tampering or an unknown key is a CryptoError; plain values pass through."""
    r = ring(K1)
    sealed = r.seal('{"caller": "+8613800138000"}', "call-1")
    assert sealed.startswith("enc1:k1:")
    assert "13800138000" not in sealed
    assert r.open(sealed, "call-1") == '{"caller": "+8613800138000"}'
    assert r.seal("x", "c") != r.seal("x", "c")  # a fresh nonce each time
    with pytest.raises(CryptoError, match="does not decrypt"):
        r.open(sealed, "call-2")
    prefix, body = sealed.rsplit(":", 1)
    blob = bytearray(base64.urlsafe_b64decode(body))
    blob[len(blob) // 2] ^= 0x01  # one bit of the ciphertext flipped
    tampered = f"{prefix}:{base64.urlsafe_b64encode(bytes(blob)).decode()}"
    with pytest.raises(CryptoError):
        r.open(tampered, "call-1")
    with pytest.raises(CryptoError, match="not configured"):
        ring(K2).open(sealed, "call-1")
    assert r.open('{"plain": 1}', "call-1") == '{"plain": 1}'
    assert r.open_bytes(r.seal_bytes(b"abc", b"key"), b"key") == b"abc"


def test_rotation_writes_with_the_first_key_and_reads_with_all() -> None:
    """With [k2, k1], new values are under k2 and values under k1 still open; an empty
    ring is off and leaves values plain."""
    old = ring(K1).seal("v", "c")
    both = ring(K2, K1)
    assert both.current == "k2"
    assert key_id_of(both.seal("v", "c")) == "k2"
    assert both.open(old, "c") == "v"
    off = KeyRing()
    assert not off.enabled
    assert off.seal("v", "c") == "v"


@pytest.mark.parametrize(("text", "message"), [
    ("k1", "<id>:<base64"), ("k1:not base64!", "not base64"),
    ("k1:" + base64.b64encode(b"short").decode(), "32"), (f"{K1},{K1}", "twice"),
    ("bad id!:" + base64.b64encode(b"1" * 32).decode(), "letters"),
])
def test_bad_key_lines_are_config_errors(text: str, message: str) -> None:
    """Malformed key lists are refused with what is wrong (never echoing the key)."""
    with pytest.raises(ConfigError, match=message):
        KeyRing.parse(text)


def test_generated_keys_parse() -> None:
    """`keys generate` lines are valid 256-bit keys with the id asked for."""
    line = generate_key_line("k9")
    assert line.startswith("k9:")
    assert ring(line).current == "k9"
    assert generate_key_line() != generate_key_line()


# --- the cache -----------------------------------------------------------------------------
@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A cache client of the flushed test Redis."""
    c = redis_client(RedisSettings(url=redis_url))
    yield c
    await c.aclose()


async def test_cache_values_are_encrypted_and_read_back(
        client: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """A cached customer is stored encrypted (no name in the value), read back from
    Redis by another instance with the same keys, and by one that rotated to a new key;
    one without the key reads a miss (counted corrupt, logged with the reason), never
    garbage."""
    writer = TwoLevelCache(client, KEYS, CacheSettings(), crypto=ring(K1))
    await writer.put(NUMBER, CacheEntry(LI_LEI, time.time()))
    raw = await client.get(KEYS.customer(NUMBER))
    assert raw is not None
    assert raw.startswith(b"enc1:k1:")
    assert b"Li Lei" not in raw
    for keys in ((K1,), (K2, K1)):
        reader = TwoLevelCache(client, KEYS, CacheSettings(), crypto=ring(*keys))
        ok, entry = await reader.get_shared(NUMBER)
        assert ok
        assert entry is not None
        assert entry.customer == LI_LEI
    ok, entry = await TwoLevelCache(client, KEYS, CacheSettings(),
                                    crypto=ring(K2)).get_shared(NUMBER)
    assert (ok, entry) == (True, None)
    assert "encrypted with key 'k1', which is not configured" in caplog.text
    rotated = TwoLevelCache(client, KEYS, CacheSettings(), crypto=ring(K2, K1))
    await rotated.put(NUMBER, CacheEntry(LI_LEI, time.time()))
    assert key_id_of(await client.get(KEYS.customer(NUMBER)) or b"") == "k2"


async def test_a_value_moved_to_another_number_does_not_decrypt(client: aioredis.Redis) -> None:
    """The cache key is the associated data: a value copied under another number's key
    is not served as that number's customer."""
    cache = TwoLevelCache(client, KEYS, CacheSettings(), crypto=ring(K1))
    await cache.put(NUMBER, CacheEntry(LI_LEI, time.time()))
    raw = await client.get(KEYS.customer(NUMBER))
    assert raw is not None
    await client.set(KEYS.customer("+8613900139000"), raw)
    assert await cache.get_shared("+8613900139000") == (True, None)


# --- the outbox, the spool, delivery and rotation --------------------------------------------
async def test_outbox_and_spool_are_encrypted_and_delivered(
        redis_url: str, crm: FakeCrm, tmp_path: Path, own_redis: RedisServer) -> None:
    """An enqueued record is stored encrypted in the stream; one spooled while Redis is
    down is an encrypted file; both are delivered to the CRM in clear."""
    h = Harness(redis_url, crm, tmp_path / "spool")
    h.outbox.crypto = h.spool.crypto = ring(K1)
    try:
        await h.outbox.enqueue(call_record(1, caller_name="Li Lei"))
        [(_, fields)] = await h.redis.xrange(h.keys.outbox_stream)
        assert fields["record"].startswith("enc1:k1:")
        assert "13800138000" not in fields["record"]
        down = Harness(own_redis.url, crm, tmp_path / "spool")
        down.outbox.crypto = down.spool.crypto = ring(K1)
        own_redis.stop()
        assert await down.outbox.enqueue(call_record(2)) == "spooled"
        await down.close()
        [path] = h.spool.files()
        assert path.read_bytes().startswith(b"enc1:k1:")
        assert b"13800138000" not in path.read_bytes()
        assert await h.outbox.drain_spool() == 1
        worker = h.worker()
        worker.crypto = ring(K1)
        h.tasks.append(asyncio.create_task(worker.run(h.stop, grace_s=1.0)))
        await wait_until(lambda: len([r for r in crm.received if r.kind == "call"]) == 2)
        bodies = json.dumps([r.body for r in crm.received])
        assert "+8613800138000" in bodies
    finally:
        await h.close()


async def test_a_record_under_an_unknown_key_is_dead_lettered_not_lost(
        h: Harness, crm: FakeCrm) -> None:
    """A worker without the record's key dead-letters it as `undecryptable` (kept for
    `outbox retry` once the key is configured) instead of posting garbage."""
    h.outbox.crypto = ring(K1)
    await h.outbox.enqueue(call_record(1))
    worker = h.worker()
    worker.crypto = ring(K2)
    h.tasks.append(asyncio.create_task(worker.run(h.stop, grace_s=1.0)))
    await wait_until(lambda: worker.stats["dead"] == 1)
    [(_, dead)] = await h.redis.xrange(h.keys.outbox_dead)
    assert dead["reason"] == "undecryptable"
    assert crm.received == []


async def test_keys_rotate_reencrypts_the_outbox_and_the_spool(h: Harness, crm: FakeCrm) -> None:
    """After adding k2 in front of k1, `keys rotate` moves stream entries, retries, dead
    letters and spool files to k2 (status shows none left under k1 there), and the
    records are still delivered once each."""
    old = ring(K1)
    h.outbox.crypto = h.spool.crypto = old
    for n in range(3):
        await h.outbox.enqueue(call_record(n))
    h.spool.put("call-9", call_record(9))
    sealed = old.seal(json.dumps(call_record(7)), "call-7")
    await h.redis.xadd(h.keys.outbox_dead, {"key": "call-7", "record": sealed, "attempt": "3",
                                            "enq": "1", "error": "x", "reason": "gone"})
    member = json.dumps({"key": "call-8", "record": old.seal(json.dumps(call_record(8)),
                                                             "call-8"),
                         "attempt": "1", "enq": "1", "error": ""})
    await h.redis.zadd(h.keys.outbox_retry, {member: time.time() * 1000 + 3_600_000})
    new = ring(K2, K1)
    h.outbox.crypto = h.spool.crypto = new
    done = await keys_cli.rotate(h.redis, h.keys, h.settings.group, h.outbox)
    assert done == {"stream": 3, "dead": 1, "retry": 1, "spool": 1}
    await h.redis.hset(h.keys.parked_calls("pbx:5038"), "1.1", old.seal("{}", "x"))
    status = await keys_cli.status(h.redis, h.keys, h.outbox)
    for place in ("stream", "dead", "retry", "spool"):
        assert set(status[place]) == {"k2"}, (place, status)
    assert status["parked"] == {"k1": 1}  # a call's state: rewritten as the call goes
    assert await keys_cli.rotate(h.redis, h.keys, h.settings.group, h.outbox) == {}
    await h.outbox.drain_spool()
    worker = h.worker()
    worker.crypto = ring(K2)  # only the new key: everything must be under it
    h.tasks.append(asyncio.create_task(worker.run(h.stop, grace_s=1.0)))
    await wait_until(lambda: len([r for r in crm.received if r.kind == "call"]) == 4)
    assert sorted(r.key for r in crm.received if r.kind == "call") == \
        ["call-0", "call-1", "call-2", "call-9"]


async def test_keys_rotate_reencrypts_the_states_of_calls_in_progress(
        h: Harness, redis_url: str) -> None:
    """The saved states of calls in progress (ami.parking: a call up for hours, one
    parked at a stop, one a killed run left) are re-sealed with the current key, for
    their hash and field, so the old key can go: a run with only the new key reads them.
    One that does not open (or is no text) is listed, left as it is; status counts it."""
    from ami.parking import CallParking
    from ami.tracker import CallTracker

    old, new = ring(K1), ring(K2, K1)
    parking = CallParking(h.redis, h.keys, "pbx:5038", CallTracker(lambda _r: None), old)
    state = {"v": 1, "linkedid": "1.1", "caller_num": "13800138000"}
    await h.redis.hset(h.keys.parked_calls("pbx:5038"), mapping={
        "1.1": parking.seal("1.1", state), "2.2": old.seal("{}", "elsewhere")})
    await h.redis.hset(h.keys.parked_calls("pbx2:5038"), "3.3",
                       old.seal('{"v":1}', h.keys.parked_calls("pbx2:5038") + ":3.3"))
    h.outbox.crypto = new
    failed: list[keys_cli.NotReencrypted] = []
    assert await keys_cli.rotate(h.redis, h.keys, h.settings.group, h.outbox,
                                 failed) == {"parked": 2}
    assert [(f.place, f.id) for f in failed] == [("parked", "2.2")]
    status = await keys_cli.status(h.redis, h.keys, h.outbox)
    assert status["parked"] == {"k2": 2, "k1": 1}
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await raw.hset(h.keys.parked_calls("pbx:5038"), "4.4", b"\xff\xfe no text")
    finally:
        await raw.aclose()
    failed.clear()
    assert await keys_cli.rotate(h.redis, h.keys, h.settings.group, h.outbox, failed) == {}
    assert sorted((f.place, f.id) for f in failed) == [("parked", "2.2"), ("parked", "4.4")]
    status = await keys_cli.status(h.redis, h.keys, h.outbox)
    assert status["parked"] == {"k2": 2, "k1": 1, keys_cli.UNREADABLE: 1}
    parking.crypto = ring(K2)
    saved = await h.redis.hget(h.keys.parked_calls("pbx:5038"), "1.1")
    assert saved is not None
    assert parking.open("1.1", saved) == state


async def test_rotate_leaves_entries_being_delivered_alone(h: Harness) -> None:
    """An entry a worker holds (pending) is not rewritten under its feet: counted as
    skipped, left as it was."""
    h.outbox.crypto = ring(K1)
    await h.outbox.enqueue(call_record(1))
    from router.records.outbox import ensure_group

    await ensure_group(h.redis, h.keys, h.settings.group)
    await h.redis.xreadgroup(h.settings.group, "w", {h.keys.outbox_stream: ">"}, count=1)
    h.outbox.crypto = ring(K2, K1)
    assert await keys_cli.rotate(h.redis, h.keys, h.settings.group, h.outbox) == \
        {"skipped_in_flight": 1}
    [(_, fields)] = await h.redis.xrange(h.keys.outbox_stream)
    assert key_id_of(fields["record"]) == "k1"


async def test_a_rotated_dead_letter_is_still_its_record_s_dead_letter(
        h: Harness, crm: FakeCrm) -> None:
    """Rotation re-adds a dead letter under a new stream id; the record's `outbox:died`
    marker follows it, so an update of the record still sees its original dead (and is
    dead-lettered with it as original_dead) instead of waiting for it."""
    h.outbox.crypto = h.spool.crypto = ring(K1)
    crm.kind_faults["call"] = [400]
    await h.outbox.enqueue(call_record(1))
    worker = h.worker()
    worker.crypto = ring(K1)
    h.tasks.append(asyncio.create_task(worker.run(h.stop, grace_s=1.0)))
    await wait_until(lambda: worker.stats["dead"] == 1)
    await h.stop_workers()
    assert await original_state(h.redis, h.keys, "call-1") == "dead"
    h.outbox.crypto = h.spool.crypto = ring(K2, K1)
    assert await keys_cli.rotate(h.redis, h.keys, h.settings.group, h.outbox) == {"dead": 1}
    [(dead_id, fields)] = await h.redis.xrange(h.keys.outbox_dead)
    assert key_id_of(fields["record"]) == "k2"
    assert await h.redis.get(h.keys.outbox_died("call-1")) == dead_id
    assert await original_state(h.redis, h.keys, "call-1") == "dead"


async def test_rotate_without_a_key_is_refused(h: Harness) -> None:
    """With encryption off there is nothing to rotate to: a clear CryptoError."""
    with pytest.raises(CryptoError, match="no encryption key"):
        await keys_cli.rotate(h.redis, h.keys, h.settings.group, h.outbox)


# --- the proof: a whole Redis dump and the spool, searched -------------------------------------
async def _fill(server: RedisServer, spool_dir: Path, crm: FakeCrm, crypto: KeyRing) -> None:
    """Customers cached, the CRM's OAuth2 tokens shared, call records in the outbox
    (stream, retry, dead, sent) and in the spool, as the service would leave them."""
    client = redis_client(RedisSettings(url=server.url))
    cache = TwoLevelCache(client, KEYS, CacheSettings(), crypto=crypto)
    await cache.put(NUMBER, CacheEntry(LI_LEI, time.time()))
    await cache.put("+8613900139000", CacheEntry(Customer(id="C-1002", name="Han Meimei",
                                                          tags=("vip",)), time.time()))
    await cache.put("+8613900139001", CacheEntry(Customer(id="C-9", name="李雷"), time.time()))
    store = TokenStore(client, KEYS, "crm", crypto)
    await store.save(Token(ACCESS_TOKEN, time.time() + 3600), REFRESH_TOKEN, time.time())
    assert await store.load() == (Token(ACCESS_TOKEN, pytest.approx(time.time() + 3600, abs=5)),
                                  REFRESH_TOKEN)
    await _fill_parked(client, crypto)
    await cache.aclose()
    h = Harness(server.url, crm, spool_dir)
    h.outbox.crypto = h.spool.crypto = crypto
    try:
        records = [call_record(n, caller_name="Li Lei", caller_raw="13800138000")
                   for n in range(4)]
        for record in records:
            await h.outbox.enqueue(record)
        h.spool.put("call-s", call_record("s", caller="+8613900139000",
                                          caller_name="Han Meimei"))
        crm.kind_faults["call"] = [500]  # one retry, then delivered (kept in outbox:sent)
        worker = h.worker(max_attempts=1)
        worker.crypto = crypto
        h.tasks.append(asyncio.create_task(worker.run(h.stop, grace_s=1.0)))
        await wait_until(lambda: worker.stats["delivered"] + worker.stats["dead"] >= 4)
        await h.stop_workers()
        await h.outbox.enqueue(call_record(5, caller_name="Li Lei"))  # left waiting
        await h.redis.zadd(h.keys.outbox_retry, {json.dumps({
            "key": "call-r", "record": crypto.seal(json.dumps(call_record("r")), "call-r"),
            "attempt": "1", "enq": "1", "error": ""}): 1})
        await _fill_pages(h, crypto)
    finally:
        await h.close()


async def _fill_parked(client: Any, crypto: KeyRing) -> None:
    """A call in progress checkpointed for a restart (ami.parking): its caller's number
    and name are in its saved state."""
    from ami.parking import CallParking
    from ami.protocol import Message
    from ami.tracker import CallTracker

    tracker = CallTracker(lambda _record: None)
    tracker.handle(Message({"Event": "Newchannel", "Uniqueid": "1.1", "Linkedid": "1.1",
                            "Channel": "PJSIP/trunk-1", "CallerIDNum": "13800138000",
                            "CallerIDName": "Li Lei", "Exten": "4008001000"}))
    parking = CallParking(client, KEYS, "pbx:5038", tracker, crypto)
    await parking.tick()
    assert await client.hlen(KEYS.parked_calls("pbx:5038")) == 1


async def _fill_pages(h: Harness, crypto: KeyRing) -> None:
    """What the pages keep: the history's rows and last calls (known and unknown
    callers), a record held for a disposition, an early disposition, a sent record kept
    for a late one and a late one given, the agent's calls awaiting a disposition (the
    card's name masked: 李*)."""
    from router.web.history import History
    from router.web.pending import Pending
    from router.web.wrapup import Wrapup

    history = History(h.redis, h.keys, crypto=crypto)
    pending = Pending(h.redis, h.keys, hold_s=60, late_s=3600, crypto=crypto,
                      name_of=lambda _lid, _agent: "李雷")
    wrap = Wrapup(h.redis, h.keys, h.outbox.enqueue, 60, filed=history.add, crypto=crypto,
                  late_s=3600, redisposed=history.redispose, pending=pending)
    note = "李雷 asked for Han Meimei"
    await wrap.mark_online(["1001"])
    assert await wrap.put(call_record("w1", caller_name="Li Lei")) == "held"
    assert await wrap.dispose("call-w2", "1001", "sale", note, rung=True) == "saved"  # early
    await wrap.mark_offline("1001")
    for n, customer in (("w3", "C1"), ("w4", None)):
        assert await wrap.put(call_record(n, caller_name="Han Meimei", customer_id=customer,
                                          start="2026-11-22T01:10:00+00:00")) == "enqueued"
    assert await wrap.dispose("call-w3", "1001", "sale", note) == "updated"
    assert await h.redis.exists(h.keys.web_sent("call-w4"),
                                h.keys.web_hold("call-w1"),
                                h.keys.web_disposition("call-w2", "1001"),
                                h.keys.web_day_calls("2026-11-22"),
                                h.keys.web_day_dispositions("2026-11-22"),
                                h.keys.web_todo_rows("1001")) == 6
    assert [r["name"] for r in await pending.calls("1001")] == ["李*", "李*"]


async def _dump(server: RedisServer, match: str = "*") -> bytes:
    """Every key's DUMP and the RDB file of a SAVE, uncompressed (so a plaintext would show);
    with ``match``, only the DUMPs of the keys it matches."""
    client = aioredis.Redis.from_url(server.url)
    try:
        await client.config_set("rdbcompression", "no")
        dumps = [await client.dump(key) or b""
                 async for key in client.scan_iter(match=match, count=1000)]
        if match != "*":
            return b"".join(dumps)
        await client.save()
    finally:
        await client.aclose()
    return b"".join(dumps) + (server.dir / "dump.rdb").read_bytes()


@pytest.mark.parametrize("encrypted", [True, False], ids=["encrypted", "control-plain"])
async def test_no_plaintext_in_a_redis_dump_or_the_spool(
        own_redis: RedisServer, crm: FakeCrm, tmp_path: Path, encrypted: bool) -> None:
    """With a key configured, neither a dump of every Redis key (the pages' history,
    held records and dispositions included, and the CRM's OAuth2 tokens) nor the RDB
    file nor the spool files hold a fixture number or name, or a token, in clear (and
    the tokens read back). The control run without a key finds them, in the pages' keys
    too, so the search itself works."""
    spool_dir = tmp_path / "spool"
    await _fill(own_redis, spool_dir, crm, ring(K1) if encrypted else KeyRing())
    found: dict[str, Any] = {}
    pages = await _dump(own_redis, "t:web:*")
    assert pages
    dump = await _dump(own_redis)
    spool = b"".join(p.read_bytes() for p in spool_dir.rglob("*") if p.is_file())
    assert spool
    for needle in PLAINTEXT:
        if needle in dump:
            found.setdefault("redis", []).append(needle)
        if needle in spool:
            found.setdefault("spool", []).append(needle)
    in_pages = [needle for needle in PLAINTEXT if needle in pages]
    if encrypted:
        assert found == {}
        assert in_pages == []
        assert b"enc1:k1:" in dump
    else:
        assert {b"13800138000", b"Han Meimei", "李雷".encode()} <= set(in_pages)
        assert b"13800138000" in found["redis"]
        assert b"Li Lei" in found["redis"]
        assert b"Han Meimei" in found["spool"]
        assert {ACCESS_TOKEN.encode(), REFRESH_TOKEN.encode()} <= set(found["redis"])
