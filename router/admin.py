"""The admin HTTP API: health, readiness, metrics, explain, presence, outbox, webhook.

Bound to loopback by default (see :func:`router.auth.access.check_exposure` for
elsewhere). Every route declares who may use it (:mod:`router.auth.access`): a role's
permission (:mod:`router.auth.roles`) checked on ``Authorization: Bearer <token>`` or
the pages' sign-in cookie, or, for the probes and the CRM webhook (HMAC-signed), why
nobody needs to sign in. ``admin.token``, when set, is a token of user ``admin``.

====================  =================================================================
``GET /healthz``      the process is alive (always 200)
``GET /readyz``       200 when every part answers, else 503 with what is down
``GET /metrics``      Prometheus text format
``GET /api/explain``  ``?number=&did=&at=``: the decision trace, as ``callroute explain --json``
``GET /api/presence`` agent device states as AMI last reported them
``GET /api/outbox``   outbox depth, oldest entry age, dead letters
``GET /api/whoami``   the caller's user, role and agent id
``POST /webhooks/crm`` the CRM says a customer changed (signed; see router.lookup.webhook)
====================  =================================================================
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.auth.access import (
    AuthContext,
    access_middleware,
    principal_of,
    public,
    requires,
    signed,
)
from router.auth.access import signed_in as _signed_in
from router.auth.roles import Permission, Principal, Role
from router.auth.users import Directory
from router.metrics import REGISTRY
from router.rules.presence import Presence

Check = Callable[[], Awaitable[bool]]
Explain = Callable[[str, str | None, datetime | None], Awaitable[Mapping[str, Any]]]
Status = Callable[[], Awaitable[Mapping[str, Any]]]



@dataclass
class AdminDeps:
    """What the admin API shows; every part is optional."""

    checks: dict[str, Check] = field(default_factory=dict)
    explain: Explain | None = None
    presence: Presence | None = None
    outbox_status: Status | None = None
    #: ``admin.token`` (user ``admin``), when no ``auth`` is given
    token: str = ""
    #: the users in force and the session codec (default: ``token`` alone)
    auth: AuthContext | None = None


def auth_context(deps: AdminDeps) -> AuthContext:
    """The deps' :class:`AuthContext`, or one holding only ``admin.token``."""
    if deps.auth is None:
        deps.auth = AuthContext(Directory(static=[(Principal("admin", Role.ADMIN), deps.token)]))
    return deps.auth


def make_admin_app(deps: AdminDeps) -> web.Application:
    """Build the aiohttp application (webhook and page routes are added by the caller;
    each declares its access rule, and the middleware refuses routes that do not)."""
    app = web.Application(middlewares=[access_middleware(auth_context(deps))],
                          client_max_size=1024 * 1024)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz(deps))
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/api/explain", _explain(deps))
    app.router.add_get("/api/presence", _presence(deps))
    app.router.add_get("/api/outbox", _outbox(deps))
    app.router.add_get("/api/whoami", _whoami)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body, default=str, ensure_ascii=False, indent=1),
        status=status, content_type="application/json",
    )


@public("liveness probe: says only that the process answers")
async def _healthz(_: web.Request) -> web.Response:
    return _json({"status": "ok"})


def _readyz(deps: AdminDeps) -> Handler:
    @public("readiness probe: which parts answer, no data")
    async def handler(_: web.Request) -> web.Response:
        results: dict[str, bool] = {}
        for name, check in deps.checks.items():
            try:
                results[name] = bool(await check())
            except Exception:
                results[name] = False
        ok = all(results.values())
        return _json({"ready": ok, "checks": results}, status=200 if ok else 503)

    return handler


@requires(Permission.STATUS)
async def _metrics(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _explain(deps: AdminDeps) -> Handler:
    @requires(Permission.CUSTOMERS)
    async def handler(request: web.Request) -> web.Response:
        if deps.explain is None:
            return _json({"error": "explain is not available"}, status=503)
        number = request.query.get("number")
        if not number:
            return _json({"error": "query parameter 'number' is required"}, status=400)
        at = None
        if "at" in request.query:
            try:
                at = datetime.fromisoformat(request.query["at"])
            except ValueError:
                return _json({"error": "'at' must be an ISO 8601 time"}, status=400)
        return _json(await deps.explain(number, request.query.get("did"), at))

    return handler


def _presence(deps: AdminDeps) -> Handler:
    @requires(Permission.STATUS)
    async def handler(_: web.Request) -> web.Response:
        return _json(deps.presence.snapshot() if deps.presence else {})

    return handler


def _outbox(deps: AdminDeps) -> Handler:
    @requires(Permission.STATUS)
    async def handler(_: web.Request) -> web.Response:
        if deps.outbox_status is None:
            return _json({"error": "the outbox is not enabled"}, status=503)
        return _json(await deps.outbox_status())

    return handler


@_signed_in
async def _whoami(request: web.Request) -> web.Response:
    principal = principal_of(request)
    return _json({"user": principal.user, "role": str(principal.role),
                  "agent": principal.agent})


def add_crm_webhook(app: web.Application, cache: Any, settings: Any) -> None:
    """Mount ``POST /webhooks/crm`` (router.lookup.webhook), whose handler checks the CRM's
    HMAC signature itself: no principal needed, the signature is the credential."""
    from router.lookup.webhook import PATH, make_webhook_handler

    handler = make_webhook_handler(cache, settings)
    app.router.add_post(PATH, signed("HMAC-SHA256 with admin.webhook_secret, checked by "
                                     "the handler")(handler))
