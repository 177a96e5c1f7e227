"""What every vendor-shaped CRM fake shares: a real aiohttp server on loopback that
checks every request it gets and answers in the vendor's documented shapes.

A vendor module subclasses :class:`FakeCrm`: it adds its routes, says how it
authenticates, and how its errors look (:meth:`FakeCrm.error_response`,
:meth:`FakeCrm.rate_limit_response`). Handlers check requests with pydantic models in
strict mode (``extra="forbid"``) and :func:`expect`; a request that does not fit raises
:class:`Violation`, which the fake records in :attr:`FakeCrm.violations` and answers with
the vendor's 400: a preset that sends the wrong shape fails.

Faults (:meth:`FakeCrm.fail_next`): ``error`` (the vendor's 4xx with field errors),
``rate_limit`` (the vendor's rate-limit answer, with ``Retry-After``), ``server`` (500),
``lost`` (the request is carried out, then the connection is dropped: the answer is lost),
``hold`` (carried out, then :attr:`FakeCrm.committed` is set and the answer waits for
:attr:`FakeCrm.release`: a test kills the client meanwhile). A fault applies to the
requests of one path prefix and method, and ``when`` (a test of the request's JSON body)
tells apart the calls of one endpoint (Odoo's ``/jsonrpc``).

The people every fake is seeded with are :data:`PEOPLE`, stored the way people type
numbers, so that the same scenarios run against every preset.

An update of a stored object (the vendor's PATCH/PUT/``write``) is checked like a
create and recorded in :attr:`FakeCrm.changes`: the object's state after each update,
so a test can see that an update sent twice left the object as once.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError


class Violation(Exception):
    """A request that does not fit the vendor's documented shape."""


def expect(condition: bool, why: str) -> None:
    """Raise :class:`Violation` with ``why`` unless ``condition``."""
    if not condition:
        raise Violation(why)


class Strict(BaseModel):
    """Base of request models: unknown keys and loose types are violations."""

    model_config = ConfigDict(extra="forbid", strict=True)


