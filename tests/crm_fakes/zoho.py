"""Zoho CRM REST API (v7) on loopback, shaped by Zoho's API reference.

Endpoints under ``/crm/v7``: ``GET /{module}/search?criteria=...`` (``{data, info}``, or
**204 No Content** when nothing matches), ``GET /Contacts`` (a page of records;
``If-Modified-Since`` → **304** when nothing changed; ``info.next_page_token``),
``GET /{module}/{id}`` and ``POST /{module}`` with ``{"data": [record]}`` (201 ``{"data":
[{"code": "SUCCESS", "details": {"id", ...}, "message": "record added", "status":
"success"}]}``), ``PUT /{module}/{id}`` (and ``PUT /{module}`` with an ``id`` in each
record) with ``{"data": [fields to change]}`` (200 ``{"data": [{"code": "SUCCESS", "details":
{"id", "Modified_Time", ...}, "message": "record updated", "status": "success"}]}``; an
unknown id is 400 ``INVALID_DATA``). Auth: ``Authorization: Zoho-oauthtoken <token>``.
Errors: ``{"code", "details", "message", "status": "error"}`` (``INVALID_QUERY``,
``INVALID_TOKEN``); an insert with a bad field answers 400 with that object inside ``data``
(``MANDATORY_NOT_FOUND``, ``INVALID_DATA``). The rate limit is 429 ``TOO_MANY_REQUESTS``.

Criteria: ``((Field:equals:value)or(Field:starts_with:value))``; parentheses and commas
inside a value must be escaped with a backslash; ``equals`` compares the stored text.

COQL (``POST /coql`` with ``{"select_query": "select f, ... from Module where ...
limit n"}``; scope ``ZohoCRM.coql.READ``): the fake reads ``=`` comparisons joined by
``and``, in brackets when there are two or more, on any field but a multi-line one
(``Description``: "cannot be used in criteria"); a date-time compares as an instant, a
date as ``yyyy-MM-dd``. It reads the database: a new record is found at once. The answer
is ``{"data": [...], "info": {"count", "more_records"}}`` with the selected fields and
``id``, or **204** when nothing matches.
"""

from __future__ import annotations

import itertools
import re
from datetime import date, datetime
from typing import Any, ClassVar

from aiohttp import web

from tests.crm_fakes.base import OWNERS, PEOPLE, FakeCrm, Violation, check_query, digits, expect
from tests.crm_fakes.base import json_response as _json

TOKEN = "1000.fake.oauth.token"
API = "/crm/v7"
MODULE_FIELDS = {
    "Contacts": {"id", "First_Name", "Last_Name", "Full_Name", "Phone", "Mobile", "Owner",
                 "Customer_Tier", "Annual_Revenue", "Open_Tickets", "Language", "Tag",
                 "Modified_Time", "Email"},
    "Leads": {"id", "First_Name", "Last_Name", "Full_Name", "Company", "Phone", "Mobile", "Owner",
              "Lead_Source", "Lead_Status", "Annual_Revenue", "Modified_Time", "Description"},
    "Calls": {"id", "Subject", "Call_Type", "Call_Start_Time", "Call_Duration", "Who_Id",
              "What_Id", "$se_module", "Owner", "Description", "Call_Result"},
    "Tasks": {"id", "Subject", "Due_Date", "Status", "Priority", "Who_Id", "What_Id",
              "$se_module", "Owner", "Description"},
}
PICKLISTS = {
    ("Calls", "Call_Type"): {"Outbound", "Inbound", "Missed"},
    ("Tasks", "Status"): {"Not Started", "Deferred", "In Progress", "Completed",
                          "Waiting for input"},
    ("Tasks", "Priority"): {"High", "Highest", "Low", "Lowest", "Normal"},
    ("Leads", "Lead_Source"): {"Advertisement", "Cold Call", "Employee Referral",
                               "External Referral", "Online Store", "Partner", "Public Relations",
                               "Sales Email Alias", "Seminar Partner", "Internal Seminar",
                               "Trade Show", "Web Download", "Web Research", "Chat"},
}
REQUIRED = {"Leads": {"Last_Name"}, "Calls": {"Subject", "Call_Type", "Call_Start_Time"},
            "Tasks": {"Subject"}}
_CRITERION = re.compile(
    r"\((?P<field>[\w$]+):(?P<op>equals|starts_with):(?P<value>(?:\\.|[^()\\])*)\)")
