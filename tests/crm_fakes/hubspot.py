"""HubSpot CRM v3 on loopback, shaped by HubSpot's public OpenAPI specs
(CRM Contacts/Companies/Calls/Tasks v3, Owners v3) and the calls/tasks property docs.

Endpoints: ``POST /crm/v3/objects/{contacts,companies}/search``
(``PublicObjectSearchRequest`` → ``CollectionResponseWithTotalSimplePublicObject``),
``GET /crm/v3/objects/{type}/{id}`` (the default properties and those asked for in
``properties``), ``POST /crm/v3/objects/{contacts,calls,tasks}``
(``SimplePublicObjectInputForCreate``: ``properties`` (string values only) and
``associations``, both required → 201 ``SimplePublicObject``), ``PATCH
/crm/v3/objects/{type}/{id}`` (``SimplePublicObjectInput``: ``properties`` only; the
values given overwrite, "" clears; a read-only or non-existent property is an error →
200 ``SimplePublicObject``). Private-app tokens:
``Authorization: Bearer``. Errors are HubSpot's ``Error`` object (``category``,
``correlationId``, ``message``, ``errors``); the rate limit is 429 with the
``X-HubSpot-RateLimit-*`` headers, ``Retry-After`` and ``errorType: RATE_LIMIT``.

Search semantics: ``EQ`` compares the stored text exactly (numbers as typed), and a
date-time property (``hs_timestamp``, ``lastmodifieddate``) as an instant (the filter's
value in epoch milliseconds); ``hs_searchable_calculated_phone_number`` is the digits of
``phone`` without the country code, and ``CONTAINS_TOKEN`` with a leading ``*`` matches
its end. Contacts, companies, calls and tasks are searchable. The search index lags
(HubSpot: "it may take a few moments for newly created or updated objects to appear"):
an object created through the API shows in search ``index_lag_s`` after it was created.
"""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal

from aiohttp import web
from pydantic import Field

from tests.crm_fakes.base import (
    OWNERS,
    PEOPLE,
    FakeCrm,
    Strict,
    check,
    check_query,
    digits,
    expect,
    json_response,
)

TOKEN = "pat-na1-test-token"
OPERATORS = ("BETWEEN", "CONTAINS_TOKEN", "EQ", "GT", "GTE", "HAS_PROPERTY", "IN", "LT", "LTE",
             "NEQ", "NOT_CONTAINS_TOKEN", "NOT_HAS_PROPERTY", "NOT_IN")
CALL_STATUS = ("BUSY", "CALLING_CRM_USER", "CANCELED", "COMPLETED", "CONNECTING", "FAILED",
               "IN_PROGRESS", "NO_ANSWER", "QUEUED", "RINGING")
#: HubSpot's default call outcomes (hs_call_disposition GUIDs).
DISPOSITIONS = {
    "f240bbac-87c9-4f6e-bf70-924b57d47db7": "Connected",
    "73a0d17f-1163-4015-bdd5-ec830791da20": "No answer",
    "9d9162e7-6cf3-4944-bf63-4dff82258764": "Busy",
    "b2cf5968-551e-4856-9783-52b3da59a7d0": "Left voicemail",
    "a4c4c377-d246-4b32-a13b-75a56a4cd0ff": "Left live message",
    "17b47fee-58de-441e-a44c-c6300d46f273": "Wrong number",
}
#: Properties each object has in the test portal (custom ones included).
PROPERTIES = {
    "contacts": {"firstname", "lastname", "phone", "mobilephone", "email", "hubspot_owner_id",
                 "customer_tier", "total_revenue", "hs_language", "tags", "num_open_tickets",
                 "lifecyclestage", "hs_lead_status", "createdate", "lastmodifieddate",
                 "hs_object_id", "hs_searchable_calculated_phone_number",
                 "hs_searchable_calculated_mobile_number"},
    "companies": {"name", "phone", "hubspot_owner_id", "customer_tier", "total_revenue",
                  "createdate", "hs_lastmodifieddate", "hs_object_id"},
    "calls": {"hs_timestamp", "hs_call_title", "hs_call_body", "hs_call_direction",
              "hs_call_status", "hs_call_disposition", "hs_call_duration",
              "hs_call_from_number", "hs_call_to_number", "hs_call_recording_url",
              "hubspot_owner_id"},
    "tasks": {"hs_timestamp", "hs_task_subject", "hs_task_body", "hs_task_status",
              "hs_task_priority", "hs_task_type", "hubspot_owner_id"},
}
ENUMS = {
    ("calls", "hs_call_direction"): {"INBOUND", "OUTBOUND"},
    ("calls", "hs_call_status"): set(CALL_STATUS),
    ("calls", "hs_call_disposition"): set(DISPOSITIONS),
    ("tasks", "hs_task_status"): {"NOT_STARTED", "COMPLETED", "IN_PROGRESS", "WAITING",
                                  "DEFERRED"},
    ("tasks", "hs_task_priority"): {"NONE", "LOW", "MEDIUM", "HIGH"},
    ("tasks", "hs_task_type"): {"CALL", "EMAIL", "TODO"},
    ("contacts", "lifecyclestage"): {"subscriber", "lead", "marketingqualifiedlead",
                                     "salesqualifiedlead", "opportunity", "customer",
                                     "evangelist", "other"},
    ("contacts", "hs_lead_status"): {"NEW", "OPEN", "IN_PROGRESS", "OPEN_DEAL", "UNQUALIFIED",
                                     "ATTEMPTED_TO_CONTACT", "CONNECTED", "BAD_TIMING"},
}
#: HUBSPOT_DEFINED association types: (from, to-object) -> id.
ASSOCIATIONS = {("calls", "contacts"): 194, ("calls", "companies"): 182,
                ("tasks", "contacts"): 204, ("tasks", "companies"): 192}
