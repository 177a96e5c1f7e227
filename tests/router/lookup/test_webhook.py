"""callroute's own CRM webhook scheme: signature, replay and timestamp checks, invalidate
vs replace (the vendors' schemes: tests/router/crm/test_webhooks.py)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.crm.webhooks import WebhookReceiver, callroute_webhook, sign
from router.lookup.cache import CacheEntry, TwoLevelCache, decode_entry, redis_client
from router.lookup.webhook import PATH, WebhookEndpoint, add_webhook_routes
from router.metrics import REGISTRY
from router.models import Customer
from router.settings import AdminSettings, CacheSettings, RedisSettings, Settings
from tests.redis_server import RedisServer
from tests.router.lookup.cache_crm import KEYS

SECRET = "s3cret-for-tests"
ALICE = "+8613800138000"
ALICE_2 = "+8613800138001"
BOB = "+8613900139000"

pytestmark = pytest.mark.usefixtures("no_gc")


def outcomes(outcome: str) -> float:
    """callroute_webhooks{outcome}."""
    return REGISTRY.get_sample_value("callroute_webhooks_total", {"outcome": outcome}) or 0.0


def settings(secret: str = SECRET) -> Settings:
    """Settings with the webhook secret and a 300 s tolerance."""
    return Settings(admin=AdminSettings(webhook_secret=secret, webhook_tolerance_s=300))


async def serve(cache: TwoLevelCache, cfg: Settings) -> TestClient[web.Request, web.Application]:
    """A real aiohttp server on loopback with the webhook mounted, and a client for it."""
    app = web.Application()
    admin = cfg.admin
    if admin.webhook_secret:
        receiver = WebhookReceiver(callroute_webhook(
            admin.webhook_secret, admin.webhook_tolerance_s, admin.webhook_max_bytes))
        add_webhook_routes(app, cache, [receiver], cfg.phone.default_region)
    else:
        endpoint = WebhookEndpoint(cache, None, cfg.phone.default_region)
        app.router.add_post(PATH, endpoint.handler())
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


@pytest.fixture
async def cache(redis: aioredis.Redis) -> TwoLevelCache:
    """A cache over the flushed test Redis, holding Alice (2 numbers) and Bob."""
    c = TwoLevelCache(redis, KEYS, CacheSettings())
    alice = Customer(id="C1", name="Alice")
    now = time.time()
    await c.put(ALICE, CacheEntry(alice, now))
    await c.put(ALICE_2, CacheEntry(alice, now))
    await c.put(BOB, CacheEntry(Customer(id="C2", name="Bob"), now))
    return c


@pytest.fixture
async def client(cache: TwoLevelCache) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A client of the webhook server."""
    c = await serve(cache, settings())
    yield c
    await c.close()


def signed(payload: Any, *, secret: str = SECRET, ts: int | None = None,
           raw: bytes | None = None) -> tuple[bytes, dict[str, str]]:
    """Body and headers of a webhook signed like a CRM would."""
    body = raw if raw is not None else json.dumps(payload).encode()
    stamp = str(ts if ts is not None else int(time.time()))
    return body, {"X-Callroute-Timestamp": stamp,
                  "X-Callroute-Signature": sign(secret, stamp, body),
                  "Content-Type": "application/json"}


UPDATE = {"event": "customer.updated", "customer_id": "C1", "numbers": ["13800138000"]}


async def test_signature_matches_the_documented_scheme() -> None:
    """sign() is HMAC-SHA256 over '<timestamp>.<body>' in hex with a sha256= prefix."""
    import hashlib
    import hmac
    body = b'{"a":1}'
    want = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", 1700000000, body) == f"sha256={want}"


async def test_valid_invalidate_drops_numbers_and_customer_index(
    client: TestClient[web.Request, web.Application], cache: TwoLevelCache, redis: aioredis.Redis
) -> None:
    """A valid customer.updated without a record drops every number of that customer (by
    the index, even numbers not listed) in Redis and the LRU; Bob is untouched."""
    before = outcomes("ok")
    body, headers = signed(UPDATE)
    resp = await client.post(PATH, data=body, headers=headers)
    assert resp.status == 200
    assert (await resp.json())["invalidated"] == 2
    keys = {k.decode() async for k in redis.scan_iter(match="callroute:cust*")}
    assert keys == {KEYS.customer(BOB), KEYS.customer_index("C2")}
    assert cache.lru.get(ALICE) is None
    assert cache.lru.get(ALICE_2) is None
    assert cache.lru.get(BOB) is not None
    assert outcomes("ok") == before + 1


async def test_valid_replace_writes_the_new_record(
    client: TestClient[web.Request, web.Application], cache: TwoLevelCache, redis: aioredis.Redis
) -> None:
    """customer.updated with a record replaces the entry: the listed numbers carry the new
    record (fresh), numbers no longer listed are dropped, the index is rebuilt."""
    payload = {**UPDATE, "customer": {"id": "C1", "name": "Alice Smith", "tier": "platinum"}}
    body, headers = signed(payload)
    resp = await client.post(PATH, data=body, headers=headers)
    assert resp.status == 200
    assert (await resp.json())["replaced"] == 1
    raw = await redis.get(KEYS.customer(ALICE))
    assert raw is not None
    entry = decode_entry(raw)
    assert entry is not None
    assert entry.customer == Customer(id="C1", name="Alice Smith", tier="platinum")
    assert time.time() - entry.fetched_at < 5
    assert await redis.exists(KEYS.customer(ALICE_2)) == 0
    assert await redis.smembers(KEYS.customer_index("C1")) == {KEYS.number_hash(ALICE).encode()}
    slot = cache.lru.get(ALICE)
    assert slot is not None
    assert slot[0].customer is not None
    assert slot[0].customer.name == "Alice Smith"


