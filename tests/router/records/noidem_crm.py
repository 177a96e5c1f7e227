"""A loopback CRM without idempotency keys, shaped like HubSpot's CRM objects API.

HubSpot's ``POST /crm/v3/objects/calls`` (and ``/tasks``) creates a new object on every
request, whatever the headers: a retry after a lost answer duplicates the activity.
What it offers instead is search: ``POST /crm/v3/objects/{type}/search`` with
``filterGroups[].filters[]`` (``propertyName``, ``operator`` ``CONTAINS_TOKEN`` or ``EQ``,
``value``), answering ``{"total", "results": [{"id", "properties", "createdAt",
"updatedAt", "archived"}]}``. This fake follows those shapes, checks every request
(``Authorization: Bearer <token>``, a JSON body with ``properties``; a bad one gets
HubSpot's 400 ``VALIDATION_ERROR`` body), and loses answers on demand:

- ``lose[key] = "drop"``: the object is committed, then the connection is closed
  without an answer; ``"stall"``: committed, then the answer is held past the
  client's timeout; ``"drop_before"``: closed without committing;
- ``hold_keys``: committed, then ``committed`` is set and the answer waits for
  ``release`` (a test kills the worker meanwhile);
- ``index_lag_s``: a new object shows up in search only this long after its creation
  (HubSpot's search index lags a few seconds);
- ``reject``: the next create gets 400 with a HubSpot validation error naming the
  property and quoting the value (a phone number) and the token it was sent with.

The key of a request is the ``callroute:<key>`` token written into ``hs_call_body`` /
``hs_task_body``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from router.crm.config import CrmSettings
from tests.crm_server import serving

TOKEN = "pat-na1-SECRET-0042"
BODY_PROPERTY = {"calls": "hs_call_body", "tasks": "hs_task_body"}
_KEY = re.compile(r"callroute:(\S+)")


@dataclass
class Obj:
    """One object the CRM holds."""

    id: str
    type: str
    properties: dict[str, Any]
    created: float

    @property
    def key(self) -> str | None:
        match = _KEY.search(str(self.properties.get(BODY_PROPERTY[self.type], "")))
        return match.group(1) if match else None


@dataclass
class NoIdemCrm:
    """The loopback CRM (see the module docstring)."""

    url: str = ""
    objects: list[Obj] = field(default_factory=list)
    creates: list[str] = field(default_factory=list)
    searches: list[dict[str, Any]] = field(default_factory=list)
    lose: dict[str, str] = field(default_factory=dict)
    hold_keys: set[str] = field(default_factory=set)
    committed: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    index_lag_s: float = 0.0
    stall_s: float = 3.0
    reject: bool = False
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(5001))

    def keys(self, type_: str = "calls") -> list[str | None]:
        """The key of each object of one type, in creation order (duplicates show)."""
        return [o.key for o in self.objects if o.type == type_]

    def _auth_error(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({
                "status": "error", "category": "INVALID_AUTHENTICATION",
                "message": "Authentication credentials not found.",
                "correlationId": "c-401"}, status=401)
        if not request.content_type.startswith("application/json"):
            return _validation("Content-Type must be application/json")
        return None

    async def create(self, request: web.Request) -> web.StreamResponse:
        type_ = request.match_info["type"]
        refused = self._auth_error(request)
        if refused is not None or type_ not in BODY_PROPERTY:
            return refused or web.json_response({"status": "error"}, status=404)
        body = await request.json()
        props = body.get("properties") if isinstance(body, dict) else None
        if not isinstance(props, dict) or "hs_timestamp" not in props:
            return _validation("properties.hs_timestamp is required")
        if self.reject:
            self.reject = False
            phone = props.get("hs_call_from_number", "+14155550199")
            return _validation(
                f'Property values were not valid: [{{"isValid":false,"message":"{phone} was '
                f'not a valid number","error":"INVALID_INTEGER","name":"hs_call_duration"}}] '
                f"(request authorized with Bearer {TOKEN})")
        key = _KEY.search(str(props.get(BODY_PROPERTY[type_], "")))
        key_text = key.group(1) if key else ""
        self.creates.append(key_text)
        mode = self.lose.pop(key_text, None)
        if mode == "drop_before":
            return await _drop(request)
        obj = Obj(str(next(self._ids)), type_, {k: str(v) for k, v in props.items()},
                  time.monotonic())
        obj.properties["hs_object_id"] = obj.id
        self.objects.append(obj)
        if mode == "drop":
            return await _drop(request)
        if mode == "stall":
            await asyncio.sleep(self.stall_s)
        if key_text in self.hold_keys:
            self.committed.set()
            await self.release.wait()
        return web.json_response(_shape(obj), status=201)

    async def search(self, request: web.Request) -> web.Response:
        type_ = request.match_info["type"]
        refused = self._auth_error(request)
        if refused is not None:
            return refused
        body = await request.json()
        self.searches.append(body)
        try:
            filters = [f for g in body["filterGroups"] for f in g["filters"]]
        except (KeyError, TypeError):
            return _validation("filterGroups is required")
        now = time.monotonic()
        found = [o for o in self.objects if o.type == type_
                 and now - o.created >= self.index_lag_s
                 and all(_passes(o, f) for f in filters)]
        return web.json_response({"total": len(found),
                                  "results": [_shape(o) for o in found[: body.get("limit", 10)]]})


def _passes(obj: Obj, flt: dict[str, Any]) -> bool:
    value = obj.properties.get(flt.get("propertyName", ""))
    if value is None:
        return False
    if flt.get("operator") == "EQ":
        return value == flt.get("value")
    if flt.get("operator") == "CONTAINS_TOKEN":
        return str(flt.get("value")) in value.split()
    return False


def _shape(obj: Obj) -> dict[str, Any]:
    stamp = "2026-01-01T00:00:00.000Z"
    return {"id": obj.id, "properties": obj.properties, "createdAt": stamp,
            "updatedAt": stamp, "archived": False}


def _validation(message: str) -> web.Response:
    return web.json_response({"status": "error", "message": message,
                              "correlationId": "c-400", "category": "VALIDATION_ERROR"},
                             status=400)


async def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without an answer (the client sees it dropped)."""
    transport = request.transport
    if transport is not None:
        transport.close()
    await asyncio.sleep(0.05)
    return web.Response(status=500)