#: Properties HubSpot sets itself: an update naming one is refused.
READ_ONLY = {"hs_object_id", "createdate", "lastmodifieddate", "hs_lastmodifieddate",
             "hs_searchable_calculated_phone_number", "hs_searchable_calculated_mobile_number"}
DEFAULT_PROPERTIES = {"contacts": ["createdate", "email", "firstname", "hs_object_id",
                                   "lastmodifieddate", "lastname"],
                      "companies": ["createdate", "domain", "hs_lastmodifieddate",
                                    "hs_object_id", "name"],
                      "calls": ["hs_object_id"], "tasks": ["hs_object_id"]}
#: Date-time properties: EQ, GT and GTE compare instants (values in epoch milliseconds).
DATETIMES = {"hs_timestamp", "lastmodifieddate", "createdate", "hs_lastmodifieddate"}


class Filter(Strict):
    propertyName: str
    operator: Literal[OPERATORS]  # type: ignore[valid-type]
    value: str | None = None
    values: list[str] | None = None
    highValue: str | None = None


class FilterGroup(Strict):
    filters: list[Filter] = Field(max_length=6)


class Sort(Strict):
    propertyName: str
    direction: Literal["ASCENDING", "DESCENDING"]


class SearchRequest(Strict):
    filterGroups: list[FilterGroup] = Field(max_length=5)
    properties: list[str]
    limit: int = Field(ge=1, le=200)
    after: str | None = None
    sorts: list[Sort | str] | None = None
    query: str | None = None


class ObjectId(Strict):
    id: str


class AssociationSpec(Strict):
    associationCategory: Literal["HUBSPOT_DEFINED", "INTEGRATOR_DEFINED", "USER_DEFINED"]
    associationTypeId: int


class Association(Strict):
    to: ObjectId
    types: list[AssociationSpec] = Field(min_length=1)


class CreateRequest(Strict):
    properties: dict[str, str]
    associations: list[Association]


class UpdateRequest(Strict):
    properties: dict[str, str]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _searchable(phone: str | None) -> str:
    if not phone:
        return ""
    number = digits(phone)
    if phone.strip().startswith("+"):  # drop the country code (one to three digits)
        for code in ("86", "44", "1"):
            if number.startswith(code):
                return number[len(code):]
    return number