_COQL = re.compile(r"^select\s+(?P<fields>.+?)\s+from\s+(?P<module>\w+)\s+where\s+"
                   r"(?P<where>.+?)(?:\s+limit\s+(?P<limit>\d+))?$", re.I | re.S)
_COQL_EQ = re.compile(r"^(?P<field>\w+)\s*=\s*'(?P<value>(?:[^'\\]|\\.)*)'$")
#: Multi-line fields: selectable, never in COQL criteria.
MULTI_LINE = {"Description"}
DATETIME_FIELDS = {"Call_Start_Time", "Modified_Time"}


class ZohoFake(FakeCrm):
    """Zoho CRM v7 (see the module doc)."""

    NAME: ClassVar[str] = "zoho"
    SECONDARY_KIND: ClassVar[str] = "lead"

    def __init__(self) -> None:
        super().__init__()
        self._seq = itertools.count(1)
        self.rows: dict[str, dict[str, dict[str, Any]]] = {m: {} for m in MODULE_FIELDS}
        self.owner_ids = {key: f"34770610000000{i:05d}" for i, key in enumerate(OWNERS, 1)}
        self.ids: dict[str, str] = {}
        for person in PEOPLE:
            module = "Leads" if person.kind == "lead" else "Contacts"
            owner = person.owner or ""
            row: dict[str, Any] = {
                "First_Name": person.first, "Last_Name": person.last,
                "Full_Name": f"{person.first} {person.last}", "Phone": person.phone,
                "Mobile": None, "Annual_Revenue": person.value,
                "Owner": {"name": " ".join(OWNERS[owner][:2]), "id": self.owner_ids[owner],
                          "email": f"{owner}@example.com"} if owner else None,
                "Modified_Time": person.updated.replace("Z", "+00:00"),
            }
            if module == "Contacts":
                row.update(Customer_Tier=person.tier, Open_Tickets=person.tickets,
                           Language=person.language, Email=None,
                           Tag=[{"name": t, "id": f"TAG{i}"} for i, t in enumerate(person.tags)])
            else:
                row.update(Company="Wang Fang Trading", Lead_Source="Web Download")
            self.ids[person.key] = self._insert(module, row)
        self.seeded = set(self.ids.values())

    def _insert(self, module: str, row: dict[str, Any]) -> str:
        oid = f"3477061000000{next(self._seq):06d}"
        self.rows[module][oid] = {"id": oid, **row}
        return oid

    # --- protocol --------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post(API + "/coql", self.coql)
        router.add_get(API + "/{module}/search", self.search)
        router.add_get(API + "/Contacts", self.changed)
        router.add_get(API + "/{module}/{id}", self.get)
        router.add_post(API + "/{module}", self.create)
        router.add_put(API + "/{module}/{id}", self.update)
        router.add_put(API + "/{module}", self.update)

    def check_auth(self, request: web.Request) -> str | None:
        if request.headers.get("Authorization") != f"Zoho-oauthtoken {TOKEN}":
            return "invalid oauth token"
        return None

    def error_response(self, status: int, why: str) -> web.StreamResponse:
        code = {401: "INVALID_TOKEN", 404: "INVALID_URL_PATTERN",
                500: "INTERNAL_ERROR"}.get(status, "INVALID_QUERY")
        if why.startswith(("MANDATORY_NOT_FOUND", "INVALID_DATA")):
            code, _, why = why.partition(": ")
            return _json({"data": [{"code": code, "details": {}, "message": why,
                                    "status": "error"}]}, status=status)
        return _json({"code": code, "details": {}, "message": why, "status": "error"},
                     status=status)

    def rate_limit_response(self) -> web.StreamResponse:
        return _json({"code": "TOO_MANY_REQUESTS", "details": {},
                      "message": "API call limit exceeded", "status": "error"}, status=429,
                     headers={"Retry-After": str(self.RETRY_AFTER),
                              "X-RATELIMIT-LIMIT": "100", "X-RATELIMIT-REMAINING": "0"})

    # --- handlers --------------------------------------------------------------------

    def _module(self, request: web.Request) -> str:
        module = request.match_info["module"]
        if module not in MODULE_FIELDS:
            raise web.HTTPNotFound()
        return module

    async def search(self, request: web.Request) -> web.StreamResponse:
        module = self._module(request)
        query = check_query(request, {"criteria", "phone", "email", "word", "page", "per_page",
                                      "fields"})
        expect(sum(k in query for k in ("criteria", "phone", "email", "word")) == 1,
               "give exactly one of criteria, phone, email, word")
        rows = list(self.rows[module].values())
        if "phone" in query:
            wanted = digits(query["phone"])
            rows = [r for r in rows if any(digits(r.get(f)) == wanted
                                           for f in ("Phone", "Mobile") if r.get(f))]
        else:
            expect("criteria" in query, "only criteria and phone searches are modelled")
            rows = [r for r in rows if _criteria(module, query["criteria"], r)]
        if not rows:
            return web.Response(status=204)
        per_page = int(query.get("per_page", "200"))
        return _json({"data": rows[:per_page],
                      "info": {"per_page": per_page, "count": min(len(rows), per_page),
                               "page": 1, "more_records": len(rows) > per_page}})

    async def coql(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        body = await request.json()
        expect(isinstance(body, dict) and set(body) == {"select_query"}
               and isinstance(body["select_query"], str), "the body is {\"select_query\": ...}")
        match = _COQL.match(body["select_query"].strip())
        expect(match is not None, f"syntax error in {body['select_query']!r}")
        assert match is not None
        module = match["module"]
        expect(module in MODULE_FIELDS, f"invalid module {module}")
        fields = [f.strip() for f in match["fields"].split(",")]
        for name in fields:
            expect(name in MODULE_FIELDS[module], f"invalid column {name} in select")
        conditions = _coql_where(match["where"].strip())
        for name, _ in conditions:
            expect(name in MODULE_FIELDS[module], f"invalid column {name} in where")
            expect(name not in MULTI_LINE, f"{name}: multi-line fields cannot be used in "
                                           "criteria")
        limit = int(match["limit"] or 200)
        expect(1 <= limit <= 2000, "limit must be 1..2000")
        rows = [r for r in self.rows[module].values()
                if all(_coql_equal(n, r.get(n), v) for n, v in conditions)]
        if not rows:
            return web.Response(status=204)
        return _json({"data": [{k: r.get(k) for k in ["id", *fields]} for r in rows[:limit]],
                      "info": {"count": min(len(rows), limit),
                               "more_records": len(rows) > limit}})

    async def changed(self, request: web.Request) -> web.StreamResponse:
        query = check_query(request, {"fields", "sort_by", "sort_order", "per_page",
                                      "page_token", "page"}, {"fields"})
        for name in query["fields"].split(","):
            expect(name in MODULE_FIELDS["Contacts"], f"invalid field {name}")
        since_text = request.headers.get("If-Modified-Since")
        rows = list(self.rows["Contacts"].values())
        if since_text:
            since = datetime.fromisoformat(since_text.replace("Z", "+00:00"))
            rows = [r for r in rows if datetime.fromisoformat(r["Modified_Time"]) > since]
            if not rows:
                return web.Response(status=304)
        rows.sort(key=lambda r: r["Modified_Time"])
        fields = query["fields"].split(",")
        return _json({"data": [{k: r.get(k) for k in ["id", *fields]} for r in rows],
                      "info": {"per_page": 200, "count": len(rows), "page": 1,
                               "next_page_token": None, "more_records": False}})

    async def get(self, request: web.Request) -> web.StreamResponse:
        module = self._module(request)
        check_query(request, {"fields"})
        row = self.rows[module].get(request.match_info["id"])
        if row is None:
            return web.Response(status=204)
        return _json({"data": [row]})

    def _record(self, module: str, body: Any, keys: set[str]) -> dict[str, Any]:
        """The one record of a ``{"data": [record]}`` body, its fields checked."""
        expect(isinstance(body, dict) and set(body) <= keys, "the body is {\"data\": [records]}")
        data = body.get("data")
        expect(isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict),
               "data must be a list of one record")
        record: dict[str, Any] = data[0]
        for name, value in record.items():
            expect(name in MODULE_FIELDS[module], f"INVALID_DATA: invalid field {name}")
            allowed = PICKLISTS.get((module, name))
            expect(allowed is None or value in allowed, f"INVALID_DATA: invalid value {value!r} "
                                                        f"for {name}")
        self._check_links(module, record)
        return record

    async def create(self, request: web.Request) -> web.StreamResponse:
        module = self._module(request)
        check_query(request, set())
        record = self._record(module, await request.json(),
                              {"data", "trigger", "duplicate_check_fields"})
        expect("id" not in record, "INVALID_DATA: invalid field id")
        missing = sorted(f for f in REQUIRED.get(module, set()) if not record.get(f))
        expect(not missing, f"MANDATORY_NOT_FOUND: required field not found: {missing}")
        oid = self._insert(module, dict(record))
        return _json({"data": [{"code": "SUCCESS", "details": {
            "Modified_Time": "2025-03-03T10:30:00+08:00", "Created_Time":
            "2025-03-03T10:30:00+08:00", "id": oid,
            "Created_By": {"name": "API", "id": self.owner_ids["o1"]},
            "Modified_By": {"name": "API", "id": self.owner_ids["o1"]}},
            "message": "record added", "status": "success"}]}, status=201)

    async def update(self, request: web.Request) -> web.StreamResponse:
        module = self._module(request)
        check_query(request, set())
        record = dict(self._record(module, await request.json(), {"data", "trigger"}))
        oid = request.match_info.get("id") or str(record.get("id") or "")
        expect(str(record.pop("id", oid)) == oid, "INVALID_DATA: the id in data is not the "
                                                  "record's in the URL")
        row = self.rows[module].get(oid)
        if row is None:
            return _json({"data": [{"code": "INVALID_DATA", "details": {"id": oid},
                                    "message": "the id given seems to be invalid",
                                    "status": "error"}]}, status=400)
        for name in REQUIRED.get(module, set()):
            expect(record.get(name, row.get(name)) not in (None, ""),
                   f"MANDATORY_NOT_FOUND: required field not found: ['{name}']")
        row.update(record)
        self.record_change(module, oid, row)
        return _json({"data": [{"code": "SUCCESS", "details": {
            "Modified_Time": "2025-03-03T10:35:00+08:00", "Created_Time":
            "2025-03-03T10:30:00+08:00", "id": oid,
            "Created_By": {"name": "API", "id": self.owner_ids["o1"]},
            "Modified_By": {"name": "API", "id": self.owner_ids["o1"]}},
            "message": "record updated", "status": "success"}]})

    def _check_links(self, module: str, record: dict[str, Any]) -> None:
        if "Call_Start_Time" in record:
            try:
                when = datetime.fromisoformat(str(record["Call_Start_Time"]))
            except ValueError:
                raise Violation("INVALID_DATA: Call_Start_Time is not yyyy-MM-ddTHH:mm:ss±HH:mm") \
                    from None
            expect(when.tzinfo is not None and "." not in str(record["Call_Start_Time"]),
                   "INVALID_DATA: Call_Start_Time needs an offset and no fraction")
        if "Call_Duration" in record:
            expect(re.fullmatch(r"\d{2,}:\d{2}", str(record["Call_Duration"])) is not None,
                   "INVALID_DATA: Call_Duration must be mm:ss")
        if "Due_Date" in record:
            try:
                date.fromisoformat(str(record["Due_Date"]))
            except ValueError:
                raise Violation("INVALID_DATA: Due_Date must be yyyy-MM-dd") from None
        who = record.get("Who_Id")
        if who is not None:
            expect(isinstance(who, dict) and who.get("id") in self.rows["Contacts"],
                   "INVALID_DATA: Who_Id must be {\"id\": <contact id>}")
        what = record.get("What_Id")
        if what is not None:
            module_of = record.get("$se_module")
            expect(module_of in ("Leads", "Accounts", "Deals"),
                   "INVALID_DATA: What_Id needs $se_module")
            expect(isinstance(what, dict) and what.get("id") in self.rows.get(str(module_of), {}),
                   f"INVALID_DATA: What_Id is not a record of {module_of}")
        owner = record.get("Owner")
        if owner is not None:
            expect(isinstance(owner, dict) and owner.get("id") in self.owner_ids.values(),
                   "INVALID_DATA: Owner must be {\"id\": <user id>}")

    # --- what the tests read ----------------------------------------------------------

    def created(self, what: str) -> list[dict[str, Any]]:
        """Objects the connector created, in a vendor-neutral summary."""
        module = {"lead": "Leads", "call": "Calls", "task": "Tasks"}[what]
        out = []
        for oid, r in self.rows[module].items():
            if oid in self.seeded:
                continue
            link = r.get("Who_Id") or r.get("What_Id") or {}
            duration = r.get("Call_Duration")
            out.append({"id": oid, "on": link.get("id"),
                        "owner": (r.get("Owner") or {}).get("id"), "phone": r.get("Phone"),
                        "outcome": r.get("Call_Type"),
                        "duration_s": (int(duration.split(":")[0]) * 60
                                       + int(duration.split(":")[1])) if duration else None,
                        "text": " ".join(str(v) for v in r.values() if v)})
        return out

    @staticmethod
    def outcome(neutral: str) -> str:
        """The Call_Type the preset should send."""
        return "Inbound" if neutral == "answered" else "Missed"

    def disposition(self, oid: str) -> dict[str, Any]:
        """A call's disposition field (none: the preset writes it in the text) and its
        text (Description)."""
        return {"value": None, "text": self.rows["Calls"][oid].get("Description")}

    @staticmethod
    def disposition_value(code: str) -> None:
        """Zoho's preset has no disposition field."""
        return None


