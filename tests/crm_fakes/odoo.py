"""Odoo's external API (JSON-RPC) on loopback, shaped by Odoo's "External API" docs.

One endpoint: ``POST /jsonrpc`` with ``{"jsonrpc": "2.0", "method": "call", "params":
{"service": "object", "method": "execute_kw", "args": [db, uid, password, model,
method, args, kwargs]}, "id": n}``; the answer is ``{"jsonrpc": "2.0", "id": n,
"result": ...}`` or, **with HTTP 200**, ``{"error": {"code": 200, "message": "Odoo Server
Error", "data": {"name": "odoo.exceptions.AccessDenied", "message": ...}}}``. Empty
fields read as ``false``; many2one fields as ``[id, "name"]``; ``write_date`` as
``"YYYY-MM-DD HH:MM:SS"`` (UTC). Models: ``res.partner`` (``phone`` and ``mobile``;
``phone_sanitized`` is the E.164 form of the first of ``mobile``, ``phone`` that
sanitizes, with the partner's country, as Odoo's ``mail.thread.phone`` computes it;
``phone_mobile_search`` searches both numbers: ``ilike`` on the digits whatever the
formatting, ``=`` with a ``+``/``00`` value on the number stripped of separators, in
either international form), ``crm.lead`` (the same numbers), ``res.partner.category``
(tags), ``ir.model``, ``mail.activity`` (``res_model`` computed from ``res_model_id``),
``mail.message`` (what ``message_post`` writes into a record's chatter); methods
``search_read``, ``create``, ``message_post``, ``read`` (``[ids]``, ``fields``) and
``write`` (``[ids], {values}`` → ``true``; a missing record is a ``MissingError``; a
computed field cannot be written; ``mail.message``: only its ``body``, what editing a
note changes).
``search_read`` reads the database: a new record is found at once;
``ilike`` on an HTML field (a lead's description, a message's body, an activity's note)
matches its text.

Domains are lists of ``[field, operator, value]`` (implicit AND) with ``'|'`` prefix OR;
operators ``=``, ``>``, ``ilike``, ``in``. The rate limit is the proxy's 429 with
``Retry-After`` (Odoo itself has none).
"""

from __future__ import annotations

import itertools
import re
from datetime import UTC, date, datetime
from typing import Any, ClassVar

import phonenumbers
from aiohttp import web

from tests.crm_fakes.base import OWNERS, PEOPLE, FakeCrm, Violation, check_query, digits, expect
from tests.crm_fakes.base import json_response as _json

DB, UID, KEY = "callroute", 2, "0123456789abcdef0123456789abcdef01234567"
COUNTRY = {"li": "CN", "sarah": None, "decoy": None, "wang": "CN"}
FIELDS = {
    "res.partner": {"id", "name", "phone", "mobile", "phone_sanitized", "phone_mobile_search",
                    "user_id", "category_id", "lang", "write_date", "x_customer_tier",
                    "x_annual_value", "email", "country_id"},
    "crm.lead": {"id", "name", "contact_name", "partner_name", "phone", "mobile",
                 "phone_sanitized",
                 "phone_mobile_search", "user_id", "type", "expected_revenue", "write_date",
                 "description"},
    "res.partner.category": {"id", "name"},
    "ir.model": {"id", "model", "name"},
    "mail.activity": {"id", "res_model_id", "res_model", "res_id", "activity_type_id",
                      "summary", "note", "date_deadline", "user_id"},
    "mail.message": {"id", "model", "res_id", "body", "message_type", "subtype_xmlid",
                     "author_id", "date"},
}
#: Fields Odoo computes: read, never written.
COMPUTED = {("mail.activity", "res_model")}
CREATABLE = {"crm.lead", "mail.activity"}
#: Fields ``write`` may change, per model.
WRITABLE = {"mail.message": {"body"},
            "crm.lead": FIELDS["crm.lead"] - {"id", "write_date", "phone_sanitized",
                                              "phone_mobile_search"},
            "mail.activity": FIELDS["mail.activity"] - {"id", "res_model"}}
INT_FIELDS = {("mail.activity", "res_model_id"), ("mail.activity", "res_id"),
              ("mail.activity", "activity_type_id"), ("mail.activity", "user_id"),
              ("crm.lead", "user_id")}
REQUIRED = {"crm.lead": {"name"}, "mail.activity": {"res_model_id", "res_id",
                                                    "activity_type_id"}}
ACTIVITY_TYPES = {1: "Email", 2: "Call", 4: "To-Do"}


