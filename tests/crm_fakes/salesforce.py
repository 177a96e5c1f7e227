"""Salesforce REST API (v59.0) on loopback, shaped by the REST API Developer Guide.

Endpoints under ``/services/data/v59.0``: ``GET /query?q=<SOQL>`` (``{totalSize, done,
records}``, each record with ``attributes {type, url}``; relationship fields nested),
``GET /search?q=<SOSL>`` (``{searchRecords}``), ``GET /sobjects/<Type>/<Id>``,
``POST /sobjects/<Type>`` (201 ``{id, success, errors}``), ``PATCH /sobjects/<Type>/<Id>``
(the fields to change; **204 No Content**, no body). OAuth access token as
``Authorization: Bearer``. Errors are a JSON list of ``{message, errorCode, fields}``
(``MALFORMED_QUERY``, ``INVALID_FIELD``, ``REQUIRED_FIELD_MISSING``,
``INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST``, ``MALFORMED_ID``); an expired session is
401 ``INVALID_SESSION_ID``; the API request limit is **403** ``REQUEST_LIMIT_EXCEEDED``
(Salesforce does not answer 429).

The fake reads the SOQL and SOSL forms the preset uses (``SELECT fields FROM Type WHERE
Field = 'x' OR ... [ORDER BY f] [LIMIT n]``, ``FIND {term} IN PHONE FIELDS RETURNING
Type(fields) [LIMIT n]``) and refuses anything else with ``MALFORMED_QUERY``; every field
named must exist on the object, and a long text area (``Description``) cannot be filtered
on. SOQL reads the database (a new record is found at once); SOSL phone search ignores
formatting.
"""

from __future__ import annotations

import itertools
import re
from datetime import UTC, date, datetime
from typing import Any, ClassVar

from aiohttp import web

from tests.crm_fakes.base import OWNERS, PEOPLE, FakeCrm, Violation, check_query, digits, expect
from tests.crm_fakes.base import json_response as _json

TOKEN = "00Dxx0000001gPL!AQ4AQFakeSessionToken"
API = "/services/data/v59.0"
PREFIX = {"Contact": "003", "Lead": "00Q", "Task": "00T", "User": "005"}
FIELDS = {
    "Contact": {"Id", "Name", "FirstName", "LastName", "Phone", "MobilePhone", "OwnerId",
                "Customer_Tier__c", "Open_Cases__c", "Preferred_Language__c",
                "LastModifiedDate", "AccountId", "Account.AnnualRevenue", "Email"},
    "Lead": {"Id", "Name", "FirstName", "LastName", "Company", "Phone", "MobilePhone",
             "OwnerId", "Status", "LeadSource", "LastModifiedDate", "AnnualRevenue",
             "Description"},
    "Task": {"Id", "Subject", "Status", "Priority", "ActivityDate", "TaskSubtype", "CallType",
             "CallDurationInSeconds", "CallDisposition", "CallObject", "WhoId", "WhatId",
             "OwnerId", "Description"},
}
PICKLISTS = {
    ("Task", "Status"): {"Not Started", "In Progress", "Completed", "Waiting on someone else",
                         "Deferred"},
    ("Task", "Priority"): {"High", "Normal", "Low"},
    ("Task", "CallType"): {"Internal", "Inbound", "Outbound"},
    ("Task", "TaskSubtype"): {"Task", "Email", "ListEmail", "Cadence", "Call", "LinkedIn"},
    ("Lead", "LeadSource"): {"Web", "Phone Inquiry", "Partner Referral", "Purchased List",
                             "Other"},
    ("Lead", "Status"): {"Open - Not Contacted", "Working - Contacted", "Closed - Converted",
                         "Closed - Not Converted"},
}
REQUIRED = {"Lead": {"LastName", "Company"}, "Task": set()}
#: Text field lengths (STRING_TOO_LONG beyond).
LENGTHS = {"CallDisposition": 255, "Subject": 255, "CallObject": 255, "Description": 32000}
#: Long text areas: selectable, but SOQL refuses them in WHERE.
LONG_TEXT = {"Description"}
_SELECT = re.compile(
    r"^SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<type>\w+)\s+WHERE\s+(?P<where>.+?)"
    r"(?:\s+ORDER\s+BY\s+(?P<order>[\w.]+)(?:\s+(?:ASC|DESC))?)?(?:\s+LIMIT\s+(?P<limit>\d+))?$",
    re.S)