def _criteria(module: str, text: str, row: dict[str, Any]) -> bool:
    inner = text.strip()
    expect(inner.startswith("(") and inner.endswith(")"), f"criteria {text!r} is not (...)")
    parts = _CRITERION.findall(inner)
    expect(bool(parts), f"cannot read criteria {text!r}")
    rebuilt = "or".join(f"({f}:{o}:{v})" for f, o, v in parts)
    expect(inner in (rebuilt, f"({rebuilt})"), f"only or-ed criteria are modelled: {text!r}")
    for field, op, raw in parts:
        expect(field in MODULE_FIELDS[module], f"invalid field {field} in criteria")
        value = re.sub(r"\\(.)", r"\1", raw)
        stored = row.get(field)
        if stored is None:
            continue
        if (op == "equals" and str(stored) == value) or (
                op == "starts_with" and str(stored).startswith(value)):
            return True
    return False


def _coql_where(text: str) -> list[tuple[str, str]]:
    """The ``field = 'value'`` conditions of a COQL criteria (and-ed)."""
    inner = text
    if inner.startswith("(") and inner.endswith(")"):
        inner = inner[1:-1].strip()
    parts = [p.strip() for p in re.split(r"\s+and\s+(?=\w+\s*=)", inner, flags=re.I)]
    expect(len(parts) == 1 or text.startswith("("),
           "criteria with two or more conditions must be in brackets")
    out = []
    for part in parts:
        found = _COQL_EQ.match(part)
        expect(found is not None, f"only field = 'value' criteria are modelled: {part!r}")
        assert found is not None
        out.append((found["field"], re.sub(r"\\(.)", r"\1", found["value"])))
    return out