class HubSpotFake(FakeCrm):
    """HubSpot CRM v3 (see the module doc)."""

    NAME: ClassVar[str] = "hubspot"
    SECONDARY_KIND: ClassVar[str] = "company"

    def __init__(self) -> None:
        super().__init__()
        self._ids = itertools.count(501)
        #: how long (s) an object created through the API stays out of search results
        self.index_lag_s = 0.0
        self._indexed: dict[str, float] = {}
        self.objects: dict[str, dict[str, dict[str, Any]]] = {
            "contacts": {}, "companies": {}, "calls": {}, "tasks": {}}
        self.owner_ids = {key: str(31000000 + i) for i, key in enumerate(OWNERS, 1)}
        self.ids: dict[str, str] = {}
        for person in PEOPLE:
            kind = "companies" if person.kind == "lead" else "contacts"
            props: dict[str, Any] = {
                "phone": person.phone, "hubspot_owner_id": self.owner_ids.get(person.owner or ""),
                "customer_tier": person.tier,
                "total_revenue": None if person.value is None else f"{person.value:.2f}",
                "lastmodifieddate": person.updated, "createdate": "2024-01-01T00:00:00Z",
            }
            if kind == "contacts":
                props.update(firstname=person.first, lastname=person.last,
                             hs_language=person.language, tags=";".join(person.tags) or None,
                             num_open_tickets=str(person.tickets), mobilephone=None,
                             email=f"{person.key}@example.com")
            else:
                props.update(name=f"{person.first} {person.last} Trading",
                             hs_lastmodifieddate=person.updated)
            self.ids[person.key] = self._store(kind, props, updated=person.updated)

    def _store(self, kind: str, props: dict[str, Any], associations: list[Any] | None = None,
               updated: str | None = None) -> str:
        oid = str(next(self._ids))
        self._indexed[oid] = time.monotonic() + (self.index_lag_s if updated is None else 0)
        props = {**props, "hs_object_id": oid}
        if kind == "contacts":
            props["hs_searchable_calculated_phone_number"] = _searchable(props.get("phone"))
            props["hs_searchable_calculated_mobile_number"] = _searchable(
                props.get("mobilephone"))
        self.objects[kind][oid] = {
            "id": oid, "properties": props, "createdAt": props.get("createdate") or _now(),
            "updatedAt": updated or _now(), "archived": False,
            "associations": associations or [],
        }
        return oid

    # --- protocol --------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/crm/v3/objects/{kind}/search", self.search)
        router.add_get("/crm/v3/objects/{kind}/{id}", self.get)
        router.add_post("/crm/v3/objects/{kind}", self.create)
        router.add_patch("/crm/v3/objects/{kind}/{id}", self.update)

    def check_auth(self, request: web.Request) -> str | None:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return "Authentication credentials not found."
        return None

    def error_response(self, status: int, why: str) -> web.StreamResponse:
        category = {400: "VALIDATION_ERROR", 401: "INVALID_AUTHENTICATION",
                    404: "OBJECT_NOT_FOUND"}.get(status, "INTERNAL_ERROR")
        body: dict[str, Any] = {"status": "error", "message": why,
                                "correlationId": str(uuid.uuid4()), "category": category}
        if status == 400:
            body["errors"] = [{"message": why, "code": "INVALID_OPTION"}]
        return json_response(body, status=status)

    def rate_limit_response(self) -> web.StreamResponse:
        return json_response(
            {"status": "error", "message": "You have reached your secondly limit.",
             "errorType": "RATE_LIMIT", "correlationId": str(uuid.uuid4()),
             "policyName": "SECONDLY", "groupName": "publicapi:private-app:test"},
            status=429,
            headers={"Retry-After": str(self.RETRY_AFTER),
                     "X-HubSpot-RateLimit-Interval-Milliseconds": "10000",
                     "X-HubSpot-RateLimit-Max": "190", "X-HubSpot-RateLimit-Remaining": "0",
                     "X-HubSpot-RateLimit-Secondly": "19",
                     "X-HubSpot-RateLimit-Secondly-Remaining": "0"})

    # --- handlers --------------------------------------------------------------------

    def _kind(self, request: web.Request, allowed: tuple[str, ...]) -> str:
        kind = request.match_info["kind"]
        if kind not in allowed:
            raise web.HTTPNotFound()
        return kind

    async def search(self, request: web.Request) -> web.StreamResponse:
        kind = self._kind(request, ("contacts", "companies", "calls", "tasks"))
        check_query(request, set())
        body = check(SearchRequest, await request.json(), "PublicObjectSearchRequest")
        for group in body.filterGroups:
            for flt in group.filters:
                expect(flt.propertyName in PROPERTIES[kind],
                       f"Property {flt.propertyName!r} does not exist on {kind}")
                expect(flt.value is not None or flt.operator in (
                    "HAS_PROPERTY", "NOT_HAS_PROPERTY", "IN", "NOT_IN"),
                       f"filter on {flt.propertyName} needs a value")
        now = time.monotonic()
        found = [obj for obj in self.objects[kind].values()
                 if self._indexed[obj["id"]] <= now and (not body.filterGroups or any(
                     all(_matches(obj, f) for f in g.filters) for g in body.filterGroups))]
        start = int(body.after or 0)
        page = found[start:start + body.limit]
        wanted = set(DEFAULT_PROPERTIES[kind]) | set(body.properties)
        result: dict[str, Any] = {"total": len(found),
                                  "results": [_public(o, wanted) for o in page]}
        if start + body.limit < len(found):
            after = str(start + body.limit)
            result["paging"] = {"next": {"after": after, "link": f"?after={after}"}}
        return json_response(result)

    async def get(self, request: web.Request) -> web.StreamResponse:
        kind = self._kind(request, ("contacts", "companies", "calls", "tasks"))
        query = check_query(request, {"properties", "archived", "associations", "idProperty"})
        obj = self.objects[kind].get(request.match_info["id"])
        if obj is None:
            return self.error_response(404, "Object not found")
        wanted = set(DEFAULT_PROPERTIES.get(kind, [])) | set(
            p for p in query.get("properties", "").split(",") if p)
        return json_response(_public(obj, wanted))

    def _check_properties(self, kind: str, props: dict[str, str]) -> None:
        for name, value in props.items():
            expect(name in PROPERTIES[kind], f"Property {name!r} does not exist on {kind}")
            allowed = ENUMS.get((kind, name))
            expect(allowed is None or value in allowed,
                   f"{value!r} is not a valid option for {name}")
        if "hs_timestamp" in props:
            _parse_time(props["hs_timestamp"])
        if kind == "calls" and "hs_call_duration" in props:
            expect(props["hs_call_duration"].isdigit(),
                   "hs_call_duration must be a number of milliseconds")
        if props.get("hubspot_owner_id") is not None:
            expect(props["hubspot_owner_id"] in self.owner_ids.values(),
                   f"owner {props['hubspot_owner_id']} does not exist")

    async def create(self, request: web.Request) -> web.StreamResponse:
        kind = self._kind(request, ("contacts", "calls", "tasks"))
        check_query(request, set())
        body = check(CreateRequest, await request.json(), "SimplePublicObjectInputForCreate")
        expect(kind not in ("calls", "tasks") or "hs_timestamp" in body.properties,
               "hs_timestamp is required")
        self._check_properties(kind, body.properties)
        for assoc in body.associations:
            to_kind = next((k for k in ("contacts", "companies")
                            if assoc.to.id in self.objects[k]), None)
            expect(to_kind is not None, f"association to unknown object {assoc.to.id}")
            for spec in assoc.types:
                expect(ASSOCIATIONS.get((kind, str(to_kind))) == spec.associationTypeId,
                       f"association type {spec.associationTypeId} is not {kind} to {to_kind}")
        oid = self._store(kind, dict(body.properties),
                          [a.model_dump() for a in body.associations])
        return json_response(_public(self.objects[kind][oid], set(body.properties)), status=201)

    async def update(self, request: web.Request) -> web.StreamResponse:
        kind = self._kind(request, ("contacts", "calls", "tasks"))
        check_query(request, {"idProperty"})
        body = check(UpdateRequest, await request.json(), "SimplePublicObjectInput")
        for name in body.properties:
            expect(name not in READ_ONLY, f"Property {name!r} is read-only")
        self._check_properties(kind, body.properties)
        obj = self.objects[kind].get(request.match_info["id"])
        if obj is None:
            return self.error_response(404, "Object not found")
        obj["properties"].update({k: (v if v != "" else None)
                                  for k, v in body.properties.items()})
        obj["updatedAt"] = _now()
        self.record_change(kind, obj["id"], obj["properties"])
        wanted = set(DEFAULT_PROPERTIES[kind]) | set(body.properties)
        return json_response(_public(obj, wanted))

    # --- what the tests read ----------------------------------------------------------

    def created(self, what: str) -> list[dict[str, Any]]:
        """Objects the connector created, in a vendor-neutral summary."""
        kind = {"lead": "contacts", "call": "calls", "task": "tasks"}[what]
        seeded = set(self.ids.values())
        out = []
        for oid, obj in self.objects[kind].items():
            if oid in seeded:
                continue
            props = obj["properties"]
            on = [a["to"]["id"] for a in obj["associations"]]
            out.append({"id": oid, "on": on[0] if on else None,
                        "owner": props.get("hubspot_owner_id"),
                        "phone": props.get("phone"),
                        "outcome": props.get("hs_call_status"),
                        "duration_s": (int(props["hs_call_duration"]) / 1000
                                       if props.get("hs_call_duration") else None),
                        "text": " ".join(str(v) for v in props.values() if v)})
        return out

    @staticmethod
    def outcome(neutral: str) -> str:
        """The hs_call_status the preset should send for a call record outcome."""
        return {"answered": "COMPLETED", "missed": "NO_ANSWER", "busy": "BUSY",
                "failed": "FAILED"}.get(neutral, "CANCELED")

    def disposition(self, oid: str) -> dict[str, Any]:
        """A call's disposition field (its outcome id) and its text (hs_call_body)."""
        props = self.objects["calls"][oid]["properties"]
        return {"value": props.get("hs_call_disposition"), "text": props.get("hs_call_body")}

    @staticmethod
    def disposition_value(code: str) -> str:
        """The hs_call_disposition the preset sends for a callroute disposition code."""
        return {"wrong-number": "17b47fee-58de-441e-a44c-c6300d46f273"}.get(
            code, "f240bbac-87c9-4f6e-bf70-924b57d47db7")


