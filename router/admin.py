"""The admin HTTP API: health, readiness, metrics, explain, presence, outbox, webhook.

Bound to loopback by default. When ``admin.token`` is set, every route except
``/healthz`` and the CRM webhook (which has its own HMAC signature) requires
``Authorization: Bearer <token>``.

====================  =================================================================
``GET /healthz``      the process is alive (always 200)
``GET /readyz``       200 when every part answers, else 503 with what is down
``GET /metrics``      Prometheus text format
``GET /api/explain``  ``?number=&did=&at=``: the decision trace, as ``callroute explain --json``
``GET /api/presence`` agent device states as AMI last reported them
``GET /api/outbox``   outbox depth, oldest entry age, dead letters
``POST /webhooks/crm`` the CRM says a customer changed (signed; see router.lookup.webhook)
====================  =================================================================
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.metrics import REGISTRY
from router.rules.presence import Presence

Check = Callable[[], Awaitable[bool]]
Explain = Callable[[str, str | None, datetime | None], Awaitable[Mapping[str, Any]]]
Status = Callable[[], Awaitable[Mapping[str, Any]]]

OPEN_PATHS = frozenset({"/healthz", "/webhooks/crm"})


@dataclass
class AdminDeps:
    """What the admin API shows; every part is optional."""

    checks: dict[str, Check] = field(default_factory=dict)
    explain: Explain | None = None
    presence: Presence | None = None
    outbox_status: Status | None = None
    token: str = ""


def make_admin_app(deps: AdminDeps) -> web.Application:
    """Build the aiohttp application (webhook routes are added by the caller)."""
    app = web.Application(middlewares=[_auth(deps.token)], client_max_size=1024 * 1024)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz(deps))
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/api/explain", _explain(deps))
    app.router.add_get("/api/presence", _presence(deps))
    app.router.add_get("/api/outbox", _outbox(deps))
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _auth(token: str) -> Any:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and request.path not in OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return _json({"error": "unauthorized"}, status=401)
        return await handler(request)

    return middleware


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body, default=str, ensure_ascii=False, indent=1),
        status=status, content_type="application/json",
    )


async def _healthz(_: web.Request) -> web.Response:
    return _json({"status": "ok"})


def _readyz(deps: AdminDeps) -> Handler:
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


async def _metrics(_: web.Request) -> web.Response:
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _explain(deps: AdminDeps) -> Handler:
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
    async def handler(_: web.Request) -> web.Response:
        return _json(deps.presence.snapshot() if deps.presence else {})

    return handler


def _outbox(deps: AdminDeps) -> Handler:
    async def handler(_: web.Request) -> web.Response:
        if deps.outbox_status is None:
            return _json({"error": "the outbox is not enabled"}, status=503)
        return _json(await deps.outbox_status())

    return handler