def _sanitized(phone: str, country: str | None) -> str | bool:
    try:
        parsed = phonenumbers.parse(phone, country)
    except phonenumbers.NumberParseException:
        return False
    if not phonenumbers.is_valid_number(parsed):
        return False
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


class OdooFake(FakeCrm):
    """Odoo JSON-RPC (see the module doc)."""

    NAME: ClassVar[str] = "odoo"
    SECONDARY_KIND: ClassVar[str] = "lead"

    def __init__(self) -> None:
        super().__init__()
        #: False: Odoo 19 (Odoo Online since saas-18.2), where res.partner and crm.lead
        #: have no ``mobile`` field any more (reading it is "Invalid field")
        self.mobile_field = True
        self._seq = itertools.count(7)
        self.rows: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in FIELDS}
        self.owner_ids = {key: str(5 + i) for i, key in enumerate(OWNERS)}
        self.users = {int(v): " ".join(OWNERS[k][:2]) for k, v in self.owner_ids.items()}
        tags = {t for p in PEOPLE for t in p.tags}
        tag_ids = {t: self._insert("res.partner.category", {"name": t}) for t in sorted(tags)}
        for model in ("res.partner", "crm.lead"):
            self._insert("ir.model", {"model": model, "name": model})
        self.ids: dict[str, str] = {}
        for person in PEOPLE:
            model = "crm.lead" if person.kind == "lead" else "res.partner"
            owner = int(self.owner_ids[person.owner]) if person.owner else None
            row: dict[str, Any] = {
                "name": f"{person.first} {person.last}", "phone": person.phone,
                "mobile": False,
                "phone_sanitized": _sanitized(person.phone, COUNTRY[person.key]),
                "user_id": [owner, self.users[owner]] if owner else False,
                "write_date": person.updated.replace("T", " ").replace("Z", ""),
            }
            if model == "res.partner":
                row.update(category_id=[tag_ids[t] for t in person.tags],
                           lang="zh_CN" if person.language == "zh" else "en_US",
                           x_customer_tier=person.tier or False,
                           x_annual_value=person.value or 0.0, email=False,
                           country_id=False)
            else:
                row.update(contact_name=row["name"], partner_name="Wang Fang Trading",
                           type="lead", expected_revenue=0.0, description=False)
            self.ids[person.key] = str(self._insert(model, row))
        self.seeded = {int(v) for v in self.ids.values()}

    def add_partner(self, name: str, *, phone: str | bool = False, mobile: str | bool = False,
                    country: str | None = None) -> str:
        """Store one more ``res.partner`` (its ``phone_sanitized`` computed as Odoo does:
        the mobile's E.164 when it sanitizes, else the phone's); its id."""
        first = next((s for n in (mobile, phone) if n
                      and (s := _sanitized(str(n), country))), False)
        return str(self._insert("res.partner", {
            "name": name, "phone": phone, "mobile": mobile, "phone_sanitized": first,
            "user_id": False, "write_date": "2025-02-21 08:00:00", "category_id": [],
            "lang": "en_US", "x_customer_tier": False, "x_annual_value": 0.0,
            "email": False, "country_id": False}))

    def _fields(self, model: str) -> set[str]:
        """The fields of ``model`` a read may name (no ``mobile`` on Odoo 19)."""
        return FIELDS[model] if self.mobile_field else FIELDS[model] - {"mobile"}

    def _insert(self, model: str, row: dict[str, Any]) -> int:
        oid = next(self._seq)
        self.rows[model][oid] = {"id": oid, **row}
        return oid

    # --- protocol --------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/jsonrpc", self.rpc)

    def check_auth(self, request: web.Request) -> str | None:
        return None  # credentials travel in the body: checked by execute_kw

    def error_response(self, status: int, why: str) -> web.StreamResponse:
        name = "odoo.exceptions.AccessDenied" if status == 401 else (
            "odoo.exceptions.ValidationError" if status == 400 else "builtins.Exception")
        return _json({"jsonrpc": "2.0", "id": None, "error": {
            "code": 200, "message": "Odoo Server Error",
            "data": {"name": name, "message": why, "arguments": [why], "context": {},
                     "debug": f"Traceback (most recent call last):\n{name}: {why}"}}})

    def rate_limit_response(self) -> web.StreamResponse:
        return web.Response(status=429, text="<html><body>Too Many Requests</body></html>",
                            content_type="text/html",
                            headers={"Retry-After": str(self.RETRY_AFTER)})

    # --- handler ---------------------------------------------------------------------

    async def rpc(self, request: web.Request) -> web.StreamResponse:
        check_query(request, set())
        body = await request.json()
        expect(isinstance(body, dict) and body.get("jsonrpc") == "2.0"
               and body.get("method") == "call" and set(body) <= {"jsonrpc", "method",
                                                                    "params", "id"},
               "not a JSON-RPC 2.0 call")
        params = body.get("params")
        expect(isinstance(params, dict) and params.get("service") == "object"
               and params.get("method") == "execute_kw" and set(params) == {
                   "service", "method", "args"}, "params must be object.execute_kw")
        args = params["args"]
        expect(isinstance(args, list) and len(args) in (6, 7),
               "args: [db, uid, password, model, method, args, kwargs?]")
        db, uid, key, model, method, margs = args[:6]
        kwargs = args[6] if len(args) == 7 else {}
        if (db, uid, key) != (DB, UID, KEY):
            self.violations.append(f"execute_kw: wrong credentials {db!r}, {uid!r}")
            return self.error_response(401, "Access Denied")
        expect(model in FIELDS, f"Object {model} doesn't exist")
        expect(isinstance(margs, list) and isinstance(kwargs, dict),
               "method args must be a list, kwargs an object")
        result = getattr(self, f"_m_{method}", None)
        expect(result is not None, f"method {method} is not modelled")
        assert result is not None
        return _json({"jsonrpc": "2.0", "id": body.get("id"),
                      "result": result(model, margs, kwargs)})

    def _m_search_read(self, model: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        expect(len(args) <= 1 and set(kwargs) <= {"fields", "limit", "offset", "order",
                                                  "domain"}, "search_read(domain, fields...)")
        domain = args[0] if args else kwargs.get("domain", [])
        fields = kwargs.get("fields") or sorted(self._fields(model))
        for name in fields:
            expect(name in self._fields(model), f"Invalid field {name!r} on model {model!r}")
        rows = [r for r in self.rows[model].values() if _domain(model, domain, r)]
        if kwargs.get("order"):
            key = str(kwargs["order"]).split()[0]
            expect(key in FIELDS[model], f"Invalid order field {key}")
            rows.sort(key=lambda r: str(r.get(key)))
        offset = int(kwargs.get("offset", 0))
        limit = kwargs.get("limit")
        rows = rows[offset:offset + limit if limit else None]
        return [{k: r.get(k, False) for k in ["id", *fields]} for r in rows]

    def _m_create(self, model: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        expect(model in CREATABLE, f"create on {model} is not allowed here")
        expect(len(args) == 1 and not kwargs, "create([values]) or create(values)")
        values = args[0]
        items = values if isinstance(values, list) else [values]
        created = []
        for item in items:
            expect(isinstance(item, dict), "values must be an object")
            for name, value in item.items():
                expect(name in FIELDS[model] and name not in ("id", "write_date")
                       and (model, name) not in COMPUTED,
                       f"Invalid field {name!r} on model {model!r}")
                if (model, name) in INT_FIELDS:
                    expect(value is False or (isinstance(value, int)
                                              and not isinstance(value, bool)),
                           f"{name} must be an integer id")
            missing = sorted(f for f in REQUIRED[model] if not item.get(f))
            expect(not missing, f"Missing required fields {missing} on {model}")
            if model == "mail.activity":
                self._check_activity(item)
            row = {**item, "write_date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")}
            if model == "crm.lead":
                row["phone_sanitized"] = _sanitized(str(row.get("phone") or ""), None)
            if model == "mail.activity":
                row["res_model"] = self.rows["ir.model"][item["res_model_id"]]["model"]
            created.append(self._insert(model, row))
        return created if isinstance(values, list) else created[0]

    def _check_activity(self, item: dict[str, Any]) -> None:
        target = next((m for m, r in self.rows["ir.model"].items()
                       if m == item["res_model_id"]), None)
        expect(target is not None, f"res_model_id {item['res_model_id']} is no ir.model")
        model = self.rows["ir.model"][item["res_model_id"]]["model"]
        expect(item["res_id"] in self.rows[model], f"res_id {item['res_id']} is no {model}")
        expect(item["activity_type_id"] in ACTIVITY_TYPES, "unknown activity type")
        if item.get("user_id"):
            expect(item["user_id"] in self.users, f"user {item['user_id']} does not exist")
        if "date_deadline" in item:
            try:
                date.fromisoformat(str(item["date_deadline"]))
            except ValueError:
                raise Violation("date_deadline must be YYYY-MM-DD") from None

    def _m_message_post(self, model: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        expect(model in ("res.partner", "crm.lead"), f"{model} has no chatter here")
        expect(len(args) == 1 and isinstance(args[0], list) and len(args[0]) == 1,
               "message_post([[record id]], body=...)")
        rid = args[0][0]
        expect(isinstance(rid, int) and not isinstance(rid, bool) and rid in self.rows[model],
               f"record {rid!r} of {model} does not exist")
        expect(set(kwargs) <= {"body", "message_type", "subtype_xmlid", "author_id"}
               and isinstance(kwargs.get("body"), str), "message_post(body=str, ...)")
        expect(kwargs.get("message_type", "notification") in ("comment", "notification"),
               "message_type must be comment or notification")
        return self._insert("mail.message", {"model": model, "res_id": rid,
                                             "date": "2025-03-03 02:31:00", **kwargs})

    def _records(self, model: str, ids: Any) -> list[dict[str, Any]]:
        expect(isinstance(ids, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids),
               "ids must be a list of integers")
        missing = [i for i in ids if i not in self.rows[model]]
        expect(not missing, f"MissingError: Record does not exist or has been deleted. "
                            f"(Record: {model}({missing[0] if missing else ''},))")
        return [self.rows[model][i] for i in ids]

    def _m_read(self, model: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        expect(len(args) in (1, 2) and set(kwargs) <= {"fields", "load"},
               "read([ids], fields=[...])")
        fields = kwargs.get("fields") or (args[1] if len(args) == 2 else None) \
            or sorted(self._fields(model))
        for name in fields:
            expect(name in self._fields(model), f"Invalid field {name!r} on model {model!r}")
        return [{k: r.get(k, False) for k in ["id", *fields]}
                for r in self._records(model, args[0])]

    def _m_write(self, model: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        expect(model in WRITABLE, f"write on {model} is not allowed here")
        expect(len(args) == 2 and isinstance(args[1], dict) and not kwargs,
               "write([ids], {values})")
        rows = self._records(model, args[0])
        values = args[1]
        for name, value in values.items():
            expect(name in FIELDS[model], f"Invalid field {name!r} on model {model!r}")
            expect(name in WRITABLE[model], f"field {name!r} of {model} cannot be written")
            if name == "body":
                expect(isinstance(value, str), "body must be HTML text")
            if (model, name) in INT_FIELDS:
                expect(value is False or (isinstance(value, int)
                                          and not isinstance(value, bool)),
                       f"{name} must be an integer id")
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        for row in rows:
            row.update(values)
            if "write_date" in FIELDS[model]:
                row["write_date"] = stamp
            self.record_change(model, row["id"], row)
        return True

    # --- what the tests read ----------------------------------------------------------

    def created(self, what: str) -> list[dict[str, Any]]:
        """Objects the connector created, in a vendor-neutral summary."""
        if what == "call":
            return [{"id": str(m["id"]), "on": str(m["res_id"]), "owner": None, "phone": None,
                     "outcome": _outcome_of(m["body"]), "duration_s": _duration_of(m["body"]),
                     "text": m["body"]} for m in self.rows["mail.message"].values()]
        if what == "lead":
            return [{"id": str(i), "on": None, "owner": None, "phone": r.get("phone"),
                     "outcome": None, "duration_s": None, "text": str(r)}
                    for i, r in self.rows["crm.lead"].items() if i not in self.seeded]
        return [{"id": str(i), "on": str(r["res_id"]),
                 "owner": str(r["user_id"]) if r.get("user_id") else None, "phone": None,
                 "outcome": None, "duration_s": None, "text": str(r)}
                for i, r in self.rows["mail.activity"].items()]

    @staticmethod
    def outcome(neutral: str) -> str:
        """The outcome label the preset writes into the note."""
        return {"answered": "Answered", "missed": "Missed"}.get(neutral, neutral.title())

    def disposition(self, oid: str) -> dict[str, Any]:
        """A call note's disposition field (none: it is in the text) and its body."""
        return {"value": None, "text": self.rows["mail.message"][int(oid)]["body"]}

    @staticmethod
    def disposition_value(code: str) -> None:
        """Odoo's preset has no disposition field."""
        return None


def _outcome_of(body: str) -> str | None:
    marker = "Outcome: "
    start = body.find(marker)
    return body[start + len(marker):].split("<")[0].split(";")[0].strip() if start >= 0 else None


def _duration_of(body: str) -> float | None:
    marker = "Talk time: "
    start = body.find(marker)
    if start < 0:
        return None
    text = body[start + len(marker):].split(" ")[0]
    return float(text) if text.replace(".", "").isdigit() else None


def _domain(model: str, domain: Any, row: dict[str, Any]) -> bool:
    expect(isinstance(domain, list), "a domain is a list")
    stack: list[bool] = []
    for term in reversed(domain):
        if term == "|":
            expect(len(stack) >= 2, "'|' needs two terms")
            a, b = stack.pop(), stack.pop()
            stack.append(a or b)
        elif term == "&":
            a, b = stack.pop(), stack.pop()
            stack.append(a and b)
        else:
            stack.append(_term(model, term, row))
    return all(stack)


def _term(model: str, term: Any, row: dict[str, Any]) -> bool:
    expect(isinstance(term, list) and len(term) == 3 and isinstance(term[0], str),
           f"domain term {term!r} is not [field, operator, value]")
    name, op, value = term
    expect(name in FIELDS[model], f"Invalid field {name!r} in leaf {term!r}")
    if name == "phone_mobile_search":
        expect(op in ("ilike", "="), "phone_mobile_search takes = or ilike")
        wanted = digits(value)
        expect(len(wanted) >= 3, "phone_mobile_search needs at least 3 digits")
        return any(_phone_search(op, str(value), row.get(f)) for f in ("phone", "mobile"))
    stored = row.get(name)
    if op == "=":
        return stored == value
    if op == "ilike":
        return isinstance(stored, str) and str(value).lower() in stored.lower()
    if op == "in":
        return stored in value
    if op == ">":
        expect(isinstance(value, str), "> compares with a 'YYYY-MM-DD HH:MM:SS' text")
        try:
            datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
        except ValueError:
            raise Violation(f"{value!r} is not 'YYYY-MM-DD HH:MM:SS'") from None
        return isinstance(stored, str) and stored > value
    raise Violation(f"operator {op!r} is not modelled")


def _phone_search(op: str, value: str, stored: Any) -> bool:
    """Odoo's ``phone_mobile_search`` on one stored number: separators (spaces, dots,
    slashes, brackets, dashes) removed; a value starting with ``+`` or ``00`` matches
    the number written with either prefix; ``ilike`` matches a part, ``=`` the whole."""
    if not stored or not isinstance(stored, str):
        return False
    text = re.sub(r"[\s\\./()\-]", "", stored)
    value = value.strip()
    if value.startswith(("+", "00")):
        term = re.sub(r"[\s\\./()\-]", "", value[1 if value.startswith("+") else 2:])
        forms = ("+" + term, "00" + term)
        return text in forms if op == "=" else text.startswith(forms)
    term = re.sub(r"[\s\\./()\-]", "", value)
    return text == term if op == "=" else term.lower() in text.lower()


def make() -> OdooFake:
    """A seeded Odoo fake (not started)."""
    return OdooFake()


def config(fake: OdooFake) -> dict[str, Any]:
    """The crm: section that points the odoo preset at this fake."""
    return {"preset": "odoo", "base_url": fake.url, "secrets": {"api_key": KEY},
            "vars": {"db": DB, "uid": UID}}


HAS_TAGS = True
RATE_LIMIT_STATUS = 429
#: An override that passes the partner id as text to message_post (Odoo wants an int).
BROKEN: dict[str, Any] = {"records": [{"name": "call", "body": {"params": {"args": [
    "{vars.db}", "{vars.uid}", "{secrets.api_key}", "res.partner", "message_post",
    ["{[customer.id]}"], {"body": "callroute {idempotency_key}", "message_type": "comment"}]}}}]}


def writes(body: Any) -> bool:
    """A JSON-RPC body calling ``write``."""
    args = body.get("params", {}).get("args", []) if isinstance(body, dict) else []
    return len(args) > 4 and args[4] == "write"


#: The call's update: method, path, test of the body (every call is POST /jsonrpc).
UPDATE: tuple[str, str, Any] = ("POST", "/jsonrpc", writes)
#: An update override that writes a field a chatter message does not have.
BROKEN_UPDATE: dict[str, Any] = {"records": [{"name": "call", "update": {"body": {"params": {
    "args": ["{vars.db}", "{vars.uid}", "{secrets.api_key}", "mail.message", "write",
             ["{[id | int]}", {"note": "{record.disposition}"}]]}}}}]}
__all__ = ["BROKEN", "BROKEN_UPDATE", "HAS_TAGS", "RATE_LIMIT_STATUS", "UPDATE", "OdooFake",
           "config", "digits", "make", "writes"]
