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
``GET /api/outbox``   outbox depth, oldest entry age, dead letters (503 while Redis is
                      down: spool depth and ``"redis": "down"``)
``GET /api/whoami``   the caller's user, role and agent id
``POST /webhooks/crm`` the CRM says a customer changed (signed; see router.lookup.webhook)
``GET /recordings/..`` a call recording, by the signed link in its record (ami.recordings)
====================  =================================================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from router.audit import AuditEntry, AuditLog, state_hash
from router.auth.access import (
    AuthContext,
    access_middleware,
    peer_of,
    principal_of,
    public,
    request_entry,
    requires,
    signed,
)
from router.auth.access import signed_in as _signed_in
from router.auth.roles import CRM_WEBHOOK, Permission, Principal, Role
from router.auth.users import Directory
from router.errors import CacheError as CacheUnavailable
from router.errors import CallrouteError, ConfigError
from router.metrics import REGISTRY
from router.rules.presence import Presence

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]
#: Reload the rules: ``(replaced, before hash, after hash, message)``.
Reload = Callable[[], Awaitable[tuple[bool, str, str, str]]]
#: Forget cached numbers / a customer: ``(entries dropped, targets, before hash)``.
Invalidate = Callable[[list[str], str | None], Awaitable[tuple[int, list[str], str]]]
#: Dead letters back into the outbox: the record keys moved.
Retry = Callable[[list[str] | None], Awaitable[list[str]]]
#: Records sent again: the record keys queued.
Replay = Callable[[list[str] | None, datetime | None, datetime | None, bool],
                  Awaitable[list[str]]]
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
    #: the audit trail (default: none kept, entries only logged)
    audit: AuditLog | None = None
    reload_rules: Reload | None = None
    invalidate: Invalidate | None = None
    outbox_retry: Retry | None = None
    outbox_replay: Replay | None = None
    #: ``number`` -> the audit trail's target for it (a keyed hash, never the number)
    number_target: Callable[[str], str] = lambda _number: "number:?"


def auth_context(deps: AdminDeps) -> AuthContext:
    """The deps' :class:`AuthContext`, or one holding only ``admin.token``."""
    if deps.auth is None:
        deps.auth = AuthContext(Directory(static=[(Principal("admin", Role.ADMIN), deps.token)]))
    return deps.auth


def make_admin_app(deps: AdminDeps) -> web.Application:
    """Build the aiohttp application (webhook and page routes are added by the caller;
    each declares its access rule, and the middleware refuses routes that do not)."""
    app = web.Application(middlewares=[_unavailable, access_middleware(auth_context(deps))],
                          client_max_size=1024 * 1024)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz(deps))
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/api/explain", _explain(deps))
    app.router.add_get("/api/presence", _presence(deps))
    app.router.add_get("/api/outbox", _outbox(deps))
    app.router.add_get("/api/whoami", _whoami)
    app.router.add_get("/api/audit", _audit_list(deps))
    app.router.add_post("/api/rules/reload", _rules_reload(deps))
    app.router.add_post("/api/cache/invalidate", _cache_invalidate(deps))
    app.router.add_post("/api/outbox/retry", _outbox_retry(deps))
    app.router.add_post("/api/outbox/replay", _outbox_replay(deps))
    return app


async def _audit(deps: AdminDeps, entry: AuditEntry) -> None:
    if deps.audit is not None:
        await deps.audit.write(entry)
    else:
        log.info("audit: %s by %s (%s) on %s from %s: %s", entry.action, entry.who,
                 entry.role, entry.target, entry.source, entry.outcome)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(body, default=str, ensure_ascii=False, indent=1),
        status=status, content_type="application/json",
    )


