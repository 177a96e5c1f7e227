"""Pipedrive API v1 on loopback, shaped by Pipedrive's API reference.

Endpoints: ``GET /v1/persons/search`` (``term``, ``fields``, ``exact_match``, ``limit``,
``start``; ``{"success": true, "data": {"items": [{"result_score", "item": {"id",
"type": "person", "name", "phones": [...], "owner": {"id"}, ...}}]},
"additional_data": {"pagination": ...}}``), ``GET /v1/persons/{id}`` (the whole person:
``phone`` as ``[{"label", "value", "primary"}]``, ``owner_id`` as an object,
``label_ids``, custom fields under 40-character hash keys, ``update_time``),
``GET /v1/personFields/{id}`` (a field with its ``options``), ``POST /v1/persons``,
``POST /v1/leads``, ``POST /v1/activities`` (201 ``{"success": true, "data": {...}}``), and
API v2's ``PATCH /v2/activities/{id}`` (the fields to change, v2 types: ``done`` and
``busy`` booleans, ``owner_id``; 200 ``{"success": true, "data": {v2 activity}}``).
Auth: the ``x-api-token`` header. Errors: ``{"success": false, "error", "error_info",
"data": null}``; 401 ``unauthorized access``; the rate limit is 429 with
``x-ratelimit-*`` headers and ``Retry-After``.

Phone search ignores formatting: ``exact_match=true`` compares digits, otherwise the
term's digits may be anywhere in the number.

Lists: ``GET /v1/leads`` (``person_id``, ``archived_status``, ``limit``, ``start``...: the
person's leads) and API v2's ``GET /v2/activities`` (``person_id``, ``updated_since``
(RFC 3339), ``limit`` up to 500, ``cursor``...: ``{"success", "data", "additional_data":
{"next_cursor"}}``; v2 activities have ``owner_id`` for v1's ``user_id``, ``done`` as a
boolean and RFC 3339 times). Both read the database: a new object is listed at once.
"""

from __future__ import annotations

import itertools
import re
import uuid
from datetime import UTC, date, datetime
from typing import Any, ClassVar

from aiohttp import web

from tests.crm_fakes.base import OWNERS, PEOPLE, FakeCrm, Violation, check_query, digits, expect
from tests.crm_fakes.base import json_response as _json

TOKEN = "0123456789abcdef0123456789abcdef01234567"
TIER_KEY = "9c1f0b0d7a1c4e2b8f3a5d6e7f8091a2b3c4d5e6"
VALUE_KEY = "a7d3e2f1c0b9a8d7e6f5c4b3a2918070605f4e3d"
LANG_KEY = "b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0"
LABEL_FIELD_ID = 9041
ACTIVITY_TYPES = {"call", "meeting", "task", "deadline", "email", "lunch"}
PERSON_FIELDS = {"name", "owner_id", "org_id", "email", "phone", "label", "label_ids",
                 "visible_to", "marketing_status", "add_time", "first_name", "last_name"}
ACTIVITY_FIELDS = {"subject", "type", "done", "due_date", "due_time", "duration", "person_id",
                   "org_id", "deal_id", "lead_id", "user_id", "note", "public_description",
                   "busy_flag", "participants", "location"}
#: What API v2's PATCH /v2/activities/{id} takes.
V2_ACTIVITY_FIELDS = {"subject", "type", "owner_id", "deal_id", "lead_id", "person_id", "org_id",
                      "project_id", "due_date", "due_time", "duration", "busy", "done",
                      "location", "participants", "attendees", "public_description",
                      "priority", "note"}
LEAD_FIELDS = {"title", "owner_id", "label_ids", "person_id", "organization_id", "value",
               "expected_close_date", "visible_to", "was_seen", "origin_id", "channel"}


