"""A small sample CRM, served by aiohttp on loopback, to try callroute without a real CRM.

``callroute demo`` and ``callroute sample-crm`` run it; the tests and benches use it as
"the CRM". The customers are those of the recorded Asterisk calls (Li Lei, Han Meimei,
Slow Case, Impatient...), plus one number shared by four records to exercise the
connector's ``multiple`` rule. :func:`router.crm.config.sample_crm_section` is the
``crm:`` config that fits it.

API (JSON; ``/api/*`` needs ``Authorization: Bearer <token>`` when a token is set)::

    GET   /api/customers?phone=+8613800138000   {"results": [customer, ...]}
    GET   /api/customers/changed?updated_since=ISO&cursor=N&limit=N
                                                {"results": [...], "next_cursor": "N"|null}
    GET   /api/customers/{id}                   customer, or 404
    PUT   /api/customers/{id}                   replace (or create) a customer
    PATCH /api/customers/{id}                   change some fields (updated_at is bumped)
    POST  /api/activities | /api/leads | /api/tasks
          with Idempotency-Key: new key → 201 + object; seen key → 200 + the same object
    GET   /api/activities | /api/leads | /api/tasks   {"results": [...]}
    GET   /api/activities/{id} (leads, tasks)       the object, or 404
    PATCH /api/activities/{id} (leads, tasks)       change some fields (updated_at set)

Test and bench controls (never faulted)::

    GET/POST/DELETE /_faults     list / add / clear injected faults (see :class:`Fault`)
    GET/DELETE      /_requests   the log of received /api requests / clear it
    POST            /_reset      customers back to the seed, objects and log emptied
    GET             /_health     {"ok": true, ...}

A customer looks like ``{"id", "name", "phones": [...], "tier", "value",
"owner": {"id", "name"}, "tags": [...], "open_tickets", "language", "updated_at"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import json
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, get_args
from urllib.parse import urlsplit

from aiohttp import web

from router.errors import ListenError

if TYPE_CHECKING:
    from router.settings import Settings

log = logging.getLogger(__name__)

FaultKind = Literal["delay", "stall", "status", "drop", "bad_json", "wrong_shape"]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
COLLECTIONS = {"activities": "ACT", "leads": "LEAD", "tasks": "TASK"}
#: How long the "Slow Case" customer's lookups take (longer than the default timeout).
SLOW_CASE_DELAY_S = 3.0
MAX_STALL_S = 3600.0
MAX_BODY_BYTES = 1024 * 1024
MAX_LOG = 10_000


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _digits(number: str) -> str:
    return re.sub(r"\D", "", number)


def _customer(
    cid: str, name: str, phones: list[str], tier: str | None, value: float | None,
    owner: str | None, tags: list[str], tickets: int, language: str, updated_at: str,
) -> dict[str, Any]:
    return {
        "id": cid, "name": name, "phones": phones, "tier": tier, "value": value,
        "owner": {"id": owner, "name": f"Agent {owner}"} if owner else None,
        "tags": tags, "open_tickets": tickets, "language": language, "updated_at": updated_at,
    }


def seed_customers() -> list[dict[str, Any]]:
    """The sample customers (fresh copies), in the CRM's order."""
    shared = "+8613500135000"  # one switchboard number on four records
    return [
        _customer("C-1001", "Li Lei", ["+8613800138000"], "gold", 52_000, "7001",
                  ["repeat-buyer"], 1, "zh", "2025-01-10T09:00:00Z"),
        _customer("C-1002", "Han Meimei", ["+8613900139000", "+8613900139001"], "platinum",
                  250_000, "7009", ["vip"], 0, "en", "2025-02-01T10:30:00Z"),
        _customer("C-1003", "Slow Case", ["+8613700137000"], "silver", 8_000, "7002",
                  [], 0, "zh", "2024-12-01T08:00:00Z"),
        _customer("C-1004", "Impatient", ["+8613600136000"], "bronze", 900, "7002",
                  ["churn-risk"], 3, "zh", "2025-01-20T16:45:00Z"),
        _customer("C-1005", "Zhang Wei (home)", [shared], "silver", 5_000, "7002",
                  [], 0, "zh", "2024-06-01T12:00:00Z"),
        _customer("C-1006", "Zhang Wei (Acme Trading)", [shared], "platinum", 80_000, "7101",
                  ["vip"], 2, "zh", "2024-11-01T12:00:00Z"),
        _customer("C-1007", "Acme Trading purchasing", [shared], "gold", 150_000, "7001",
                  ["key-account"], 1, "en", "2025-01-15T12:00:00Z"),
        _customer("C-1008", "Acme Trading front desk", [shared], "bronze", 1_000, None,
                  [], 0, "zh", "2025-03-01T12:00:00Z"),
        _customer("C-1009", "Sarah Connor", ["+14155550100"], "gold", 64_000, "7101",
                  ["vip", "english"], 0, "en", "2025-02-14T18:00:00Z"),
        _customer("C-1010", "Wang Fang", ["+862161234567"], None, None, None,
                  ["prospect"], 0, "zh", "2025-02-20T07:15:00Z"),
    ]


