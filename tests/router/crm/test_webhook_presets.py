"""The presets' change webhooks, turned on as their guides say, against the vendor-shaped
fakes: an event that only names a contact (HubSpot's webhook batch, a Zoho
notification, a Pipedrive v1 webhook) is verified, the contact is read back by id (by
the webhook's fetch, or by the lookup step that reads a person by id) and cached under
the number it has now. Real Redis, real HTTP, every request checked by the fake."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.crm.config import CrmSettings
from router.crm.presets import merge
from router.crm.rest import RestConnector
from router.crm.webhooks import WebhookReceiver
from router.lookup.cache import CacheEntry, TwoLevelCache, decode_entry
from router.lookup.webhook import add_webhook_routes
from router.models import Customer
from router.settings import CacheSettings
from tests.crm_fakes.base import LI, FakeCrm
from tests.router.lookup.cache_crm import KEYS, redis_fixture  # noqa: F401  (fixture)

SECRET = "hook-SECRET-2718"
PUBLIC = "https://pbx.example.com/webhooks/hubspot"
#: Li Lei's number after the change, as typed into the CRM, and in E.164.
NEW_TYPED, NEW = "+86 139 1111 2222", "+8613911112222"


def hubspot_change(fake: Any, cid: str) -> tuple[dict[str, Any], bytes, dict[str, str]]:
    """The new number in HubSpot; the webhook batch (v3 signature over the public URL)."""
    fake.objects["contacts"][cid]["properties"]["phone"] = NEW_TYPED
    body = json.dumps([{"eventId": 1, "subscriptionId": 25, "portalId": 62515, "appId": 1,
                        "occurredAt": int(time.time() * 1000),
                        "subscriptionType": "contact.propertyChange", "attemptNumber": 0,
                        "objectId": int(cid), "changeSource": "CRM", "propertyName": "phone",
                        "propertyValue": NEW_TYPED}]).encode()
    stamp = str(int(time.time() * 1000))
    mac = hmac.new(SECRET.encode(), b"POST" + PUBLIC.encode() + body + stamp.encode(),
                   hashlib.sha256).digest()
    headers = {"Content-Type": "application/json", "X-HubSpot-Request-Timestamp": stamp,
               "X-HubSpot-Signature-v3": base64.b64encode(mac).decode()}
    return {"signature": {"secret": SECRET, "public_url": PUBLIC}}, body, headers


def zoho_change(fake: Any, cid: str) -> tuple[dict[str, Any], bytes, dict[str, str]]:
    """The new number in Zoho; its notification (the channel's token in the body)."""
    fake.rows["Contacts"][cid]["Phone"] = NEW_TYPED
    body = json.dumps({"server_time": int(time.time() * 1000), "query_params": {},
                       "module": "Contacts", "resource_uri": "https://www.zohoapis.com/crm/v7/"
                       "Contacts", "ids": [cid], "affected_fields": [{cid: ["Phone"]}],
                       "operation": "update", "channel_id": "1000000068001",
                       "token": SECRET}).encode()
    return ({"signature": {"token": SECRET}}, body,
            {"Content-Type": "application/json"})


def pipedrive_change(fake: Any, cid: str) -> tuple[dict[str, Any], bytes, dict[str, str]]:
    """The new number in Pipedrive; its v1 webhook (HTTP basic auth) naming the person."""
    person = fake.persons[int(cid)]
    person["phone"] = [{"label": "work", "value": NEW_TYPED, "primary": True}]
    body = json.dumps({"v": 1, "matches_filters": {"current": []}, "meta": {
        "action": "updated", "change_source": "app", "company_id": 7, "host":
        "yourcompany.pipedrive.com", "id": int(cid), "is_bulk_update": False, "object":
        "person", "permitted_user_ids": [12001], "pipedrive_service_name": False,
        "timestamp": int(time.time()), "timestamp_micro": int(time.time() * 1e6),
        "user_id": 12001, "v": 1, "webhook_id": "42"}, "current": {"id": int(cid)},
        "previous": {"id": int(cid)}, "retry": 0, "event": "updated.person"}).encode()
    auth = base64.b64encode(b"pd-hook:" + SECRET.encode()).decode()
    return ({"signature": {"username": "pd-hook", "password": SECRET}}, body,
            {"Content-Type": "application/json", "Authorization": f"Basic {auth}"})


def forge(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    """The same request with a wrong credential (signature, token or password)."""
    forged = dict(headers)
    if "X-HubSpot-Signature-v3" in forged:
        forged["X-HubSpot-Signature-v3"] = base64.b64encode(b"x" * 32).decode()
    if "Authorization" in forged:
        forged["Authorization"] = "Basic " + base64.b64encode(b"pd-hook:guess").decode()
    return body.replace(SECRET.encode(), b"guess"), forged


CASES: dict[str, Callable[[Any, str], tuple[dict[str, Any], bytes, dict[str, str]]]] = {
    "hubspot": hubspot_change, "zoho": zoho_change, "pipedrive": pipedrive_change}


@pytest.fixture(params=list(CASES))
async def vendor(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Any, FakeCrm]]:
    """A running fake of each vendor whose preset has an id-only webhook."""
    module = importlib.import_module(f"tests.crm_fakes.{request.param}")
    fake = module.make()
    await fake.start()
    try:
        yield request.param, module, fake
    finally:
        await fake.stop()


async def test_id_only_event_is_fetched_by_id_and_cached_under_the_new_number(
        redis: aioredis.Redis, vendor: tuple[str, Any, FakeCrm]) -> None:
    """The preset's webhook, turned on with its secret only: the event names Li Lei
    (whose number changed in the CRM), the old number's entry is dropped, the contact is
    read back by id through the connector (the webhook's fetch, or for Pipedrive the
    lookup step that reads a person by id) and cached under the new number with the
    lookup's field mapping; a wrong credential is refused."""
    name, module, fake = vendor
    cid = fake.ids["li"]
    hook, body, headers = CASES[name](fake, cid)
    settings = CrmSettings.model_validate(merge(module.config(fake), {
        "webhooks": [{"name": name, "enabled": True, **hook}]}))
    (config,) = settings.enabled_webhooks
    assert (config.fetch is None) == (name == "pipedrive")
    connector = RestConnector(settings, region="CN")
    cache = TwoLevelCache(redis, KEYS, CacheSettings())
    receiver = WebhookReceiver.for_connector(config, connector)
    assert receiver.can_fetch
    app = web.Application()
    (endpoint,) = add_webhook_routes(app, cache, [receiver], "CN")
    client: TestClient[web.Request, web.Application] = TestClient(
        TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        await cache.put(LI, CacheEntry(Customer(id=cid, name="Li Lei"), time.time()))
        resp = await client.post(f"/webhooks/{name}", data=body, headers=headers)
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["fetching"] == 1
        await endpoint.drain(5)
        forged_body, forged_headers = forge(body, headers)
        refused = await client.post(f"/webhooks/{name}", data=forged_body,
                                    headers=forged_headers)
        assert refused.status == 401
    finally:
        await client.close()
        await connector.aclose()
    assert await redis.get(KEYS.customer(LI)) is None
    raw = await redis.get(KEYS.customer(NEW))
    assert raw is not None
    entry = decode_entry(raw)
    assert entry is not None
    assert entry.customer.id == cid
    assert "Li" in (entry.customer.name or "")
    assert entry.customer.tier == "gold"
    assert entry.customer.owner == fake.owner_ids["o1"]
    reads = [s for s in fake.seen if s.method == "GET" and s.path.endswith(f"/{cid}")]
    assert len(reads) == 1
    assert fake.violations == []