class PipedriveFake(FakeCrm):
    """Pipedrive v1 (see the module doc)."""

    NAME: ClassVar[str] = "pipedrive"
    SECONDARY_KIND: ClassVar[str] = "contact"  # numbers live on persons only

    def __init__(self) -> None:
        super().__init__()
        self._seq = itertools.count(101)
        self.persons: dict[int, dict[str, Any]] = {}
        self.activities: dict[int, dict[str, Any]] = {}
        self.leads: dict[str, dict[str, Any]] = {}
        self.owner_ids = {key: str(12000 + i) for i, key in enumerate(OWNERS, 1)}
        self.labels = {t: 70 + i for i, t in enumerate(
            sorted({t for p in PEOPLE for t in p.tags}))}
        self.ids: dict[str, str] = {}
        for person in PEOPLE:
            owner = int(self.owner_ids[person.owner]) if person.owner else None
            pid = next(self._seq)
            self.persons[pid] = {
                "id": pid, "name": f"{person.first} {person.last}", "first_name": person.first,
                "last_name": person.last,
                "phone": [{"label": "work", "value": person.phone, "primary": True}],
                "email": [{"label": "", "value": "", "primary": True}],
                "owner_id": {"id": owner, "name": " ".join(OWNERS[person.owner or "o1"][:2]),
                             "email": "owner@example.com", "has_pic": 0, "pic_hash": None,
                             "active_flag": True, "value": owner} if owner else None,
                "org_id": None, "label_ids": [self.labels[t] for t in person.tags],
                "update_time": person.updated.replace("T", " ").replace("Z", ""),
                "add_time": "2024-01-01 00:00:00", "active_flag": True, "visible_to": "3",
                TIER_KEY: person.tier, VALUE_KEY: person.value, LANG_KEY: person.language,
            }
            self.ids[person.key] = str(pid)
            if person.kind == "lead":
                self.leads[str(uuid.uuid4())] = {"title": "Wang Fang Trading",
                                                 "person_id": pid}
        self.seeded = set(self.persons)

    # --- protocol --------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/persons/search", self.search)
        router.add_get("/v1/persons/{id}", self.get_person)
        router.add_get("/v1/personFields/{id}", self.person_field)
        router.add_post("/v1/persons", self.add_person)
        router.add_post("/v1/leads", self.add_lead)
        router.add_post("/v1/activities", self.add_activity)
        router.add_get("/v1/activities/{id}", self.get_activity)
        router.add_get("/v1/leads", self.list_leads)
        router.add_get("/v2/activities", self.list_activities)
        router.add_patch("/v2/activities/{id}", self.update_activity)

    def check_auth(self, request: web.Request) -> str | None:
        if request.headers.get("x-api-token") != TOKEN:
            return "unauthorized access"
        return None

    def error_response(self, status: int, why: str) -> web.StreamResponse:
        body: dict[str, Any] = {"success": False, "error": why,
                                "error_info": "Please check developers.pipedrive.com for more "
                                              "information about Pipedrive API.",
                                "data": None, "additional_data": None}
        if status == 401:
            body = {"success": False, "error": "unauthorized access", "errorCode": 401,
                    "error_info": body["error_info"]}
        return _json(body, status=status)

    def rate_limit_response(self) -> web.StreamResponse:
        return _json({"success": False, "error": "Request over limit", "errorCode": 429,
                      "error_info": "Please check developers.pipedrive.com"}, status=429,
                     headers={"Retry-After": str(self.RETRY_AFTER), "x-ratelimit-limit": "80",
                              "x-ratelimit-remaining": "0",
                              "x-ratelimit-reset": str(self.RETRY_AFTER)})

    # --- handlers --------------------------------------------------------------------

    async def search(self, request: web.Request) -> web.StreamResponse:
        query = check_query(request, {"term", "fields", "exact_match", "organization_id",
                                      "include_fields", "start", "limit"}, {"term"})
        exact = query.get("exact_match", "false")
        expect(exact in ("true", "false"), "exact_match must be true or false")
        term = query["term"]
        expect(exact == "true" or len(term) >= 2, "term must be at least 2 characters")
        fields = query.get("fields", "custom_fields,email,notes,phone,name").split(",")
        expect(set(fields) <= {"custom_fields", "email", "notes", "phone", "name"},
               f"fields must be among custom_fields, email, notes, phone, name: {fields}")
        limit = int(query.get("limit", "100"))
        expect(1 <= limit <= 500, "limit must be 1..500")
        wanted = digits(term)
        found = []
        for person in self.persons.values():
            numbers = [digits(p["value"]) for p in person["phone"] if p["value"]]
            hit = "phone" in fields and wanted and any(
                n == wanted if exact == "true" else wanted in n for n in numbers)
            if hit or ("name" in fields and term.lower() in person["name"].lower()):
                found.append(person)
        items = [{"result_score": 1.0, "item": {
            "id": p["id"], "type": "person", "name": p["name"],
            "phones": [x["value"] for x in p["phone"] if x["value"]], "emails": [],
            "visible_to": 3, "owner": {"id": (p["owner_id"] or {}).get("id")},
            "organization": None, "custom_fields": [], "notes": [],
            "update_time": p["update_time"]}} for p in found[:limit]]
        return _json({"success": True, "data": {"items": items}, "additional_data": {
            "pagination": {"start": 0, "limit": limit,
                           "more_items_in_collection": len(found) > limit}}})

    async def get_person(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        person = self.persons.get(_int(request.match_info["id"]))
        if person is None:
            return self.error_response(404, "Person not found")
        return _json({"success": True, "data": person, "additional_data": {},
                      "related_objects": {}})

    async def person_field(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        expect(request.match_info["id"] == str(LABEL_FIELD_ID), "no such person field")
        return _json({"success": True, "data": {
            "id": LABEL_FIELD_ID, "key": "label_ids", "name": "Labels",
            "field_type": "set", "options": [{"id": i, "label": t, "color": "green"}
                                             for t, i in self.labels.items()]}})

    async def add_person(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        body = await request.json()
        _fields(body, PERSON_FIELDS, "person")
        expect(isinstance(body.get("name"), str) and body["name"], "name is required")
        phones = body.get("phone", [])
        expect(isinstance(phones, list) and all(
            isinstance(p, dict) and set(p) <= {"value", "primary", "label"}
            and isinstance(p.get("value"), str) and isinstance(p.get("primary", False), bool)
            for p in phones), "phone must be [{value, primary, label}]")
        self._owner(body.get("owner_id"))
        pid = next(self._seq)
        self.persons[pid] = {"id": pid, "owner_id": None, "label_ids": [],
                             "update_time": "2025-03-03 02:30:00", **body}
        return _json({"success": True, "data": self.persons[pid]}, status=201)

    async def add_lead(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        body = await request.json()
        _fields(body, LEAD_FIELDS, "lead")
        expect(isinstance(body.get("title"), str) and body["title"], "title is required")
        pid = body.get("person_id")
        expect(isinstance(pid, int) and pid in self.persons,
               "person_id must be the id (integer) of a person")
        lid = str(uuid.uuid4())
        self.leads[lid] = body
        return _json({"success": True, "data": self._lead(lid)}, status=201)

    def _lead(self, lid: str) -> dict[str, Any]:
        body = self.leads[lid]
        return {"id": lid, "title": body.get("title"), "owner_id": body.get("owner_id"),
                "creator_id": 12001, "label_ids": body.get("label_ids", []),
                "person_id": body.get("person_id"),
                "organization_id": body.get("organization_id"), "source_name": "API",
                "origin": "API", "is_archived": False, "was_seen": False, "value": None,
                "expected_close_date": None, "next_activity_id": None,
                "add_time": "2025-03-03T02:31:00.000Z", "update_time": "2025-03-03T02:31:00.000Z",
                "visible_to": "3", "cc_email": "lead@example.pipedrivemail.com"}

    async def list_leads(self, request: web.Request) -> web.StreamResponse:
        query = check_query(request, {"limit", "start", "archived_status", "owner_id",
                                      "person_id", "organization_id", "filter_id", "sort"})
        expect(query.get("archived_status", "all") in ("archived", "not_archived", "all"),
               "archived_status must be archived, not_archived or all")
        limit = int(query.get("limit", "100"))
        expect(1 <= limit <= 500, "limit must be 1..500")
        person = query.get("person_id")
        expect(person is None or person.isdigit(), "person_id must be an integer")
        found = [self._lead(lid) for lid, body in self.leads.items()
                 if person is None or body.get("person_id") == int(person)]
        return _json({"success": True, "data": found[:limit], "additional_data": {
            "pagination": {"start": 0, "limit": limit,
                           "more_items_in_collection": len(found) > limit}}})

    async def list_activities(self, request: web.Request) -> web.StreamResponse:
        query = check_query(request, {"filter_id", "ids", "owner_id", "deal_id", "lead_id",
                                      "person_id", "org_id", "updated_since", "updated_until",
                                      "sort_by", "sort_direction", "include_fields", "limit",
                                      "cursor"})
        limit = int(query.get("limit", "100"))
        expect(1 <= limit <= 500, "limit must be 1..500")
        person = query.get("person_id")
        expect(person is None or person.isdigit(), "person_id must be an integer")
        since = _rfc3339(query["updated_since"]) if "updated_since" in query else None
        found = [a for a in self.activities.values()
                 if (person is None or a.get("person_id") == int(person))
                 and (since is None or _rfc3339(a["update_time"]) >= since)]
        return _json({"success": True, "data": [_v2_activity(a) for a in found[:limit]],
                      "additional_data": {"next_cursor": None}})

    async def add_activity(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        body = await request.json()
        _fields(body, ACTIVITY_FIELDS, "activity")
        expect(body.get("type", "call") in ACTIVITY_TYPES,
               f"unknown activity type {body.get('type')}")
        expect(body.get("done", 0) in (0, 1) and not isinstance(body.get("done"), bool),
               "done must be 0 or 1")
        self._check_activity(body)
        self._owner(body.get("user_id"))
        aid = next(self._seq)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.activities[aid] = {"id": aid, **body, "add_time": now, "update_time": now}
        return _json({"success": True, "data": self.activities[aid]}, status=201)

    def _check_activity(self, body: dict[str, Any]) -> None:
        if "due_date" in body:
            try:
                date.fromisoformat(str(body["due_date"]))
            except ValueError:
                raise Violation("due_date must be YYYY-MM-DD") from None
        for name in ("due_time", "duration"):
            if name in body:
                expect(re.fullmatch(r"\d{2}:\d{2}", str(body[name])) is not None,
                       f"{name} must be HH:MM")
        if "person_id" in body:
            expect(isinstance(body["person_id"], int) and body["person_id"] in self.persons,
                   "person_id must be the id (integer) of a person")

    async def update_activity(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        body = await request.json()
        _fields(body, V2_ACTIVITY_FIELDS, "activity")
        for name in ("done", "busy"):
            expect(name not in body or isinstance(body[name], bool),
                   f"{name} must be a boolean (API v2)")
        for name in ("subject", "note", "public_description"):
            expect(name not in body or isinstance(body[name], str), f"{name} must be text")
        expect(body.get("type", "call") in ACTIVITY_TYPES,
               f"unknown activity type {body.get('type')}")
        self._check_activity(body)
        self._owner(body.get("owner_id"))
        activity = self.activities.get(_int(request.match_info["id"]))
        if activity is None:
            return self.error_response(404, "Activity not found")
        changes = {("user_id" if k == "owner_id" else k): v for k, v in body.items()}
        if "done" in changes:
            changes["done"] = int(changes["done"])
        activity.update(changes,
                        update_time=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self.record_change("activities", activity["id"],
                     {k: v for k, v in activity.items() if k != "update_time"})
        return _json({"success": True, "data": _v2_activity(activity)})

    async def get_activity(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        activity = self.activities.get(_int(request.match_info["id"]))
        if activity is None:
            return self.error_response(404, "Activity not found")
        return _json({"success": True, "data": activity})

    def _owner(self, owner: Any) -> None:
        if owner is not None:
            expect(isinstance(owner, int) and not isinstance(owner, bool)
                   and str(owner) in self.owner_ids.values(), f"user {owner!r} does not exist")

    # --- what the tests read ----------------------------------------------------------

    def created(self, what: str) -> list[dict[str, Any]]:
        """Objects the connector created, in a vendor-neutral summary."""
        if what == "lead":
            return [{"id": str(i), "on": None, "owner": None,
                     "phone": (p.get("phone") or [{}])[0].get("value"), "outcome": None,
                     "duration_s": None, "text": str(p)}
                    for i, p in self.persons.items() if i not in self.seeded]
        done = 1 if what == "call" else 0
        out = []
        for aid, a in self.activities.items():
            if a.get("done", 0) != done:
                continue
            duration = a.get("duration")
            outcome = re.search(r"\((\w+)\)", a.get("subject", ""))
            out.append({"id": str(aid), "on": str(a["person_id"]) if a.get("person_id") else None,
                        "owner": str(a["user_id"]) if a.get("user_id") else None, "phone": None,
                        "outcome": outcome.group(1) if outcome else None,
                        "duration_s": (int(duration[:2]) * 3600 + int(duration[3:]) * 60)
                        if duration else None, "text": str(a)})
        return out

    @staticmethod
    def outcome(neutral: str) -> str:
        """Pipedrive activities have no outcome field: the preset puts it in the subject."""
        return neutral

    def disposition(self, oid: str) -> dict[str, Any]:
        """A call activity's disposition field (none: it is in the note) and its note."""
        return {"value": None, "text": self.activities[int(oid)].get("note")}

    @staticmethod
    def disposition_value(code: str) -> None:
        """Pipedrive's preset has no disposition field."""
        return None


def _rfc3339(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise Violation(f"{text!r} is not an RFC 3339 date-time") from None
    expect(when.tzinfo is not None, f"{text!r} has no time zone")
    return when


def _v2_activity(activity: dict[str, Any]) -> dict[str, Any]:
    """An activity as API v2 shows it."""
    return {"id": activity["id"], "subject": activity.get("subject"),
            "type": activity.get("type", "call"), "owner_id": activity.get("user_id"),
            "creator_user_id": 12001, "is_deleted": False, "add_time": activity["add_time"],
            "update_time": activity["update_time"], "deal_id": None, "lead_id": None,
            "person_id": activity.get("person_id"), "org_id": None, "project_id": None,
            "due_date": activity.get("due_date"), "due_time": activity.get("due_time"),
            "duration": activity.get("duration"), "busy": False,
            "done": bool(activity.get("done", 0)), "marked_as_done_time": None,
            "location": None, "participants": [], "attendees": [],
            "public_description": None, "priority": None, "note": activity.get("note")}


def _fields(body: Any, allowed: set[str], what: str) -> None:
    expect(isinstance(body, dict), f"the {what} must be a JSON object")
    unknown = sorted(set(body) - allowed)
    expect(not unknown, f"unknown {what} field(s) {unknown}")


def _int(text: str) -> int:
    if not text.isdigit():
        raise web.HTTPNotFound()
    return int(text)


def make() -> PipedriveFake:
    """A seeded Pipedrive fake (not started)."""
    return PipedriveFake()


def config(fake: PipedriveFake) -> dict[str, Any]:
    """The crm: section that points the pipedrive preset at this fake."""
    return {"preset": "pipedrive", "base_url": fake.url, "auth": {"key": TOKEN},
            "vars": {"tier_field": TIER_KEY, "value_field": VALUE_KEY,
                     "language_field": LANG_KEY, "label_field_id": LABEL_FIELD_ID}}


HAS_TAGS = True
RATE_LIMIT_STATUS = 429
DURATION_RESOLUTION_S = 60  # Pipedrive keeps durations as HH:MM
#: An override that sends the person id as text (Pipedrive wants an integer).
BROKEN: dict[str, Any] = {"records": [{"name": "call", "body": {
    "person_id": "{customer.id}"}}]}
#: The call's update: method, path prefix (the id follows), test of the body.
UPDATE: tuple[str, str, Any] = ("PATCH", "/v2/activities/", None)
#: An update override that sends done as v1's 0/1 (API v2 wants a boolean).
BROKEN_UPDATE: dict[str, Any] = {"records": [{"name": "call", "update": {"body": {
    "done": 1}}}]}
__all__ = ["BROKEN", "BROKEN_UPDATE", "DURATION_RESOLUTION_S", "HAS_TAGS", "RATE_LIMIT_STATUS",
           "UPDATE", "PipedriveFake", "config", "digits", "make"]
