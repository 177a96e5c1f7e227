"""Change webhooks configured per CRM, with requests shaped like each vendor's documented
ones: HubSpot v3 signatures and event batches, Salesforce outbound messages (SOAP),
Stripe-style t=/v1= signatures, body HMACs, Zoho's body token, Pipedrive's basic auth,
Odoo's query token; records fetched by id through the connector from a loopback API."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import ValidationError

from router.crm.base import InboundRequest
from router.crm.config import CrmSettings
from router.crm.rest import RestConnector
from router.crm.webhooks import WebhookReceiver, WebhookSettings, collect, xml_document
from router.errors import WebhookError
from router.lookup.cache import CacheEntry, TwoLevelCache, decode_entry
from router.lookup.webhook import WebhookEndpoint, add_webhook_routes
from router.models import Customer
from router.settings import CacheSettings
from tests.crm_server import scripted_server
from tests.router.lookup.cache_crm import KEYS, redis_fixture  # noqa: F401  (fixture)

SECRET = "whsec-SECRET-0815"
OLD = "+14155550100"   # the number cached before the change
NEW = "+14155550199"   # the number the CRM has now
Client = TestClient[web.Request, web.Application]


class Rig:
    """A cache, the receivers of one CRM config mounted on a real server, and a client."""

    def __init__(self, cache: TwoLevelCache, client: Client,
                 endpoints: list[WebhookEndpoint], connector: RestConnector) -> None:
        self.cache = cache
        self.client = client
        self.endpoints = endpoints
        self.connector = connector

    async def cached(self, number: str) -> Customer | None:
        raw = await self.cache.redis.get(KEYS.customer(number))
        if raw is None:
            return None
        entry = decode_entry(raw)
        return entry.customer if entry is not None else None

    async def drain(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.drain(5)


@pytest.fixture
async def api() -> AsyncIterator[Any]:
    """A loopback CRM API answering record fetches like HubSpot, Zoho and Salesforce."""
    contacts = {
        "501": {"id": "501", "properties": {"firstname": "Ada", "lastname": "Lovelace",
                                            "phone": "(415) 555-0199", "mobilephone": None}},
    }

    def reply(info: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        path = info["path"]
        if path.startswith("/crm/v3/objects/contacts/"):
            found = contacts.get(path.rsplit("/", 1)[1])
            if found is None:
                return 404, {"status": "error", "category": "OBJECT_NOT_FOUND"}, {}
            return 200, found, {}
        if path.startswith("/crm/v2/Contacts/"):
            cid = path.rsplit("/", 1)[1]
            return 200, {"data": [{"id": cid, "Full_Name": f"Zoho {cid[-2:]}",
                                   "Phone": f"+1415555{cid[-4:]}"}]}, {}
        return 404, {}, {}

    async with scripted_server(reply) as server:
        yield server


async def rig_for(redis: aioredis.Redis, api_url: str, webhooks: list[dict[str, Any]],
                  fields: dict[str, Any]) -> Rig:
    """Mount the receivers of ``webhooks`` (mapping records by ``fields``)."""
    settings = CrmSettings.model_validate({
        "base_url": api_url, "lookup": {"fields": fields}, "webhooks": webhooks})
    connector = RestConnector(settings, region="US")
    cache = TwoLevelCache(redis, KEYS, CacheSettings())
    receivers = [WebhookReceiver.for_connector(w, connector) for w in settings.webhooks]
    app = web.Application()
    endpoints = add_webhook_routes(app, cache, receivers, "US")
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return Rig(cache, client, endpoints, connector)


@pytest.fixture
async def rigs() -> AsyncIterator[list[Rig]]:
    """Rigs closed after the test."""
    made: list[Rig] = []
    yield made
    for rig in made:
        await rig.drain()
        await rig.client.close()
        await rig.connector.aclose()


# --- HubSpot -----------------------------------------------------------------------------

HUBSPOT = {
    "name": "hubspot",
    "signature": {"scheme": "hubspot_v3", "secret": SECRET,
                  "public_url": "https://pbx.example.com/webhooks/hubspot"},
    "events": "", "type": "subscriptionType",
    "updated": ["contact.propertyChange", "contact.creation"],
    "deleted": ["contact.deletion"], "customer_id": "objectId",
    "fetch": {"url": "/crm/v3/objects/contacts/{id}",
              "params": {"properties": "firstname,lastname,phone,mobilephone"},
              "numbers": ["properties.phone", "properties.mobilephone"]},
}
HUBSPOT_FIELDS = {"id": "id", "name": "properties.firstname"}


def hubspot_event(object_id: int, kind: str = "contact.propertyChange") -> dict[str, Any]:
    """One event as HubSpot's webhooks API batches them."""
    return {"eventId": 3816279340 + object_id, "subscriptionId": 25, "portalId": 62515,
            "appId": 1160452, "occurredAt": int(time.time() * 1000), "subscriptionType": kind,
            "attemptNumber": 0, "objectId": object_id, "changeSource": "CRM",
            "propertyName": "phone", "propertyValue": "(415) 555-0199"}