@pytest.fixture(name="noidem")
async def noidem_fixture() -> AsyncIterator[NoIdemCrm]:
    """A running NoIdemCrm on 127.0.0.1."""
    crm = NoIdemCrm()
    app = web.Application()
    app.router.add_post("/crm/v3/objects/{type}/search", crm.search)
    app.router.add_post("/crm/v3/objects/{type}", crm.create)
    async with serving(app) as crm.url:
        yield crm
        crm.release.set()


def _find(type_: str, prop: str, settle_s: float) -> dict[str, Any]:
    return {
        "method": "POST", "url": f"/crm/v3/objects/{type_}/search",
        "body": {"filterGroups": [{"filters": [{
            "propertyName": prop, "operator": "CONTAINS_TOKEN",
            "value": "callroute:{idempotency_key}"}]}],
            "properties": [prop], "limit": 10},
        "results": "results",
        "match": {"path": f"properties.{prop}", "contains": "callroute:{idempotency_key}"},
        "id_path": "id", "settle_s": settle_s,
    }


def hubspot_settings(url: str, *, find: bool = True, settle_s: float = 0.0,
                     timeout_s: float = 2.0) -> CrmSettings:
    """The connector for this CRM: calls and tasks written with a ``callroute:<key>``
    token in their body; ``find`` searches that token after a lost answer."""
    activity: dict[str, Any] = {
        "url": "/crm/v3/objects/calls", "idempotency_header": None, "id_path": "id",
        "body": {"properties": {
            "hs_timestamp": "{record.end}", "hs_call_direction": "INBOUND",
            "hs_call_title": "Call from {record.caller}", "hs_call_status": "COMPLETED",
            "hs_call_from_number": "{record.caller}",
            "hs_call_body": "Outcome {record.outcome} callroute:{idempotency_key}"}},
    }
    task: dict[str, Any] = {
        "url": "/crm/v3/objects/tasks", "idempotency_header": None, "id_path": "id",
        "body": {"properties": {
            "hs_timestamp": "{now}", "hs_task_subject": "Call back {record.caller}",
            "hs_task_status": "NOT_STARTED",
            "hs_task_body": "Missed call callroute:{idempotency_key}"}},
    }
    if find:
        activity["find"] = _find("calls", "hs_call_body", settle_s)
        task["find"] = _find("tasks", "hs_task_body", settle_s)
    return CrmSettings.model_validate({
        "name": "hubspot-fake", "base_url": url, "timeout_s": timeout_s,
        "auth": {"type": "bearer", "token": TOKEN},
        "activity": activity, "task": task,
    })