@web.middleware
async def _unavailable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Redis (or another store) that cannot be reached answers 503 with one line, and
    one log line, instead of a 500 and a traceback (an operator retrying dead letters
    or reading the audit trail while Redis is down)."""
    try:
        return await handler(request)
    except (RedisError, OSError) as exc:
        what = f"{type(exc).__name__}: {exc}"
        log.warning("%s %s: unavailable: %s", request.method, request.path, what)
        return _json({"error": "unavailable", "detail": what}, status=503)


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
        try:
            result = dict(await deps.explain(number, request.query.get("did"), at))
        except ConfigError as exc:  # a time without offset that fits no single zone
            return _json({"error": str(exc)}, status=400)
        customer = result.get("customer")
        target = (f"customer:{customer.get('id')}" if isinstance(customer, dict)
                  else deps.number_target(number))
        await _audit(deps, request_entry(request, "customer.read", target,
                                         after=state_hash(result)))
        return _json(result)

    return handler


def _presence(deps: AdminDeps) -> Handler:
    @requires(Permission.STATUS)
    async def handler(_: web.Request) -> web.Response:
        return _json(deps.presence.snapshot() if deps.presence else {})

    return handler


def _outbox(deps: AdminDeps) -> Handler:
    """What is known about the outbox; 503 when part of it (Redis) could not be read,
    with the rest (the disk spool) still in the body."""

    @requires(Permission.STATUS)
    async def handler(_: web.Request) -> web.Response:
        if deps.outbox_status is None:
            return _json({"error": "the outbox is not enabled"}, status=503)
        try:
            status = await deps.outbox_status()
        except Exception as exc:  # whatever broke, the operator gets a line, not a 500
            log.warning("outbox status failed: %s: %s", type(exc).__name__, exc)
            return _json({"error": f"outbox status failed: {type(exc).__name__}: {exc}"},
                         status=503)
        return _json(status, status=503 if status.get("redis") == "down" else 200)

    return handler


@_signed_in
async def _whoami(request: web.Request) -> web.Response:
    principal = principal_of(request)
    return _json({"user": principal.user, "role": str(principal.role),
                  "agent": principal.agent})


def add_crm_webhook(app: web.Application, cache: Any, settings: Any,
                    audit: AuditLog | None = None, connector: Any = None) -> None:
    """Mount the CRM's change webhooks (router.lookup.webhook): ``POST /webhooks/crm``
    (callroute's own scheme, ``admin.webhook_secret``) and one route per
    ``crm.webhooks`` receiver. Each handler checks the CRM's signature itself: no
    principal needed, the signature is the credential. ``connector`` (the lookup's)
    maps the records webhooks carry and fetches those they only name; each applied
    change goes to the audit trail."""
    from router.crm.webhooks import WebhookReceiver, callroute_webhook
    from router.lookup.webhook import PATH, WebhookEndpoint

    async def applied(request: web.Request, changes: Any, result: dict[str, int]) -> None:
        if audit is None:
            return
        for change in changes:
            await audit.write(AuditEntry(
                who=CRM_WEBHOOK.user, role=str(CRM_WEBHOOK.role), action="cache.invalidate",
                target=f"customer:{change.customer_id}", source=peer_of(request),
                after=state_hash(change.customer.model_dump(mode="json")
                                 if change.customer is not None else None),
                outcome=f"ok: {change.name or change.event}, "
                        f"{result.get('invalidated', 0)} dropped, "
                        f"{result.get('replaced', 0)} replaced"
                        + (", fetching" if change.fetch else "")))

    admin = settings.admin
    region = settings.phone.default_region
    own = None
    secret = admin.webhook_secret.get_secret_value()
    if secret:
        own = WebhookReceiver(callroute_webhook(secret, admin.webhook_tolerance_s,
                                                admin.webhook_max_bytes))
    endpoints = [WebhookEndpoint(cache, own, region, on_applied=applied)]
    app.router.add_post(PATH, signed("HMAC-SHA256 with admin.webhook_secret, checked by "
                                     "the handler")(endpoints[0].handler()))
    for config in settings.crm.enabled_webhooks:
        receiver = WebhookReceiver.for_connector(config, connector)
        endpoint = WebhookEndpoint(cache, receiver, region, on_applied=applied)
        endpoints.append(endpoint)
        app.router.add_post(config.mount, signed(
            f"{config.signature.scheme} signature of crm.webhooks {config.name}, checked by "
            "the handler")(endpoint.handler()))

    async def drain(_: web.Application) -> None:
        for endpoint in endpoints:
            await endpoint.drain(1.0)

    app.on_cleanup.append(drain)


def _time(text: str | None, name: str) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"'{name}' must be an ISO 8601 "
                                                  "time"}), content_type="application/json"
                                 ) from exc
    return value if value.tzinfo else value.astimezone()


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text='{"error": "the body must be JSON"}',
                                 content_type="application/json") from exc
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "the body must be a JSON object"}',
                                 content_type="application/json")
    return body


def _strings(body: dict[str, Any], name: str) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value) \
            or len(value) > 1000:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"'{name}' must be a list of at "
                                                  "most 1000 strings"}),
                                 content_type="application/json")
    return value


def _audit_list(deps: AdminDeps) -> Handler:
    @requires(Permission.AUDIT)
    async def handler(request: web.Request) -> web.Response:
        if deps.audit is None:
            return _json({"error": "the audit trail is not available"}, status=503)
        q = request.query
        since, until = _time(q.get("since"), "since"), _time(q.get("until"), "until")
        try:
            limit = max(1, min(int(q.get("limit", "100")), 10_000))
        except ValueError:
            return _json({"error": "'limit' must be a number"}, status=400)
        entries = await deps.audit.entries(
            since=since.timestamp() if since else None, until=until.timestamp() if until
            else None, who=q.get("who") or None, action=q.get("action") or None, limit=limit)
        return _json([e.to_dict() for e in entries])

    return handler


def _rules_reload(deps: AdminDeps) -> Handler:
    @requires(Permission.RULES)
    async def handler(request: web.Request) -> web.Response:
        if deps.reload_rules is None:
            return _json({"error": "rules reload is not available"}, status=503)
        replaced, before, after, message = await deps.reload_rules()
        await _audit(deps, request_entry(request, "rules.reload", "rules", before=before,
                                         after=after,
                                         outcome="ok" if replaced else "refused"))
        return _json({"replaced": replaced, "message": message},
                     status=200 if replaced else 422)

    return handler


def _cache_invalidate(deps: AdminDeps) -> Handler:
    @requires(Permission.CACHE)
    async def handler(request: web.Request) -> web.Response:
        if deps.invalidate is None:
            return _json({"error": "the cache is not available"}, status=503)
        body = await _body(request)
        numbers = _strings(body, "numbers") or []
        customer = body.get("customer_id")
        if customer is not None and (not isinstance(customer, str) or not customer):
            return _json({"error": "'customer_id' must be a string"}, status=400)
        if not numbers and not customer:
            return _json({"error": "give 'numbers' or 'customer_id'"}, status=400)
        try:
            dropped, targets, before = await deps.invalidate(numbers, customer)
        except CallrouteError as exc:
            await _audit(deps, request_entry(request, "cache.invalidate", "cache",
                                             outcome=f"failed: {exc}"))
            return _json({"error": "the cache could not be changed", "detail": str(exc)},
                         status=503)
        await _audit(deps, request_entry(request, "cache.invalidate", ",".join(targets),
                                         before=before, after=state_hash(None)))
        return _json({"invalidated": dropped})

    return handler


def _outbox_retry(deps: AdminDeps) -> Handler:
    @requires(Permission.OUTBOX)
    async def handler(request: web.Request) -> web.Response:
        if deps.outbox_retry is None:
            return _json({"error": "the outbox is not enabled"}, status=503)
        wanted = _strings(await _body(request), "keys")
        moved = await deps.outbox_retry(wanted)
        await _audit(deps, request_entry(request, "outbox.retry", ",".join(moved) or "-",
                                         before=state_hash(sorted(wanted or ["*"])),
                                         after=state_hash(sorted(moved))))
        return _json({"retried": moved})

    return handler


def _outbox_replay(deps: AdminDeps) -> Handler:
    @requires(Permission.OUTBOX)
    async def handler(request: web.Request) -> web.Response:
        if deps.outbox_replay is None:
            return _json({"error": "the outbox is not enabled"}, status=503)
        body = await _body(request)
        wanted = _strings(body, "keys")
        since, until = _time(body.get("since"), "since"), _time(body.get("until"), "until")
        dead = body.get("dead") is True
        if not (wanted or since or until or dead):
            return _json({"error": "give 'keys', 'since'/'until' or 'dead'"}, status=400)
        queued = await deps.outbox_replay(wanted, since, until, dead)
        await _audit(deps, request_entry(
            request, "outbox.replay", ",".join(queued) or "-",
            before=state_hash({"keys": wanted, "since": since, "until": until, "dead": dead}),
            after=state_hash(sorted(queued))))
        return _json({"replayed": queued})

    return handler


def connect_actions(deps: AdminDeps, settings: Any, *, watcher: Any, cache: Any,
                    outbox_redis: Any | None) -> None:
    """Give the API its actions on the running service: rules reload (``watcher``, a
    :class:`~router.rules.ruleswatch.RulesWatcher`), cache invalidation (``cache``, a
    :class:`~router.lookup.cache.TwoLevelCache`), outbox retry and replay (the outbox's
    Redis client, when the outbox runs). Reloads by signal or by the file watcher are
    audited too, as ``system``."""
    from router.phone import normalize
    from router.records import outbox_cli
    from router.records.outbox import keys_from_settings

    region = settings.phone.default_region

    def target(number: str) -> str:
        e164 = normalize(number, region).e164
        return f"number:{cache.keys.number_hash(e164)}" if e164 else "number:unreadable"

    deps.number_target = target

    async def reload() -> tuple[bool, str, str, str]:
        before = watcher.digest
        replaced = watcher.reload("api")
        message = "rules replaced" if replaced else "rules file rejected (see the log); " \
            "the previous rules stay in force"
        return replaced, before, watcher.digest, message

    deps.reload_rules = reload

    def on_reload(trigger: str, before: str, after: str, replaced: bool) -> None:
        if trigger != "api" and deps.audit is not None:
            deps.audit.record(AuditEntry(
                who="system", role="admin", action="rules.reload", target="rules",
                source=trigger, before=before, after=after,
                outcome="ok" if replaced else "refused"))

    watcher.listeners.append(on_reload)

    async def invalidate(numbers: list[str], customer: str | None
                         ) -> tuple[int, list[str], str]:
        e164s = [e for e in (normalize(n, region).e164 for n in numbers) if e]
        targets = [f"number:{cache.keys.number_hash(e)}" for e in e164s]
        keys = [cache.keys.customer(e) for e in e164s]
        try:
            raw = await cache.redis.mget(keys) if keys else []
        except Exception as exc:
            raise CacheUnavailable(f"redis read failed: {exc}") from exc
        before = state_hash([r for r in raw if r is not None] or None)
        dropped = await cache.invalidate_numbers(e164s, strict=True) if e164s else 0
        if customer:
            targets.append(f"customer:{customer}")
            dropped += await cache.invalidate_customer(customer, strict=True)
        return dropped, targets, before

    deps.invalidate = invalidate
    if outbox_redis is None:
        return
    keys = keys_from_settings(settings)

    async def retry(wanted: list[str] | None) -> list[str]:
        return await outbox_cli.retry_dead(outbox_redis, keys, wanted)

    async def replay(wanted: list[str] | None, since: datetime | None, until: datetime | None,
                     dead: bool) -> list[str]:
        # delivered records are not sent again from here (the CLI's --force does that)
        done = await outbox_cli.replay(outbox_redis, keys, record_keys=wanted, since=since,
                                       until=until, dead=dead)
        return done.queued

    deps.outbox_retry = retry
    deps.outbox_replay = replay


def add_recordings(app: web.Application, handler: Handler) -> None:
    """Mount ``GET /recordings/{name}`` (ami.recordings), whose handler checks the link's
    HMAC signature itself: a CRM user follows the link from a call record, signed in to
    callroute or not; the signature is the credential."""
    async def recording(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    app.router.add_get("/recordings/{name}", signed(
        "HMAC-SHA256 of the file name with recordings.key, checked by the handler")(recording))