_COND = re.compile(r"^(?P<field>[\w.]+)\s*(?P<op>=|>)\s*(?P<value>'(?:[^'\\]|\\.)*'|[\w:.+-]+)$")
_SOSL = re.compile(
    r"^FIND\s+\{(?P<term>[^}]*)\}\s+IN\s+PHONE\s+FIELDS\s+RETURNING\s+(?P<type>\w+)"
    r"\((?P<fields>[^)]*)\)(?:\s+LIMIT\s+(?P<limit>\d+))?$", re.S)


class SalesforceFake(FakeCrm):
    """Salesforce REST (see the module doc)."""

    NAME: ClassVar[str] = "salesforce"
    SECONDARY_KIND: ClassVar[str] = "lead"

    def __init__(self) -> None:
        super().__init__()
        self._seq = itertools.count(1)
        self.rows: dict[str, dict[str, dict[str, Any]]] = {"Contact": {}, "Lead": {},
                                                          "Task": {}}
        self.owner_ids = {key: self._id("User") for key in OWNERS}
        self.ids: dict[str, str] = {}
        for person in PEOPLE:
            kind = "Lead" if person.kind == "lead" else "Contact"
            row: dict[str, Any] = {
                "FirstName": person.first, "LastName": person.last,
                "Name": f"{person.first} {person.last}", "Phone": person.phone,
                "MobilePhone": None, "OwnerId": self.owner_ids.get(person.owner or ""),
                "LastModifiedDate": person.updated.replace("Z", ".000+0000"),
            }
            if kind == "Contact":
                row.update(Customer_Tier__c=person.tier, Open_Cases__c=float(person.tickets),
                           Preferred_Language__c=person.language, Email=None,
                           AccountId="001000000000001AAA",
                           Account={"attributes": {"type": "Account",
                                                   "url": f"{API}/sobjects/Account/001"},
                                    "AnnualRevenue": person.value})
            else:
                row.update(Company="Wang Fang Trading", Status="Open - Not Contacted",
                           LeadSource="Web", AnnualRevenue=person.value)
            self.ids[person.key] = self._insert(kind, row)
        self.seeded = set(self.ids.values())

    def _id(self, kind: str) -> str:
        return f"{PREFIX[kind]}{next(self._seq):012d}AAA"

    def _insert(self, kind: str, row: dict[str, Any]) -> str:
        oid = self._id(kind)
        self.rows[kind][oid] = {"Id": oid, **row}
        return oid

    # --- protocol --------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(f"{API}/query", self.query)
        router.add_get(f"{API}/search", self.search)
        router.add_get(API + "/sobjects/{type}/{id}", self.get)
        router.add_post(API + "/sobjects/{type}", self.create)
        router.add_patch(API + "/sobjects/{type}/{id}", self.update)

    def check_auth(self, request: web.Request) -> str | None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return "Session expired or invalid"
        return None

    def error_response(self, status: int, why: str) -> web.StreamResponse:
        code = {401: "INVALID_SESSION_ID", 404: "NOT_FOUND",
                500: "UNKNOWN_EXCEPTION"}.get(status, "INVALID_FIELD")
        if why.startswith(("MALFORMED_QUERY", "REQUIRED_FIELD_MISSING", "MALFORMED_ID",
                           "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", "INVALID_TYPE",
                           "STRING_TOO_LONG", "INVALID_FIELD_FOR_INSERT_UPDATE")):
            code, _, why = why.partition(": ")
        return _json([{"message": why, "errorCode": code, "fields": []}], status=status)

    def rate_limit_response(self) -> web.StreamResponse:
        return _json([{"message": "TotalRequests Limit exceeded.",
                       "errorCode": "REQUEST_LIMIT_EXCEEDED"}], status=403)

    # --- handlers --------------------------------------------------------------------

    async def query(self, request: web.Request) -> web.StreamResponse:
        q = check_query(request, {"q"}, {"q"})["q"]
        match = _SELECT.match(q.strip())
        expect(match is not None, f"MALFORMED_QUERY: cannot read {q!r}")
        assert match is not None
        kind = match["type"]
        expect(kind in FIELDS, f"INVALID_TYPE: sObject type '{kind}' is not supported")
        fields = [f.strip() for f in match["fields"].split(",")]
        for name in fields + ([match["order"]] if match["order"] else []):
            expect(name in FIELDS[kind], f"No such column '{name}' on entity '{kind}'")
        rows = [r for r in self.rows[kind].values() if _where(kind, match["where"], r)]
        if match["order"]:
            rows.sort(key=lambda r: str(r.get(match["order"]) or ""))
        if match["limit"]:
            rows = rows[:int(match["limit"])]
        return _json({"totalSize": len(rows), "done": True,
                      "records": [_public(kind, r, fields) for r in rows]})

    async def search(self, request: web.Request) -> web.StreamResponse:
        q = check_query(request, {"q"}, {"q"})["q"]
        match = _SOSL.match(q.strip())
        expect(match is not None, f"MALFORMED_QUERY: cannot read {q!r}")
        assert match is not None
        kind, term = match["type"], digits(match["term"])
        expect(kind in FIELDS, f"INVALID_TYPE: sObject type '{kind}' is not supported")
        expect(len(term) >= 2, "MALFORMED_QUERY: search term must be longer than one character")
        fields = [f.strip() for f in match["fields"].split(",")]
        for name in fields:
            expect(name in FIELDS[kind], f"No such column '{name}' on entity '{kind}'")
        rows = [r for r in self.rows[kind].values()
                if any(term in digits(r.get(f)) for f in ("Phone", "MobilePhone") if r.get(f))]
        if match["limit"]:
            rows = rows[:int(match["limit"])]
        return _json({"searchRecords": [_public(kind, r, fields) for r in rows]})

    async def get(self, request: web.Request) -> web.StreamResponse:
        kind, oid = request.match_info["type"], request.match_info["id"]
        query = check_query(request, {"fields"})
        expect(kind in FIELDS, f"INVALID_TYPE: sObject type '{kind}' is not supported")
        row = self.rows[kind].get(oid)
        if row is None:
            return _json([{"errorCode": "NOT_FOUND",
                           "message": "The requested resource does not exist"}], status=404)
        fields = [f for f in query.get("fields", "").split(",") if f] or sorted(
            f for f in FIELDS[kind] if "." not in f)
        for name in fields:
            expect(name in FIELDS[kind], f"No such column '{name}' on entity '{kind}'")
        return _json(_public(kind, row, fields))

    async def create(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["type"]
        check_query(request, set())
        expect(kind in ("Lead", "Task"), f"INVALID_TYPE: cannot create {kind} here")
        body = self._fields(kind, await request.json())
        missing = sorted(f for f in REQUIRED[kind] if not body.get(f))
        expect(not missing, f"REQUIRED_FIELD_MISSING: Required fields are missing: {missing}")
        oid = self._insert(kind, dict(body))
        return _json({"id": oid, "success": True, "errors": []}, status=201)

    async def update(self, request: web.Request) -> web.StreamResponse:
        kind, oid = request.match_info["type"], request.match_info["id"]
        check_query(request, set())
        expect(kind in ("Lead", "Task"), f"INVALID_TYPE: cannot update {kind} here")
        body = self._fields(kind, await request.json())
        row = self.rows[kind].get(oid)
        if row is None:
            return _json([{"errorCode": "NOT_FOUND",
                           "message": "The requested resource does not exist"}], status=404)
        for name in REQUIRED[kind]:
            expect(body.get(name, row.get(name)) not in (None, ""),
                   f"REQUIRED_FIELD_MISSING: Required fields are missing: [{name}]")
        row.update(body)
        self.record_change(kind, oid, row)
        return web.Response(status=204)

    def _fields(self, kind: str, body: Any) -> dict[str, Any]:
        """The fields of a create or update, checked as Salesforce does."""
        expect(isinstance(body, dict), "the body must be a JSON object")
        for name, value in body.items():
            expect(name in FIELDS[kind], f"No such column '{name}' on sobject of type {kind}")
            expect(name not in ("Id", "Name", "LastModifiedDate"),
                   f"INVALID_FIELD_FOR_INSERT_UPDATE: Unable to create/update fields: {name}")
            allowed = PICKLISTS.get((kind, name))
            expect(allowed is None or value in allowed,
                   f"INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST: {name}: bad value for "
                   f"restricted picklist field: {value}")
            expect(value is None or isinstance(value, str | int | float | bool),
                   f"INVALID_TYPE: {name} must be a scalar")
            expect(not isinstance(value, str) or len(value) <= LENGTHS.get(name, 255),
                   f"STRING_TOO_LONG: {name}: data value too large")
        if kind == "Task":
            self._check_task(body)
        return body

    def _check_task(self, body: dict[str, Any]) -> None:
        if "CallDurationInSeconds" in body:
            value = body["CallDurationInSeconds"]
            expect(isinstance(value, int) and not isinstance(value, bool),
                   "INVALID_TYPE: CallDurationInSeconds must be an integer")
        if "ActivityDate" in body:
            try:
                date.fromisoformat(str(body["ActivityDate"]))
            except ValueError:
                raise Violation(f"ActivityDate {body['ActivityDate']!r} is not YYYY-MM-DD") \
                    from None
        who = body.get("WhoId")
        if who is not None:
            expect(who in self.rows["Contact"] or who in self.rows["Lead"],
                   f"MALFORMED_ID: WhoId: id value of incorrect type: {who}")
        owner = body.get("OwnerId")
        if owner is not None:
            expect(owner in self.owner_ids.values(),
                   f"MALFORMED_ID: OwnerId: id value of incorrect type: {owner}")

    # --- what the tests read ----------------------------------------------------------

    def created(self, what: str) -> list[dict[str, Any]]:
        """Objects the connector created, in a vendor-neutral summary."""
        if what == "lead":
            rows = [r for i, r in self.rows["Lead"].items() if i not in self.seeded]
        else:
            rows = [r for r in self.rows["Task"].values()
                    if (r.get("TaskSubtype") == "Call") == (what == "call")]
        return [{"id": r["Id"], "on": r.get("WhoId"), "owner": r.get("OwnerId"),
                 "phone": r.get("Phone"), "outcome": r.get("CallDisposition"),
                 "duration_s": r.get("CallDurationInSeconds"),
                 "text": " ".join(str(v) for v in r.values() if v)} for r in rows]

    @staticmethod
    def outcome(neutral: str) -> str:
        """The CallDisposition the preset should send."""
        return {"answered": "Connected", "missed": "No answer", "busy": "Busy",
                "voicemail": "Left voicemail"}.get(neutral, "No answer")

    def disposition(self, oid: str) -> dict[str, Any]:
        """A call Task's disposition field and its text (Description)."""
        row = self.rows["Task"][oid]
        return {"value": row.get("CallDisposition"), "text": row.get("Description")}

    @staticmethod
    def disposition_value(code: str) -> str:
        """The CallDisposition the preset sends for a callroute disposition code."""
        return {"resolved": "Resolved", "follow-up": "Needs follow-up", "sale": "Sale",
                "complaint": "Complaint", "wrong-number": "Wrong number"}.get(code, code)


def _where(kind: str, where: str, row: dict[str, Any]) -> bool:
    groups = [g.strip() for g in re.split(r"\s+OR\s+", where)]
    return any(all(_condition(kind, c.strip(), row) for c in re.split(r"\s+AND\s+", g))
               for g in groups)


def _condition(kind: str, text: str, row: dict[str, Any]) -> bool:
    match = _COND.match(text)
    expect(match is not None, f"MALFORMED_QUERY: unexpected condition {text!r}")
    assert match is not None
    name, op, raw = match["field"], match["op"], match["value"]
    expect(name in FIELDS[kind], f"No such column '{name}' on entity '{kind}'")
    expect(name not in LONG_TEXT, f"field '{name}' can not be filtered in a query call")
    value = row.get(name)
    if op == "=":
        expect(raw.startswith("'"), f"MALFORMED_QUERY: {name} needs a quoted value")
        wanted = raw[1:-1].replace("\\'", "'").replace("\\\\", "\\")
        return value is not None and str(value) == wanted
    expect(name == "LastModifiedDate" and not raw.startswith("'"),
           "MALFORMED_QUERY: > is used with an unquoted date-time literal")
    try:
        bound = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise Violation(f"MALFORMED_QUERY: {raw!r} is not a date-time literal") from None
    when = datetime.fromisoformat(str(value).replace(".000+0000", "+00:00"))
    return when > bound.astimezone(UTC)


def _public(kind: str, row: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"attributes": {"type": kind,
                                          "url": f"{API}/sobjects/{kind}/{row['Id']}"}}
    for name in fields:
        if "." in name:
            rel = name.split(".", 1)[0]
            out[rel] = row.get(rel)
        else:
            out[name] = row.get(name)
    return out


def make() -> SalesforceFake:
    """A seeded Salesforce fake (not started)."""
    return SalesforceFake()


def config(fake: SalesforceFake) -> dict[str, Any]:
    """The crm: section that points the salesforce preset at this fake."""
    return {"preset": "salesforce", "base_url": fake.url + API, "auth": {"token": TOKEN}}


#: The call's update: method, path prefix (the id follows), test of the body.
UPDATE: tuple[str, str, Any] = ("PATCH", f"{API}/sobjects/Task/", None)
HAS_TAGS = False
RATE_LIMIT_STATUS = 403
#: An override that sends the call's duration as text (the field is an integer).
BROKEN: dict[str, Any] = {"records": [{"name": "call", "body": {
    "CallDurationInSeconds": "{record.talk_s | int | str}"}}]}
#: An update override that writes a field the org does not have.
BROKEN_UPDATE: dict[str, Any] = {"records": [{"name": "call", "update": {"body": {
    "Disposition__c": "{record.disposition}"}}}]}
__all__ = ["BROKEN", "BROKEN_UPDATE", "HAS_TAGS", "RATE_LIMIT_STATUS", "UPDATE", "SalesforceFake",
           "config", "digits", "make"]