def _parse_time(value: str) -> None:
    if value.isdigit():
        return
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        expect(False, f"{value!r} is neither epoch milliseconds nor ISO 8601")


def _matches(obj: dict[str, Any], flt: Filter) -> bool:
    value = obj["properties"].get(flt.propertyName)
    if flt.operator == "EQ" and flt.propertyName in DATETIMES:
        expect(_ms(flt.value) is not None,
               f"{flt.propertyName} is a date-time: the value is epoch milliseconds")
        return value is not None and _ms(value) == _ms(flt.value)
    if flt.operator == "EQ":
        return value is not None and str(value) == flt.value
    if flt.operator == "CONTAINS_TOKEN":
        term = flt.value or ""
        text = str(value or "")
        if term.startswith("*"):
            return bool(text) and text.endswith(term[1:])
        return term.lower() in text.lower().split()
    if flt.operator in ("GT", "GTE"):
        when = _ms(value)
        bound = _ms(flt.value)
        return when is not None and bound is not None and (
            when > bound if flt.operator == "GT" else when >= bound)
    if flt.operator == "HAS_PROPERTY":
        return value not in (None, "")
    raise AssertionError(f"operator {flt.operator} not modelled by the fake")


def _ms(value: Any) -> int | None:
    if value is None:
        return None
    text = str(value)
    if text.isdigit():
        return int(text)
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _public(obj: dict[str, Any], wanted: set[str]) -> dict[str, Any]:
    props = {k: v for k, v in obj["properties"].items() if k in wanted}
    for name in wanted:
        props.setdefault(name, None)
    return {"id": obj["id"], "properties": props, "createdAt": obj["createdAt"],
            "updatedAt": obj["updatedAt"], "archived": obj["archived"]}


def config(fake: HubSpotFake) -> dict[str, Any]:
    """The crm: section that points the hubspot preset at this fake."""
    return {"preset": "hubspot", "base_url": fake.url, "auth": {"token": TOKEN}}


def make() -> HubSpotFake:
    """A seeded HubSpot fake (not started)."""
    return HubSpotFake()


#: The call's update: method, path prefix (the id follows), test of the body.
UPDATE: tuple[str, str, Any] = ("PATCH", "/crm/v3/objects/calls/", None)
HAS_TAGS = True
RATE_LIMIT_STATUS = 429
#: An override that sends a number where HubSpot's spec says properties are strings.
BROKEN: dict[str, Any] = {"records": [{"name": "call", "body": {"properties": {
    "hs_call_duration": "{record.talk_s | ms}"}}}]}
#: An update override that sends callroute's code where HubSpot wants a call outcome's id.
BROKEN_UPDATE: dict[str, Any] = {"records": [{"name": "call", "update": {"body": {
    "properties": {"hs_call_disposition": "{record.disposition}"}}}}]}
__all__ = ["BROKEN", "BROKEN_UPDATE", "HAS_TAGS", "RATE_LIMIT_STATUS", "UPDATE", "HubSpotFake",
           "config", "digits", "make"]
