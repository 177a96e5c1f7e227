"""EspoCRM's REST API (v8) on loopback, shaped by docs.espocrm.com (API · CRUD, API
search parameters).

Endpoints under ``/api/v1``: ``GET /{Entity}`` (``maxSize``, ``offset``, ``select``
(comma-separated, no spaces), ``orderBy``, ``order``, ``where[i][type|attribute|value]``
→ ``{"list": [...], "total": n}``), ``GET /{Entity}/{id}`` (the whole record),
``POST /{Entity}`` (200 and the created record), ``PUT /{Entity}/{id}`` (the attributes to
change; 200 and the updated record). Auth: ``X-Api-Key``. Errors: the status
with an ``X-Status-Reason`` header (400 for a bad field or value, 401, 403, 404); a
rate limit in front of EspoCRM is the proxy's 429 with ``Retry-After``.

``phoneNumber`` filters compare digits (EspoCRM keeps a numeric form of each number):
``equals`` the whole number, ``endsWith`` its end; ``contains`` finds text anywhere in a
field (SQL ``LIKE '%...%'``, case-insensitive), a text field like ``description``
included. Lists read the database: a new record is found at once. Date-times are
``YYYY-MM-DD HH:MM:SS`` in UTC; ids are 17 hexadecimal characters.
"""

from __future__ import annotations

import itertools
import re
from datetime import datetime
from typing import Any, ClassVar

from aiohttp import web

from tests.crm_fakes.base import OWNERS, PEOPLE, FakeCrm, Violation, digits, expect
from tests.crm_fakes.base import json_response as _json

API_KEY = "7d2e19c7b6a4f5e8d3c2b1a0f9e8d7c6"
ATTRIBUTES = {
    "Contact": {"id", "name", "firstName", "lastName", "phoneNumber", "phoneNumberData",
                "assignedUserId", "assignedUserName", "modifiedAt", "createdAt", "cTier",
                "cValue", "cLanguage", "cTags", "emailAddress", "description"},
    "Lead": {"id", "name", "firstName", "lastName", "phoneNumber", "phoneNumberData",
             "assignedUserId", "assignedUserName", "modifiedAt", "createdAt", "status",
             "source", "opportunityAmount", "accountName", "description"},
    "Call": {"id", "name", "status", "direction", "dateStart", "dateEnd", "duration",
             "parentType", "parentId", "assignedUserId", "description"},
    "Task": {"id", "name", "status", "priority", "dateEnd", "dateEndDate", "parentType",
             "parentId", "assignedUserId", "description"},
}
ENUMS = {("Call", "status"): {"Planned", "Held", "Not Held"},
         ("Call", "direction"): {"Outbound", "Inbound"},
         ("Task", "status"): {"Not Started", "Started", "Completed", "Canceled", "Deferred"},
         ("Task", "priority"): {"Low", "Normal", "High", "Urgent"},
         ("Lead", "status"): {"New", "Assigned", "In Process", "Converted", "Recycled", "Dead"},
         ("Lead", "source"): {"", "Call", "Email", "Existing Customer", "Partner",
                              "Public Relations", "Web Site", "Campaign", "Other"}}
REQUIRED = {"Lead": {"lastName"}, "Call": {"name", "dateStart", "dateEnd"},
            "Task": {"name"}}
DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_WHERE = re.compile(r"^where\[(\d+)\]\[(type|attribute|value)\]$")