def hubspot_headers(body: bytes, *, uri: str = "https://pbx.example.com/webhooks/hubspot",
                    stamp_ms: int | None = None, secret: str = SECRET) -> dict[str, str]:
    """HubSpot's v3 headers: base64 HMAC-SHA256 of method + URI + body + timestamp."""
    stamp = str(stamp_ms if stamp_ms is not None else int(time.time() * 1000))
    mac = hmac.new(secret.encode(), b"POST" + uri.encode() + body + stamp.encode(),
                   hashlib.sha256).digest()
    return {"Content-Type": "application/json", "X-HubSpot-Signature-v3":
            base64.b64encode(mac).decode(), "X-HubSpot-Request-Timestamp": stamp,
            "X-HubSpot-Signature-Version": "v1", "X-HubSpot-Signature": "legacy-ignored"}


async def test_hubspot_batch_is_verified_fetched_and_cached(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """A HubSpot batch (v3 signature over the public URL): the contact change drops the
    contact's old number (via the customer index), fetches the contact by id through the
    connector and caches it under the number it has now; a deal event is ignored."""
    rig = await rig_for(redis, api.url, [HUBSPOT], HUBSPOT_FIELDS)
    rigs.append(rig)
    await rig.cache.put(OLD, CacheEntry(Customer(id="501", name="Old name"), time.time()))
    body = json.dumps([hubspot_event(501), hubspot_event(9, "deal.creation")]).encode()
    resp = await rig.client.post("/webhooks/hubspot", data=body, headers=hubspot_headers(body))
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert (answer["changes"], answer["ignored"], answer["fetching"]) == (1, 1, 1)
    await rig.drain()
    assert await rig.cached(OLD) is None
    fetched = await rig.cached(NEW)
    assert fetched is not None
    assert (fetched.id, fetched.name) == ("501", "Ada")
    (request,) = [r for r in api.seen if r["path"].startswith("/crm/v3/objects/contacts")]
    assert request["path"] == "/crm/v3/objects/contacts/501"
    assert request["query"] == {"properties": "firstname,lastname,phone,mobilephone"}


async def test_hubspot_signature_time_and_replay_are_checked(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """A tampered body or a URI other than the public one: 401 bad_signature; a signature
    6 minutes old: 401 stale (HubSpot's 5-minute window); the same request twice: 409."""
    rig = await rig_for(redis, api.url, [HUBSPOT], HUBSPOT_FIELDS)
    rigs.append(rig)
    body = json.dumps([hubspot_event(501, "contact.deletion")]).encode()
    headers = hubspot_headers(body)
    cases = [
        (body + b" ", headers, 401, "bad_signature"),
        (body, hubspot_headers(body, uri="http://127.0.0.1/webhooks/hubspot"), 401,
         "bad_signature"),
        (body, hubspot_headers(body, stamp_ms=int((time.time() - 360) * 1000)), 401, "stale"),
        (body, headers, 200, None),
        (body, headers, 409, "replay"),
    ]
    for data, sent, status, error in cases:
        resp = await rig.client.post("/webhooks/hubspot", data=data, headers=sent)
        assert resp.status == status, (status, await resp.text())
        if error:
            assert (await resp.json())["error"] == error


async def test_a_wrong_shape_names_the_missing_path(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """An event without objectId is 400 bad_shape naming '[1].objectId'; a body that is
    not JSON is 400 bad_json; nothing is applied."""
    rig = await rig_for(redis, api.url, [HUBSPOT], HUBSPOT_FIELDS)
    rigs.append(rig)
    await rig.cache.put(OLD, CacheEntry(Customer(id="501"), time.time()))
    event = hubspot_event(7)
    del event["objectId"]
    for raw, error, detail in [
        (json.dumps([hubspot_event(501), event]).encode(), "bad_shape",
         "[1].objectId: missing"),
        (json.dumps([{"objectId": 5}]).encode(), "bad_shape", "[0].subscriptionType: missing"),
        (b"not json", "bad_json", "not JSON"),
    ]:
        resp = await rig.client.post("/webhooks/hubspot", data=raw, headers=hubspot_headers(raw))
        assert resp.status == 400
        answer = await resp.json()
        assert answer["error"] == error
        assert answer["detail"].startswith(detail) if error == "bad_shape" \
            else detail in answer["detail"]
    assert await rig.cached(OLD) is not None


async def test_a_contact_gone_at_fetch_time_stays_invalidated(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """The fetch answers 404 (the contact was deleted meanwhile): its entries stay
    dropped and nothing is cached for it."""
    rig = await rig_for(redis, api.url, [HUBSPOT], HUBSPOT_FIELDS)
    rigs.append(rig)
    await rig.cache.put(OLD, CacheEntry(Customer(id="777"), time.time()))
    body = json.dumps([hubspot_event(777)]).encode()
    resp = await rig.client.post("/webhooks/hubspot", data=body, headers=hubspot_headers(body))
    assert resp.status == 200
    await rig.drain()
    assert await rig.cached(OLD) is None
    assert [k async for k in redis.scan_iter(match=KEYS.customer_by_hash("*"))] == []


# --- Salesforce outbound messages ----------------------------------------------------------

ORG = "00D5e000000KQ2eEAG"


def outbound_message(org: str, *sobjects: dict[str, str]) -> bytes:
    """A Salesforce outbound message (SOAP) notifying ``sobjects`` (Contacts)."""
    notes = "".join(
        f"<Notification><Id>04l5e00000Gx7Q{i}AAJ</Id>"
        f'<sObject xsi:type="sf:Contact" xmlns:sf="urn:sobject.enterprise.soap.sforce.com">'
        + "".join(f"<sf:{k}>{v}</sf:{k}>" for k, v in o.items())
        + '<sf:MobilePhone xsi:nil="true"/></sObject></Notification>'
        for i, o in enumerate(sobjects))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" '
        'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>'
        '<notifications xmlns="http://soap.sforce.com/2005/09/outbound">'
        f"<OrganizationId>{org}</OrganizationId><ActionId>04k5e000000CaRkAAK</ActionId>"
        '<SessionId xsi:nil="true"/><EnterpriseUrl>https://x.my.salesforce.com/services/Soap/c/'
        "59.0/00D5e000000KQ2e</EnterpriseUrl><PartnerUrl>https://x.my.salesforce.com/services/"
        f"Soap/u/59.0/00D5e000000KQ2e</PartnerUrl>{notes}</notifications>"
        "</soapenv:Body></soapenv:Envelope>").encode()


SALESFORCE = {"name": "salesforce",
              "signature": {"scheme": "salesforce", "organization_id": ORG},
              "numbers": ["sObject.Phone", "sObject.MobilePhone"]}


async def test_salesforce_outbound_message_is_acked_and_applied(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """Two notifications in one SOAP message: each record (mapped by the lookup's field
    map) is cached under its phone; the answer is the SOAP Ack Salesforce waits for."""
    rig = await rig_for(redis, api.url, [SALESFORCE], {"id": "Id", "name": "Name"})
    rigs.append(rig)
    body = outbound_message(
        ORG, {"Id": "0035e00000ZkM3hAAF", "Name": "Grace Hopper", "Phone": "(415) 555-0199"},
        {"Id": "0035e00000ZkM3iAAF", "Name": "Alan Turing", "Phone": "+1 415 555 0142"})
    resp = await rig.client.post("/webhooks/salesforce", data=body,
                                 headers={"Content-Type": "text/xml; charset=utf-8",
                                          "SOAPAction": '""'})
    assert resp.status == 200
    assert resp.content_type == "text/xml"
    assert "<Ack>true</Ack>" in await resp.text()
    grace = await rig.cached(NEW)
    alan = await rig.cached("+14155550142")
    assert grace is not None
    assert alan is not None
    assert (grace.id, grace.name, alan.name) == ("0035e00000ZkM3hAAF", "Grace Hopper",
                                                 "Alan Turing")


async def test_salesforce_wrong_org_dtd_and_missing_id_are_refused(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """Another organization's message: 401; a DTD (entity expansion): 400; a notification
    without sObject.Id: 400 naming the path."""
    rig = await rig_for(redis, api.url, [SALESFORCE], {"id": "Id", "name": "Name"})
    rigs.append(rig)
    cases = [
        (outbound_message("00DOTHERORG0000AAA", {"Id": "003x"}), 401, "bad_signature", ""),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', 400, "bad_json",
         "DTD"),
        (outbound_message(ORG, {"Name": "No Id"}), 400, "bad_shape",
         "Envelope.Body.notifications.Notification.sObject.Id: missing"),
    ]
    for body, status, error, detail in cases:
        resp = await rig.client.post("/webhooks/salesforce", data=body,
                                     headers={"Content-Type": "text/xml"})
        answer = await resp.json()
        assert (resp.status, answer["error"]) == (status, error)
        assert detail in answer["detail"]


# --- Stripe-style, plain HMAC, tokens, basic auth -----------------------------------------

STRIPE = {"name": "selfhosted",
          "signature": {"scheme": "stripe", "secret": SECRET, "header": "X-CRM-Signature"},
          "type": "type", "updated": ["contact.updated"], "deleted": ["contact.deleted"],
          "events": "", "customer_id": "data.object.id", "numbers": ["data.object.phones.*"],
          "record": "data.object"}


def stripe_headers(body: bytes, stamp: int, *secrets: str) -> dict[str, str]:
    """``t=<stamp>,v1=<hex>`` for each secret (a rotation sends both)."""
    sigs = ",".join(
        "v1=" + hmac.new(s.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        for s in secrets)
    return {"X-CRM-Signature": f"t={stamp},{sigs}", "Content-Type": "application/json"}


async def test_stripe_style_signature_with_a_rotated_secret(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """t=,v1= over '<t>.<body>': accepted when any v1 matches (old and new secret during
    a rotation); the record it carries replaces the cache entry; an old t is stale."""
    rig = await rig_for(redis, api.url, [STRIPE], {"id": "id", "name": "name"})
    rigs.append(rig)
    body = json.dumps({"id": "evt_1", "type": "contact.updated", "data": {"object": {
        "id": "c-9", "name": "Linus", "phones": ["+1 415 555 0199", "+1 415 555 0100"]}}}
    ).encode()
    now = int(time.time())
    resp = await rig.client.post("/webhooks/selfhosted", data=body,
                                 headers=stripe_headers(body, now, "old-secret", SECRET))
    assert resp.status == 200
    assert (await resp.json())["replaced"] == 2
    linus = await rig.cached(OLD)
    assert linus is not None
    assert linus.name == "Linus"
    stale = await rig.client.post("/webhooks/selfhosted", data=body,
                                  headers=stripe_headers(body, now - 3600, SECRET))
    assert (stale.status, (await stale.json())["error"]) == (401, "stale")
    wrong = await rig.client.post("/webhooks/selfhosted", data=body,
                                  headers=stripe_headers(body, now, "old-secret"))
    assert wrong.status == 401


async def test_plain_body_hmac_in_base64_and_zoho_body_token_and_query_token(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """A base64 HMAC of the body in a header; Zoho's notification (its token in the body,
    several ids, records fetched from Zoho's API under 'data'); an Odoo automation
    webhook (the record's fields, a token in the query string)."""
    webhooks = [
        {"name": "b64", "signature": {"scheme": "hmac", "secret": SECRET,
                                      "header": "X-Hub-Hmac-Sha256", "encoding": "base64"},
         "type": None, "customer_id": "id", "numbers": ["phone"], "record": ""},
        {"name": "zoho", "signature": {"scheme": "token", "token": "TOKEN_FOR_VERIFICATION",
                                       "body_path": "token"},
         "type": "operation", "updated": ["insert", "update"], "deleted": ["delete"],
         "customer_id": "ids",
         "fetch": {"url": "/crm/v2/Contacts/{id}", "result": "data", "numbers": ["Phone"]}},
        {"name": "odoo", "signature": {"scheme": "token", "token": "odoo-tok", "query": "token"},
         "type": None, "customer_id": "_id", "numbers": ["phone", "mobile"], "record": ""},
    ]
    fields = {"id": "id", "name": "name"}
    rig = await rig_for(redis, api.url, webhooks, fields)
    rigs.append(rig)
    body = json.dumps({"id": "p1", "name": "Hub", "phone": "+14155550111"}).encode()
    mac = base64.b64encode(hmac.new(SECRET.encode(), body, hashlib.sha256).digest()).decode()
    for _ in range(2):  # no timestamp: nothing to bound a nonce, each send is applied
        resp = await rig.client.post("/webhooks/b64", data=body,
                                     headers={"X-Hub-Hmac-Sha256": mac})
        assert resp.status == 200
    zoho = {"server_time": 1584347416283, "query_params": {}, "module": "Contacts",
            "resource_uri": "https://www.zohoapis.com/crm/v2/Contacts",
            "ids": ["4150868000003905002", "4150868000003905003"],
            "affected_fields": [{"4150868000003905002": ["Phone"]}], "operation": "update",
            "channel_id": "1000000068001", "token": "TOKEN_FOR_VERIFICATION"}
    resp = await rig.client.post("/webhooks/zoho", json=zoho)
    assert (resp.status, (await resp.json())["fetching"]) == (200, 2)
    bad = await rig.client.post("/webhooks/zoho", json={**zoho, "token": "guess"})
    assert bad.status == 401
    odoo = {"_action": "Send Webhook Notification(#12)", "_id": 42, "_model": "res.partner",
            "id": 42, "name": "Odoo Partner", "phone": "+1 415 555 0133", "mobile": False}
    assert (await rig.client.post("/webhooks/odoo?token=odoo-tok", json=odoo)).status == 200
    assert (await rig.client.post("/webhooks/odoo?token=nope", json=odoo)).status == 401
    await rig.drain()
    hub, zoho_c, odoo_c = (await rig.cached("+14155550111"), await rig.cached("+14155555002"),
                           await rig.cached("+14155550133"))
    assert hub is not None
    assert zoho_c is not None
    assert odoo_c is not None
    assert (hub.name, zoho_c.id, odoo_c.name) == ("Hub", "4150868000003905002", "Odoo Partner")


async def test_pipedrive_basic_auth_and_phone_list(
    redis: aioredis.Redis, api: Any, rigs: list[Rig]
) -> None:
    """Pipedrive's v2 webhook (HTTP basic auth it was configured with; the person's
    phones a list of {value, primary, label}): every phone is cached; wrong credentials
    are 401."""
    webhook = {"name": "pipedrive",
               "signature": {"scheme": "basic", "username": "callroute", "password": "pw-77"},
               "type": "meta.action", "updated": ["create", "change"], "deleted": ["delete"],
               "customer_id": "meta.entity_id", "numbers": ["data.phones.*.value"],
               "record": "data"}
    rig = await rig_for(redis, api.url, [webhook], {"id": "id", "name": "name"})
    rigs.append(rig)
    event = {"meta": {"action": "change", "entity": "person", "entity_id": "42",
                      "company_id": "1", "version": "2.0", "timestamp": "2026-01-01T00:00:00Z"},
             "data": {"id": 42, "name": "Pipe Person", "phones": [
                 {"value": "(415) 555-0199", "primary": True, "label": "work"},
                 {"value": "415 555 0100", "primary": False, "label": "home"}]},
             "previous": {"phones": []}}
    auth = "Basic " + base64.b64encode(b"callroute:pw-77").decode()
    resp = await rig.client.post("/webhooks/pipedrive", json=event,
                                 headers={"Authorization": auth})
    assert (resp.status, (await resp.json())["replaced"]) == (200, 2)
    wrong = "Basic " + base64.b64encode(b"callroute:guess").decode()
    assert (await rig.client.post("/webhooks/pipedrive", json=event,
                                  headers={"Authorization": wrong})).status == 401


# --- pure parts ----------------------------------------------------------------------------


def test_config_names_what_a_scheme_needs() -> None:
    """Each scheme's missing setting fails validation naming it (callroute check)."""
    for signature, missing in [
        ({"scheme": "hmac", "secret": "s"}, "signature.header"),
        ({"scheme": "hubspot_v3"}, "signature.secret"),
        ({"scheme": "salesforce"}, "signature.organization_id"),
        ({"scheme": "token", "token": "t"}, "signature.header, .query or .body_path"),
        ({"scheme": "hmac", "secret": "s", "header": "X", "signed": "timestamp.body"},
         "timestamp_header"),
    ]:
        with pytest.raises(ValidationError, match=missing.replace(".", r"\.")):
            WebhookSettings.model_validate({"name": "x", "signature": signature})
    with pytest.raises(ValidationError, match="two webhooks"):
        CrmSettings.model_validate({"webhooks": [
            {"name": "a", "signature": {"scheme": "token", "token": "t", "header": "X"}},
            {"name": "b", "path": "/webhooks/a",
             "signature": {"scheme": "token", "token": "t", "header": "X"}}]})


def test_collect_walks_lists_and_xml_becomes_data() -> None:
    """'*' walks list items; XML elements become objects, repeats lists, xsi:nil None."""
    doc = {"a": [{"v": 1}, {"v": 2}, {"w": 3}], "b": ["x", "y"]}
    assert collect(doc, "a.*.v") == [1, 2]
    assert collect(doc, "b") == ["x", "y"]
    assert collect(doc, "c.d") == []
    xml = xml_document(b'<r xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">'
                       b'<n>1</n><n>2</n><e xsi:nil="true"/><s><t>x</t></s></r>')
    assert xml == {"r": {"n": ["1", "2"], "e": None, "s": {"t": "x"}}}
    with pytest.raises(WebhookError, match="not XML"):
        xml_document(b"<r>")


async def test_the_admin_server_mounts_each_configured_webhook(
    redis: aioredis.Redis, api: Any
) -> None:
    """serve's admin app mounts /webhooks/crm and one route per crm.webhooks entry, each
    declaring that it checks its own signature; through the access middleware a wrong
    signature is the handler's 401 and a right one is applied."""
    from router.admin import AdminDeps
    from router.app import assemble_admin
    from router.auth.access import route_table
    from router.settings import Settings

    settings = Settings.model_validate({
        "crm": {"base_url": api.url, "lookup": {"fields": HUBSPOT_FIELDS},
                "webhooks": [HUBSPOT]},
        "phone": {"default_region": "US"}})
    connector = RestConnector(settings.crm, region="US")
    cache = TwoLevelCache(redis, KEYS, CacheSettings())
    app = assemble_admin(settings, AdminDeps(), cache, connector=connector)
    rules = {(m, p): r.describe() if r else None for m, p, r in route_table(app)}
    assert rules[("POST", "/webhooks/hubspot")].startswith("signed (hubspot_v3 signature")
    assert rules[("POST", "/webhooks/crm")].startswith("signed (")
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        body = json.dumps([hubspot_event(501)]).encode()
        bad = await client.post("/webhooks/hubspot", data=body,
                                headers=hubspot_headers(body, secret="wrong"))
        assert (bad.status, (await bad.json())["error"]) == (401, "bad_signature")
        good = await client.post("/webhooks/hubspot", data=body, headers=hubspot_headers(body))
        assert (good.status, (await good.json())["fetching"]) == (200, 1)
        unset = await client.post("/webhooks/crm", data=b"{}")
        assert (unset.status, (await unset.json())["error"]) == (503, "not_configured")
    finally:
        await client.close()  # the app's cleanup drains the fetch
        await connector.aclose()
    assert await redis.exists(KEYS.customer(NEW)) == 1


def test_webhook_fetch_through_a_lookup_step_that_reads_by_id() -> None:
    """Without fetch:, a webhook reads records through a lookup step that reads one
    record by the id the previous step found (its templates read one path of item and
    nothing of the caller's number); lookup: names which, and naming a lookup without
    such a step is refused; an enabled webhook needs its secret, a disabled one (as
    presets ship them) does not."""
    by_id = {"name": "by_id", "steps": [
        {"url": "/search", "params": {"q": "{e164}"}},
        {"url": "/people/{item.person.id}", "results": "data", "numbers": ["phones"]}]}
    numbered = {"name": "numbered", "steps": [
        {"url": "/search", "params": {"q": "{e164}"}},
        {"url": "/people/{item.id}", "params": {"n": "{e164}"}}]}
    hook = {"name": "h", "signature": {"scheme": "token", "token": "t", "header": "X-T"},
            "customer_id": "id"}
    settings = CrmSettings.model_validate({"lookups": [numbered, by_id], "webhooks": [hook]})
    connector = RestConnector(settings)
    assert [x.by_id for x in connector.plan.lookups] == [None, 1]
    assert connector.plan.lookups[1].steps[1].by_id == "person.id"
    assert connector.can_fetch_by_id()
    assert connector.can_fetch_by_id("by_id")
    assert not connector.can_fetch_by_id("numbered")
    assert WebhookReceiver.for_connector(settings.webhooks[0], connector).can_fetch
    with pytest.raises(ValidationError, match=r"webhooks\[0\] \(h\)\.lookup: no enabled "
                                              r"lookup 'numbered'"):
        CrmSettings.model_validate({"lookups": [numbered, by_id],
                                    "webhooks": [{**hook, "lookup": "numbered"}]})
    with pytest.raises(ValidationError, match=r"scheme token needs signature\.token"):
        CrmSettings.model_validate({"webhooks": [{**hook, "signature": {"scheme": "token",
                                                                        "header": "X-T"}}]})
    off = CrmSettings.model_validate({"webhooks": [{**hook, "enabled": False, "signature": {
        "scheme": "token", "header": "X-T"}}]})
    assert off.enabled_webhooks == []


async def test_a_deeply_nested_body_is_refused_before_verification() -> None:
    """A body nested deeper than Python's recursion limit, sent to receivers that parse
    before they verify (Zoho's token in the body, Salesforce's SOAP): 400 bad_json, not
    a RecursionError that would answer 500."""
    zoho = WebhookReceiver(WebhookSettings.model_validate(
        {"name": "zoho", "signature": {"scheme": "token", "token": "t", "body_path": "token"},
         "type": "operation", "customer_id": "ids"}))
    salesforce = WebhookReceiver(WebhookSettings.model_validate(SALESFORCE))
    for receiver, body in [(zoho, b"[" * 100_000 + b"]" * 100_000),
                           (salesforce, b"<a>" * 30_000 + b"</a>" * 30_000)]:
        request = InboundRequest("POST", "http://127.0.0.1/webhooks/x", {}, {}, body)
        with pytest.raises(WebhookError, match="nested too deeply") as refused:
            await receiver.receive(request, time.time())
        assert (refused.value.status, refused.value.outcome) == (400, "bad_json")