def seed_delays() -> dict[str, float]:
    """Per-customer lookup delays of the seed (the slow CRM record of the recordings)."""
    return {"C-1003": SLOW_CASE_DELAY_S}


# --- fault injection ---------------------------------------------------------------------


@dataclass
class Fault:
    """One injected misbehaviour.

    ``kind``: ``delay`` (answer normally after ``delay_s``), ``stall`` (never answer),
    ``status`` (answer ``status``, with ``Retry-After: retry_after`` if set), ``drop``
    (close the connection without an answer), ``bad_json`` (200 with a broken body),
    ``wrong_shape`` (200 with JSON of an unexpected shape). ``path`` is a path prefix
    (None: every ``/api`` path), ``method`` limits it to one method, ``count`` is how many
    responses remain faulty (None: until cleared).
    """

    kind: FaultKind
    path: str | None = None
    method: str | None = None
    status: int = 500
    delay_s: float = 0.0
    retry_after: str | None = None
    count: int | None = None
    id: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request."""
        if self.count is not None and self.count <= 0:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        return self.path is None or path.startswith(self.path)

    @classmethod
    def from_json(cls, data: Any) -> Fault:
        """A fault from the JSON of ``POST /_faults``; ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("the body must be a JSON object")
        unknown = set(data) - {"kind", "path", "method", "status", "delay_s", "retry_after",
                               "count"}
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        kind = data.get("kind")
        if kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {', '.join(FAULT_KINDS)}")
        try:
            fault = cls(
                kind=kind, path=_opt_str(data.get("path")), method=_opt_str(data.get("method")),
                status=int(data.get("status", 500)), delay_s=float(data.get("delay_s", 0.0)),
                retry_after=_opt_str(data.get("retry_after")),
                count=None if data.get("count") is None else int(data["count"]),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad value: {exc}") from exc
        if not 100 <= fault.status <= 599 or fault.delay_s < 0 or fault.delay_s > MAX_STALL_S:
            raise ValueError("status must be 100..599 and delay_s 0..3600")
        return fault


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


class Faults:
    """The injected faults of one sample CRM, controllable in-process or over HTTP."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)
        self.released = asyncio.Event()

    def add(
        self, kind: FaultKind, *, path: str | None = None, method: str | None = None,
        status: int = 500, delay_s: float = 0.0, retry_after: str | None = None,
        count: int | None = None,
    ) -> Fault:
        """Inject a fault (see :class:`Fault`); the newest matching fault wins."""
        return self.add_fault(Fault(kind, path, method, status, delay_s, retry_after, count))

    def add_fault(self, fault: Fault) -> Fault:
        """Inject an already-built fault."""
        fault.id = next(self._ids)
        self._faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault and let stalled requests go (they then answer normally)."""
        self._faults.clear()
        self.released.set()
        self.released = asyncio.Event()

    def take(self, method: str, path: str) -> Fault | None:
        """The fault for this request, if any, counting it down."""
        for fault in reversed(self._faults):
            if fault.matches(method, path):
                if fault.count is not None:
                    fault.count -= 1
                return fault
        return None

    def list(self) -> list[dict[str, Any]]:
        """The active faults as JSON-able dicts."""
        return [asdict(f) for f in self._faults if f.count is None or f.count > 0]


# --- request log -------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedRequest:
    """One request the sample CRM received (for assertions)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: str = field(default_factory=_now)

    @property
    def idempotency_key(self) -> str | None:
        """The ``Idempotency-Key`` header, if sent."""
        return next((v for k, v in self.headers.items() if k.lower() == "idempotency-key"), None)

    def public(self) -> dict[str, Any]:
        """JSON-able, with the Authorization value masked."""
        headers = {k: ("***" if k.lower() == "authorization" else v)
                   for k, v in self.headers.items()}
        return {**asdict(self), "headers": headers, "idempotency_key": self.idempotency_key}


# --- the CRM's state ---------------------------------------------------------------------


class SampleCrm:
    """The data of one sample CRM: customers, created objects, request log, faults."""

    def __init__(
        self,
        customers: Iterable[dict[str, Any]] | None = None,
        faults: Faults | None = None,
        *,
        token: str | None = None,
        delays: dict[str, float] | None = None,
    ) -> None:
        self._seed = [copy.deepcopy(c) for c in (seed_customers() if customers is None
                                                 else customers)]
        self.faults = faults or Faults()
        self.token = token
        self.delays = seed_delays() if delays is None and customers is None else (delays or {})
        self.requests: deque[ReceivedRequest] = deque(maxlen=MAX_LOG)
        self.reset()

    def reset(self) -> None:
        """Customers back to the seed; created objects and the request log emptied."""
        self.customers: dict[str, dict[str, Any]] = {
            c["id"]: copy.deepcopy(c) for c in self._seed
        }
        self.objects: dict[str, dict[str, dict[str, Any]]] = {n: {} for n in COLLECTIONS}
        self.by_key: dict[str, dict[str, str]] = {n: {} for n in COLLECTIONS}
        self.requests.clear()

    def find(self, phone: str) -> list[dict[str, Any]]:
        """Every customer reachable at ``phone`` (compared by digits), in the CRM's order."""
        wanted = _digits(phone)
        return [c for c in self.customers.values()
                if wanted and any(_digits(str(p)) == wanted for p in c.get("phones") or [])]

    def changed(self, since: datetime, offset: int, limit: int) -> tuple[list[Any], str | None]:
        """Customers updated after ``since``, oldest first, one page from ``offset``."""
        selected = sorted(
            (c for c in self.customers.values() if _when(c.get("updated_at")) > since),
            key=lambda c: (_when(c.get("updated_at")), c["id"]),
        )
        page = selected[offset:offset + limit]
        more = offset + limit < len(selected)
        return page, (str(offset + limit) if more else None)

    def create(
        self, collection: str, body: dict[str, Any], key: str | None
    ) -> tuple[dict[str, Any], bool]:
        """Create an object, or return the one made with the same key: ``(object, created)``."""
        if key is not None and key in self.by_key[collection]:
            return self.objects[collection][self.by_key[collection][key]], False
        oid = f"{COLLECTIONS[collection]}-{len(self.objects[collection]) + 1:06d}"
        obj = {**body, "id": oid, "created_at": _now(), "idempotency_key": key}
        if collection == "tasks" and not obj.get("owner"):
            customer = self.customers.get(str(body.get("customer_id")))
            owner = (customer or {}).get("owner") or {}
            obj["owner"] = owner.get("id")
        self.objects[collection][oid] = obj
        if key is not None:
            self.by_key[collection][key] = oid
        return obj, True


def _when(value: Any) -> datetime:
    try:
        parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=UTC)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