class EspoCrmFake(FakeCrm):
    """EspoCRM (see the module doc)."""

    NAME: ClassVar[str] = "espocrm"
    SECONDARY_KIND: ClassVar[str] = "lead"

    def __init__(self) -> None:
        super().__init__()
        self._seq = itertools.count(0x1000)
        self.rows: dict[str, dict[str, dict[str, Any]]] = {e: {} for e in ATTRIBUTES}
        self.owner_ids = {key: self._new_id() for key in OWNERS}
        self.ids: dict[str, str] = {}
        for person in PEOPLE:
            entity = "Lead" if person.kind == "lead" else "Contact"
            owner = self.owner_ids.get(person.owner or "")
            row: dict[str, Any] = {
                "name": f"{person.first} {person.last}", "firstName": person.first,
                "lastName": person.last, "phoneNumber": person.phone,
                "phoneNumberData": [{"phoneNumber": person.phone, "primary": True,
                                     "type": "Mobile", "optOut": False, "invalid": False}],
                "assignedUserId": owner,
                "assignedUserName": " ".join(OWNERS[person.owner][:2]) if person.owner else None,
                "modifiedAt": person.updated.replace("T", " ").replace("Z", ""),
                "createdAt": "2024-01-01 00:00:00", "description": None,
            }
            if entity == "Contact":
                row.update(cTier=person.tier, cValue=person.value, cLanguage=person.language,
                           cTags=list(person.tags), emailAddress=None)
            else:
                row.update(status="New", source="Web Site", opportunityAmount=None,
                           accountName="Wang Fang Trading")
            self.ids[person.key] = self._insert(entity, row)
        self.seeded = set(self.ids.values())

    def _new_id(self) -> str:
        return f"{next(self._seq):017x}"

    def _insert(self, entity: str, row: dict[str, Any]) -> str:
        oid = self._new_id()
        self.rows[entity][oid] = {"id": oid, **row}
        return oid

    # --- protocol --------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/api/v1/{entity}", self.list)
        router.add_get("/api/v1/{entity}/{id}", self.read)
        router.add_post("/api/v1/{entity}", self.create)
        router.add_put("/api/v1/{entity}/{id}", self.update)

    def check_auth(self, request: web.Request) -> str | None:
        return None if request.headers.get("X-Api-Key") == API_KEY else "Unauthorized"

    def error_response(self, status: int, why: str) -> web.StreamResponse:
        return web.Response(status=status, headers={"X-Status-Reason": why[:200]})

    def rate_limit_response(self) -> web.StreamResponse:
        return web.Response(status=429, text="Too Many Requests",
                            headers={"Retry-After": str(self.RETRY_AFTER)})

    # --- handlers --------------------------------------------------------------------

    def _entity(self, request: web.Request) -> str:
        entity = request.match_info["entity"]
        if entity not in ATTRIBUTES:
            raise web.HTTPNotFound()
        return entity

    async def list(self, request: web.Request) -> web.StreamResponse:
        entity = self._entity(request)
        where: dict[int, dict[str, str]] = {}
        params: dict[str, str] = {}
        for key, value in request.query.items():
            match = _WHERE.match(key)
            if match:
                where.setdefault(int(match[1]), {})[match[2]] = value
            else:
                expect(key in {"maxSize", "offset", "select", "orderBy", "order"},
                       f"unknown parameter {key}")
                expect(key not in params, f"repeated parameter {key}")
                params[key] = value
        select = params.get("select", "")
        expect(" " not in select, "select: whitespaces are not allowed")
        fields = [f for f in select.split(",") if f] or sorted(ATTRIBUTES[entity])
        for name in fields:
            expect(name in ATTRIBUTES[entity], f"unknown attribute {name}")
        rows = [r for r in self.rows[entity].values()
                if all(_where(entity, w, r) for w in where.values())]
        if "orderBy" in params:
            expect(params["orderBy"] in ATTRIBUTES[entity], "unknown orderBy attribute")
            expect(params.get("order", "asc") in ("asc", "desc"), "order is asc or desc")
            rows.sort(key=lambda r: str(r.get(params["orderBy"]) or ""),
                      reverse=params.get("order") == "desc")
        size = int(params.get("maxSize", "20"))
        expect(1 <= size <= 200, "maxSize must be 1..200")
        offset = int(params.get("offset", "0"))
        page = rows[offset:offset + size]
        return _json({"list": [{k: r.get(k) for k in {"id", *fields}} for r in page],
                      "total": len(rows)})

    async def read(self, request: web.Request) -> web.StreamResponse:
        entity = self._entity(request)
        expect(not request.query, "reading a record takes no parameters")
        row = self.rows[entity].get(request.match_info["id"])
        if row is None:
            return self.error_response(404, "Record not found")
        return _json(row)

    async def create(self, request: web.Request) -> web.StreamResponse:
        entity = self._entity(request)
        expect(entity in ("Lead", "Call", "Task"), f"creating {entity} is not modelled")
        body = self._attributes(entity, await request.json())
        missing = sorted(f for f in REQUIRED[entity] if not body.get(f))
        expect(not missing, f"required: {missing}")
        oid = self._insert(entity, dict(body))
        return _json(self.rows[entity][oid])

    async def update(self, request: web.Request) -> web.StreamResponse:
        entity = self._entity(request)
        expect(entity in ("Lead", "Call", "Task"), f"updating {entity} is not modelled")
        expect(not request.query, "an update takes no parameters")
        body = self._attributes(entity, await request.json())
        row = self.rows[entity].get(request.match_info["id"])
        if row is None:
            return self.error_response(404, "Record not found")
        emptied = sorted(f for f in REQUIRED[entity] if f in body and not body[f])
        expect(not emptied, f"required: {emptied}")
        row.update(body)
        self.record_change(entity, row["id"], row)
        return _json(row)

    def _attributes(self, entity: str, body: Any) -> dict[str, Any]:
        """The attributes of a create or update, checked as EspoCRM does."""
        expect(isinstance(body, dict), "the body must be a JSON object")
        for name, value in body.items():
            expect(name in ATTRIBUTES[entity] and name != "id", f"unknown attribute {name}")
            allowed = ENUMS.get((entity, name))
            expect(allowed is None or value in allowed, f"{name}: {value!r} is not an option")
            if name in ("dateStart", "dateEnd") and value is not None:
                expect(isinstance(value, str) and DATETIME.match(value) is not None,
                       f"{name} must be 'YYYY-MM-DD HH:MM:SS' (UTC)")
        if "duration" in body:
            expect(isinstance(body["duration"], int) and not isinstance(body["duration"], bool),
                   "duration is a number of seconds")
        if body.get("parentId") is not None:
            parent = body.get("parentType")
            expect(parent in ("Contact", "Lead", "Account"), "parentType must name an entity")
            expect(body["parentId"] in self.rows.get(str(parent), {}),
                   f"parentId is not a {parent}")
        if body.get("assignedUserId") is not None:
            expect(body["assignedUserId"] in self.owner_ids.values(), "no such user")
        if entity == "Call" and "dateStart" in body and "dateEnd" in body:
            start = datetime.strptime(body["dateStart"], "%Y-%m-%d %H:%M:%S")
            end = datetime.strptime(body["dateEnd"], "%Y-%m-%d %H:%M:%S")
            expect(end >= start, "dateEnd is before dateStart")
        return body

    # --- what the tests read ----------------------------------------------------------

    def created(self, what: str) -> list[dict[str, Any]]:
        """Objects the connector created, in a vendor-neutral summary."""
        entity = {"lead": "Lead", "call": "Call", "task": "Task"}[what]
        return [{"id": oid, "on": r.get("parentId"), "owner": r.get("assignedUserId"),
                 "phone": r.get("phoneNumber"), "outcome": r.get("status"),
                 "duration_s": r.get("duration"), "text": str(r)}
                for oid, r in self.rows[entity].items() if oid not in self.seeded]

    @staticmethod
    def outcome(neutral: str) -> str:
        """The Call status the preset should send."""
        return "Held" if neutral == "answered" else "Not Held"

    def disposition(self, oid: str) -> dict[str, Any]:
        """A Call's disposition field (none: it is in the text) and its description."""
        return {"value": None, "text": self.rows["Call"][oid].get("description")}

    @staticmethod
    def disposition_value(code: str) -> None:
        """EspoCRM's preset has no disposition field."""
        return None