def check(model: type[Strict], data: Any, what: str) -> Any:
    """``data`` validated by ``model``; a mismatch is a :class:`Violation`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in exc.errors()
        )
        raise Violation(f"{what}: {problems}") from None


def check_query(request: web.Request, allowed: set[str], required: set[str] = frozenset()
                ) -> dict[str, str]:
    """The query as a dict; unknown, repeated or missing parameters are violations."""
    keys = list(request.query.keys())
    unknown = sorted(set(keys) - allowed)
    expect(not unknown, f"unknown query parameter(s) {unknown}")
    expect(len(keys) == len(set(keys)), f"repeated query parameter(s) in {keys}")
    missing = sorted(required - set(keys))
    expect(not missing, f"missing query parameter(s) {missing}")
    return dict(request.query)


def digits(text: Any) -> str:
    """The digits of a stored number."""
    return "".join(ch for ch in str(text or "") if ch.isdigit())


@dataclass(frozen=True)
class Person:
    """One seeded customer, vendor-neutral."""

    key: str
    first: str
    last: str
    phone: str
    tier: str | None
    value: float | None
    owner: str | None
    tags: tuple[str, ...]
    tickets: int
    language: str
    updated: str
    kind: Literal["contact", "lead"] = "contact"


#: Owners: neutral key -> their name; each fake gives them vendor ids.
OWNERS = {"o1": ("Na", "Li", "7001"), "o2": ("Wei", "Wang", "7002")}

#: The seed: numbers as people type them (with and without country code).
PEOPLE = (
    Person("li", "Lei", "Li", "+86 138 0013 8000", "Gold", 52000.0, "o1", ("repeat-buyer",), 1,
           "zh", "2025-01-10T09:00:00Z"),
    Person("sarah", "Sarah", "Connor", "(415) 555-0100", "Platinum", 250000.0, "o2",
           ("vip", "english"), 0, "en", "2025-02-14T18:00:00Z"),
    Person("decoy", "Sam", "Decoy", "(212) 555-0100", "Bronze", 900.0, "o1", (), 0, "en",
           "2025-01-20T16:45:00Z"),
    Person("wang", "Fang", "Wang", "021 6123 4567", None, None, "o2", (), 0, "zh",
           "2025-02-20T07:15:00Z", kind="lead"),
)
#: Caller numbers of the scenarios (E.164) and whom they must find.
LI, SARAH, WANG, UNKNOWN = "+8613800138000", "+14155550100", "+862161234567", "+8613999999999"

FaultKind = Literal["error", "rate_limit", "server", "lost", "hold"]


@dataclass
class Seen:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class Change:
    """One update the fake carried out: what was updated and the object after it."""

    kind: str
    id: str
    after: Any


@dataclass
class _Fault:
    kind: FaultKind
    path: str | None
    method: str | None
    count: int
    when: Callable[[Any], bool] | None = None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeCrm:
    """A vendor-shaped CRM on 127.0.0.1 (see the module doc)."""

    #: The vendor's name (preset name).
    NAME: ClassVar[str] = "fake"
    #: Retry-After the rate-limit answer carries (seconds).
    RETRY_AFTER: ClassVar[int] = 2

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.violations: list[str] = []
        #: every update carried out, in order (the object as it was after each)
        self.changes: list[Change] = []
        self.url = ""
        self._faults: list[_Fault] = []
        self._runner: web.AppRunner | None = None
        #: set when a ``hold`` fault's request was carried out; its answer waits for release
        self.committed = asyncio.Event()
        self.release = asyncio.Event()

    # --- to implement per vendor ---------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        """Register the vendor's endpoints."""
        raise NotImplementedError

    def check_auth(self, request: web.Request) -> str | None:
        """None when the request authenticates, else why not."""
        raise NotImplementedError

    def error_response(self, status: int, why: str) -> web.StreamResponse:
        """The vendor's error answer (400 for a bad request, 401 for bad credentials)."""
        raise NotImplementedError

    def rate_limit_response(self) -> web.StreamResponse:
        """The vendor's rate-limit answer."""
        raise NotImplementedError

    # --- running ---------------------------------------------------------------------------

    async def start(self) -> str:
        """Serve on a free loopback port; returns the base URL."""
        app = web.Application(middlewares=[self._middleware])
        self.add_routes(app.router)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        """Stop serving."""
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeCrm:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def fail_next(self, kind: FaultKind, *, path: str | None = None, method: str | None = None,
                  count: int = 1, when: Callable[[Any], bool] | None = None) -> None:
        """Make the next ``count`` matching requests fail with ``kind`` (``when``: a test
        of the JSON body too)."""
        self._faults.append(_Fault(kind, path, method, count, when))

    def record_change(self, kind: str, oid: Any, obj: Any) -> None:
        """Record that object ``oid`` of ``kind`` was updated and is now ``obj``."""
        self.changes.append(Change(kind, str(oid), copy.deepcopy(obj)))

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        """The requests received, optionally only those of one method / path prefix."""
        return [s for s in self.seen if (method is None or s.method == method)
                and (path is None or s.path.startswith(path))]

    def _fault(self, request: web.Request, body: Any) -> _Fault | None:
        for fault in self._faults:
            if fault.count > 0 and (fault.path is None or request.path.startswith(fault.path)) \
                    and (fault.method is None or fault.method == request.method) \
                    and (fault.when is None or fault.when(body)):
                fault.count -= 1
                return fault
        return None

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = raw.decode("utf-8", "replace")
        seen = Seen(request.method, request.path, dict(request.query), dict(request.headers),
                    body)
        self.seen.append(seen)
        response = await self._answer(request, body, handler)
        seen.status = response.status
        return response

    async def _answer(self, request: web.Request, body: Any, handler: Handler
                      ) -> web.StreamResponse:
        why = self.check_auth(request)
        if why is not None:
            self.violations.append(f"{request.method} {request.path}: {why}")
            return self.error_response(401, why)
        if request.method in ("POST", "PUT", "PATCH") and (
                request.content_type != "application/json" or not isinstance(body, dict | list)):
            return self._violation(request, "the body must be JSON with Content-Type "
                                            "application/json")
        fault = self._fault(request, body)
        if fault is not None and fault.kind not in ("lost", "hold"):
            return (self.rate_limit_response() if fault.kind == "rate_limit"
                    else self.error_response(500 if fault.kind == "server" else 400,
                                             "injected error: field is invalid"))
        try:
            response = await handler(request)
        except Violation as exc:
            return self._violation(request, str(exc))
        if fault is not None and fault.kind == "hold":  # carried out; the answer waits
            self.committed.set()
            await self.release.wait()
        elif fault is not None:  # lost: carried out, then the answer never arrives
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        return response

    def _violation(self, request: web.Request, why: str) -> web.StreamResponse:
        self.violations.append(f"{request.method} {request.path}: {why}")
        return self.error_response(400, why)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    """A JSON answer."""
    return web.json_response(data, status=status, headers=headers)