STATE: web.AppKey[SampleCrm] = web.AppKey("samplecrm", SampleCrm)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def state_of(app: web.Application) -> SampleCrm:
    """The :class:`SampleCrm` behind an app made by :func:`make_app`."""
    return app[STATE]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw.decode("utf-8", "replace")


# --- middlewares -------------------------------------------------------------------------


@web.middleware
async def _log_and_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Log /api requests, check the token, and apply injected faults."""
    crm = request.app[STATE]
    if request.path.startswith("/_"):
        return await handler(request)
    if request.content_length and request.content_length > MAX_BODY_BYTES:
        return _error(413, "body too large")
    crm.requests.append(ReceivedRequest(
        method=request.method, path=request.path, query=dict(request.query),
        headers=dict(request.headers), body=await _json_body(request),
    ))
    if crm.token and request.headers.get("Authorization") != f"Bearer {crm.token}":
        return _error(401, "missing or wrong bearer token")
    fault = crm.faults.take(request.method, request.path)
    if fault is None:
        return await handler(request)
    return await _apply(fault, crm, request, handler)


async def _apply(
    fault: Fault, crm: SampleCrm, request: web.Request, handler: Handler
) -> web.StreamResponse:
    if fault.kind == "delay":
        await asyncio.sleep(fault.delay_s)
        return await handler(request)
    if fault.kind == "stall":
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(crm.faults.released.wait(), MAX_STALL_S)
        return await handler(request)
    if fault.kind == "status":
        response = _error(fault.status, f"injected HTTP {fault.status}")
        if fault.retry_after is not None:
            response.headers["Retry-After"] = fault.retry_after
        return response
    if fault.kind == "drop":
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError  # nothing more to send on a dropped connection
    if fault.kind == "bad_json":
        return web.Response(text='{"results": [{"id": "C-1001", "name": ',
                            content_type="application/json")
    return web.json_response({"unexpected": "shape", "data": "not what was promised"})


# --- /api handlers -----------------------------------------------------------------------


async def lookup(request: web.Request) -> web.Response:
    """``GET /api/customers?phone=`` → ``{"results": [...]}``."""
    crm = request.app[STATE]
    phone = request.query.get("phone", "")
    if not _digits(phone):
        return _error(400, "query parameter phone is required")
    found = crm.find(phone)
    delay = max((crm.delays.get(c["id"], 0.0) for c in found), default=0.0)
    if delay:
        await asyncio.sleep(delay)
    return web.json_response({"results": found})


async def changed(request: web.Request) -> web.Response:
    """``GET /api/customers/changed?updated_since=&cursor=&limit=`` → one page."""
    crm = request.app[STATE]
    since_text = request.query.get("updated_since") or "1970-01-01T00:00:00Z"
    try:
        since = datetime.fromisoformat(since_text.replace("Z", "+00:00"))
        offset = int(request.query.get("cursor") or 0)
        limit = int(request.query.get("limit") or 50)
    except ValueError:
        return _error(400, "updated_since must be ISO 8601; cursor and limit integers")
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    if offset < 0 or not 1 <= limit <= 500:
        return _error(400, "cursor must be >= 0 and limit 1..500")
    page, next_cursor = crm.changed(since, offset, limit)
    return web.json_response({"results": page, "next_cursor": next_cursor})


async def get_customer(request: web.Request) -> web.Response:
    """``GET /api/customers/{id}``."""
    customer = request.app[STATE].customers.get(request.match_info["id"])
    return web.json_response(customer) if customer else _error(404, "no such customer")


async def put_customer(request: web.Request) -> web.Response:
    """``PUT`` replaces (or creates), ``PATCH`` changes fields; ``updated_at`` is bumped."""
    crm = request.app[STATE]
    cid = request.match_info["id"]
    body = await _json_body(request)
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    existing = crm.customers.get(cid)
    if request.method == "PATCH":
        if existing is None:
            return _error(404, "no such customer")
        updated = {**existing, **body}
    else:
        updated = dict(body)
    updated.update(id=cid, updated_at=_now())
    crm.customers[cid] = updated
    return web.json_response(updated, status=201 if existing is None else 200)


def _create(collection: str) -> Handler:
    async def create(request: web.Request) -> web.Response:
        body = await _json_body(request)
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        obj, created = request.app[STATE].create(
            collection, body, request.headers.get("Idempotency-Key")
        )
        return web.json_response(obj, status=201 if created else 200)

    create.__doc__ = f"``POST /api/{collection}``, idempotent by ``Idempotency-Key``."
    return create


def _object(collection: str) -> Handler:
    async def one(request: web.Request) -> web.Response:
        objects = request.app[STATE].objects[collection]
        obj = objects.get(request.match_info["id"])
        if obj is None:
            return _error(404, f"no such object in {collection}")
        if request.method == "PATCH":
            body = await _json_body(request)
            if not isinstance(body, dict):
                return _error(400, "the body must be a JSON object")
            obj.update({k: v for k, v in body.items() if k not in ("id", "created_at")})
            obj["updated_at"] = _now()
        return web.json_response(obj)

    one.__doc__ = f"``GET`` / ``PATCH /api/{collection}/{{id}}``."
    return one


def _list(collection: str) -> Handler:
    async def listing(request: web.Request) -> web.Response:
        return web.json_response(
            {"results": list(request.app[STATE].objects[collection].values())}
        )

    listing.__doc__ = f"``GET /api/{collection}``."
    return listing


# --- control handlers --------------------------------------------------------------------


async def faults_get(request: web.Request) -> web.Response:
    """``GET /_faults``: the active faults."""
    return web.json_response({"faults": request.app[STATE].faults.list()})


async def faults_post(request: web.Request) -> web.Response:
    """``POST /_faults`` with a :class:`Fault` as JSON: inject it."""
    try:
        fault = Fault.from_json(await _json_body(request))
    except ValueError as exc:
        return _error(400, str(exc))
    return web.json_response(asdict(request.app[STATE].faults.add_fault(fault)), status=201)


async def faults_delete(request: web.Request) -> web.Response:
    """``DELETE /_faults``: clear every fault."""
    request.app[STATE].faults.clear()
    return web.json_response({"faults": []})


async def requests_get(request: web.Request) -> web.Response:
    """``GET /_requests?limit=N``: the newest received requests, oldest first."""
    items = list(request.app[STATE].requests)
    limit = request.query.get("limit", "")
    if limit.isdigit():
        items = items[-int(limit):] if int(limit) else []
    return web.json_response({"requests": [r.public() for r in items]})


async def requests_delete(request: web.Request) -> web.Response:
    """``DELETE /_requests``: forget the log."""
    request.app[STATE].requests.clear()
    return web.json_response({"requests": []})


async def reset(request: web.Request) -> web.Response:
    """``POST /_reset``: seed data back, objects and log emptied, faults cleared."""
    crm = request.app[STATE]
    crm.reset()
    crm.faults.clear()
    return web.json_response({"ok": True})


async def health(request: web.Request) -> web.Response:
    """``GET /_health``."""
    crm = request.app[STATE]
    counts = {name: len(objs) for name, objs in crm.objects.items()}
    return web.json_response({"ok": True, "customers": len(crm.customers), **counts})


def make_app(
    customers: Iterable[dict[str, Any]] | None = None,
    faults: Faults | None = None,
    *,
    token: str | None = None,
    delays: dict[str, float] | None = None,
) -> web.Application:
    """The sample CRM as an aiohttp app (``customers`` None: the seed, with its delays).

    ``token``: when set, ``/api`` requests need ``Authorization: Bearer <token>``.
    ``delays``: per-customer-id lookup delays in seconds.
    """
    app = web.Application(middlewares=[_log_and_faults], client_max_size=MAX_BODY_BYTES)
    app[STATE] = SampleCrm(customers, faults, token=token, delays=delays)
    r = app.router
    r.add_get("/api/customers", lookup)
    r.add_get("/api/customers/changed", changed)
    r.add_get("/api/customers/{id}", get_customer)
    r.add_put("/api/customers/{id}", put_customer)
    r.add_patch("/api/customers/{id}", put_customer)
    for name in COLLECTIONS:
        r.add_post(f"/api/{name}", _create(name))
        r.add_get(f"/api/{name}", _list(name))
        r.add_get(f"/api/{name}/{{id}}", _object(name))
        r.add_patch(f"/api/{name}/{{id}}", _object(name))
    r.add_get("/_faults", faults_get)
    r.add_post("/_faults", faults_post)
    r.add_delete("/_faults", faults_delete)
    r.add_get("/_requests", requests_get)
    r.add_delete("/_requests", requests_delete)
    r.add_post("/_reset", reset)
    r.add_get("/_health", health)
    app.on_shutdown.append(_release_stalls)
    return app


async def _release_stalls(app: web.Application) -> None:
    app[STATE].faults.released.set()


async def start_sample_crm(
    host: str = "127.0.0.1", port: int = 0, app: web.Application | None = None
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` (default: :func:`make_app`) on ``host:port`` (0: any free port).

    Returns the runner (``await runner.cleanup()`` to stop) and the base URL.
    """
    runner = web.AppRunner(
        app or make_app(), handle_signals=False, access_log=None, handler_cancellation=True,
        shutdown_timeout=1.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    server = getattr(site, "_server", None)
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, f"http://{host}:{bound}"


def address(base_url: str) -> tuple[str, int]:
    """Where the sample CRM of ``crm.base_url`` listens (``callroute sample-crm`` and
    ``callroute demo`` alike): the URL's host and port, and without a port the one the
    connector will use for it (80 for http, 443 for https), so that ``serve`` with the
    same config reaches it. The default ``crm.base_url`` is
    :data:`router.crm.config.SAMPLE_CRM_URL` (port 8088)."""
    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "127.0.0.1", port


async def serve_forever(
    settings: Settings, *, host: str | None = None, port: int | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """``callroute sample-crm``: serve on the address of ``crm.base_url`` until stopped.

    A bearer token configured in ``crm.auth`` is required from clients. An address that
    cannot be bound raises :class:`ListenError` (one line: which address, which setting).
    """
    auth = settings.crm.auth
    app = make_app(token=auth.token.get_secret_value() if auth.type == "bearer" else None)
    default_host, default_port = address(settings.crm.base_url)
    host = host or default_host
    port = port if port is not None else default_port
    try:
        runner, url = await start_sample_crm(host, port, app)
    except OSError as exc:
        raise ListenError.from_os_error(
            exc, "crm.base_url", host, port,
            fix="crm.base_url in the config, or pass --port") from exc
    print(f"sample CRM listening on {url} ({len(state_of(app).customers)} customers); "
          f"faults: POST {url}/_faults", flush=True)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()
    return 0