def _where(entity: str, item: dict[str, str], row: dict[str, Any]) -> bool:
    expect(set(item) == {"type", "attribute", "value"}, f"where item {item} is incomplete")
    name, kind, value = item["attribute"], item["type"], item["value"]
    expect(name in ATTRIBUTES[entity], f"unknown attribute {name} in where")
    stored = row.get(name)
    if name == "phoneNumber":
        expect(kind in ("equals", "endsWith"), f"{kind} is not used on phoneNumber")
        wanted, have = digits(value), digits(stored)
        expect(len(wanted) >= 4, "phoneNumber filters need at least 4 digits")
        return bool(have) and (have == wanted if kind == "equals" else have.endswith(wanted))
    if kind == "equals":
        return stored == value
    if kind == "contains":
        expect(bool(value), "contains needs a value")
        return isinstance(stored, str) and value.lower() in stored.lower()
    if kind == "after":
        expect(DATETIME.match(value) is not None, "after takes 'YYYY-MM-DD HH:MM:SS'")
        return stored is not None and str(stored) > value
    raise Violation(f"where type {kind} is not modelled")


def make() -> EspoCrmFake:
    """A seeded EspoCRM fake (not started)."""
    return EspoCrmFake()


def config(fake: EspoCrmFake) -> dict[str, Any]:
    """The crm: section that points the espocrm preset at this fake."""
    return {"preset": "espocrm", "base_url": fake.url + "/api/v1", "auth": {"key": API_KEY}}


HAS_TAGS = True
RATE_LIMIT_STATUS = 429
#: An override that sends the start time in ISO 8601 (EspoCRM wants "YYYY-MM-DD HH:MM:SS").
BROKEN: dict[str, Any] = {"records": [{"name": "call", "body": {
    "dateStart": "{record.start | iso}"}}]}
#: The call's update: method, path prefix (the id follows), test of the body.
UPDATE: tuple[str, str, Any] = ("PUT", "/api/v1/Call/", None)
#: An update override that writes an attribute the Call entity does not have.
BROKEN_UPDATE: dict[str, Any] = {"records": [{"name": "call", "update": {"body": {
    "dispositionCode": "{record.disposition}"}}}]}
__all__ = ["BROKEN", "BROKEN_UPDATE", "HAS_TAGS", "RATE_LIMIT_STATUS", "UPDATE", "EspoCrmFake",
           "config", "digits", "make"]