def _coql_equal(name: str, stored: Any, wanted: str) -> bool:
    if stored is None:
        return False
    if name in DATETIME_FIELDS:
        try:
            return datetime.fromisoformat(str(stored)) == datetime.fromisoformat(wanted)
        except ValueError:
            raise Violation(f"{name}: {wanted!r} is not yyyy-MM-ddTHH:mm:ss±HH:mm") from None
    return str(stored) == wanted


def make() -> ZohoFake:
    """A seeded Zoho fake (not started)."""
    return ZohoFake()


def config(fake: ZohoFake) -> dict[str, Any]:
    """The crm: section that points the zoho preset at this fake."""
    return {"preset": "zoho", "base_url": fake.url + API,
            "auth": {"key": f"Zoho-oauthtoken {TOKEN}"}}


#: The call's update: method, path prefix (the id follows), test of the body.
UPDATE: tuple[str, str, Any] = ("PUT", f"{API}/Calls/", None)
HAS_TAGS = True
RATE_LIMIT_STATUS = 429
#: An override that sends the call's duration in seconds (Zoho wants mm:ss).
BROKEN: dict[str, Any] = {"records": [{"name": "call", "body": {"data": [{
    "Subject": "call", "Call_Type": "Inbound", "Call_Start_Time": "{record.start | iso_local}",
    "Call_Duration": "{record.talk_s | int | str}",
    "Description": "callroute {idempotency_key}"}]}}]}
#: An update override that sends a field beside data, not inside a record of it.
BROKEN_UPDATE: dict[str, Any] = {"records": [{"name": "call", "update": {"body": {
    "Description": "{record.disposition}"}}}]}
__all__ = ["BROKEN", "BROKEN_UPDATE", "HAS_TAGS", "RATE_LIMIT_STATUS", "UPDATE", "ZohoFake",
           "config", "digits", "make"]