async def test_deleted_invalidates(
    client: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    """customer.deleted drops the customer's entries even when a record is attached."""
    payload = {"event": "customer.deleted", "customer_id": "C2", "numbers": [BOB],
               "customer": {"id": "C2", "name": "Bob"}}
    body, headers = signed(payload)
    resp = await client.post(PATH, data=body, headers=headers)
    assert resp.status == 200
    assert await redis.exists(KEYS.customer(BOB), KEYS.customer_index("C2")) == 0
    assert await redis.exists(KEYS.customer(ALICE)) == 1


async def test_bad_signature_is_401_and_changes_nothing(
    client: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    """Wrong secret, tampered body or missing headers: 401, nothing invalidated."""
    before = outcomes("bad_signature")
    body, headers = signed(UPDATE, secret="wrong")
    assert (await client.post(PATH, data=body, headers=headers)).status == 401
    body, headers = signed(UPDATE)
    tampered = body.replace(b"C1", b"C2")
    assert (await client.post(PATH, data=tampered, headers=headers)).status == 401
    assert (await client.post(PATH, data=body)).status == 401
    assert outcomes("bad_signature") == before + 3
    assert await redis.exists(KEYS.customer(ALICE)) == 1


async def test_replay_is_409(
    client: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    """The same signed request twice: the second is refused as a replay, with the
    signature remembered under the webhook nonce prefix with a TTL."""
    body, headers = signed(UPDATE)
    assert (await client.post(PATH, data=body, headers=headers)).status == 200
    before = outcomes("replay")
    resp = await client.post(PATH, data=body, headers=headers)
    assert resp.status == 409
    assert outcomes("replay") == before + 1
    nonces = [k async for k in redis.scan_iter(match=KEYS.webhook_nonces + "*")]
    assert len(nonces) == 1
    assert 0 < await redis.ttl(nonces[0]) <= 601


async def test_stale_timestamp_is_401(
    client: TestClient[web.Request, web.Application], redis: aioredis.Redis
) -> None:
    """A correctly signed request from 301 s ago (tolerance 300) or the future: 401."""
    before = outcomes("stale")
    for ts in (int(time.time()) - 301, int(time.time()) + 400):
        body, headers = signed(UPDATE, ts=ts)
        assert (await client.post(PATH, data=body, headers=headers)).status == 401
    assert outcomes("stale") == before + 2
    assert await redis.exists(KEYS.customer(ALICE)) == 1


async def test_bad_json_and_bad_shape_are_400(
    client: TestClient[web.Request, web.Application],
) -> None:
    """Signed garbage is 400 bad_json; an unknown event, a missing customer_id or a record
    for another customer id is 400 bad_shape naming the path."""
    cases = [
        (b"{not json", "bad_json", "not JSON"),
        (b'{"event": "customer.merged", "customer_id": "C1"}', "bad_shape",
         "(body).event: unknown event 'customer.merged'"),
        (b'{"event": "customer.updated"}', "bad_shape", "(body).customer_id: missing"),
        (b'{"event": "customer.updated", "customer_id": "C1", "customer": {"id": "C9"}}',
         "bad_shape", "(body).customer_id: 'C1' differs from the record's id 'C9'"),
        (b'{"event": "customer.updated", "customer_id": "C1", "customer": {"name": "x"}}',
         "bad_shape", "(body).customer.id: Field required"),
    ]
    for raw, error, detail in cases:
        body, headers = signed(None, raw=raw)
        resp = await client.post(PATH, data=body, headers=headers)
        assert resp.status == 400, raw
        answer = await resp.json()
        assert answer["error"] == error, raw
        assert detail in answer["detail"], (raw, answer)


async def test_oversized_body_is_413(
    client: TestClient[web.Request, web.Application],
) -> None:
    """A body over webhook_max_bytes is refused before any work."""
    body, headers = signed(None, raw=b"x" * 300_000)
    assert (await client.post(PATH, data=body, headers=headers)).status == 413


async def test_unconfigured_secret_is_503(cache: TwoLevelCache) -> None:
    """With no webhook secret configured every webhook is refused (never accepted)."""
    client = await serve(cache, settings(secret=""))
    body, headers = signed(UPDATE, secret="")
    assert (await client.post(PATH, data=body, headers=headers)).status == 503
    await client.close()


async def test_redis_down_is_503_and_retry_works_after(own_redis: RedisServer) -> None:
    """Redis down: 503 (the CRM retries), never 500; once Redis is back the same
    webhook is accepted."""
    rc = redis_client(RedisSettings(url=own_redis.url))
    cache = TwoLevelCache(rc, KEYS, CacheSettings(), down_backoff_s=0.0)
    client = await serve(cache, settings())
    own_redis.stop()
    body, headers = signed(UPDATE)
    assert (await client.post(PATH, data=body, headers=headers)).status == 503
    own_redis.start()
    assert (await client.post(PATH, data=body, headers=headers)).status == 200
    await client.close()
    await rc.aclose()
