"""``POST /webhooks/crm``: the CRM tells callroute a customer changed, so the cache follows.

Signing scheme (for the CRM administrator)
------------------------------------------
Configure the same secret on both sides (``admin.webhook_secret`` here). For each
webhook send::

    POST /webhooks/crm
    Content-Type: application/json
    X-Callroute-Timestamp: <unix time in whole seconds, e.g. 1767225600>
    X-Callroute-Signature: sha256=<hex>

where ``<hex>`` is the lower-case hex HMAC-SHA256, keyed with the secret (UTF-8), of the
bytes ``<timestamp>`` + ``.`` + ``<raw request body>``. In Python::

    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()

(:func:`sign` does exactly this). The body is JSON::

    {"event": "customer.updated" | "customer.deleted",
     "customer_id": "C42",
     "numbers": ["+8613800138000", ...],      # the customer's numbers (any format)
     "customer": {...}}                       # optional: the new record, our Customer shape

Answers: 200 applied; 400 not JSON or not that shape; 401 bad/missing signature or a
timestamp more than ``admin.webhook_tolerance_s`` away from our clock; 409 this exact
signature was already accepted (a replay: each signature is accepted once); 413 body over
``admin.webhook_max_bytes``; 503 webhook not configured, or Redis unavailable (retry
later). Never 500. Every refusal is logged and counted in ``callroute_webhooks{outcome}``.

Effect: ``customer.deleted``, or ``customer.updated`` without a record, invalidates the
entries of the listed numbers and of every number cached for the customer id (via the
index); ``customer.updated`` with a record replaces them: the old numbers of that customer
are dropped and each listed number is cached with the new record, fresh from now.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from router.errors import CacheError
from router.lookup.cache import CacheEntry, TwoLevelCache
from router.metrics import WEBHOOKS
from router.models import Customer
from router.phone import normalize
from router.settings import Settings

log = logging.getLogger(__name__)

PATH = "/webhooks/crm"
SIGNATURE_HEADER = "X-Callroute-Signature"
TIMESTAMP_HEADER = "X-Callroute-Timestamp"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sign(secret: str, timestamp: str | int, body: bytes) -> str:
    """The ``X-Callroute-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class WebhookPayload(BaseModel):
    """The body of a CRM webhook."""

    model_config = ConfigDict(extra="ignore")

    event: Literal["customer.updated", "customer.deleted"]
    customer_id: str = Field(min_length=1, max_length=256)
    numbers: list[str] = Field(default_factory=list, max_length=100)
    customer: Customer | None = None


class _Refused(Exception):
    """A request refused with ``status``; ``outcome`` labels the metric."""

    def __init__(self, status: int, outcome: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.outcome = outcome


#: Told of each applied webhook (the audit trail): the request, its payload, the result.
Applied = Callable[[web.Request, "WebhookPayload", dict[str, int]], Awaitable[None]]


def make_webhook_handler(
    cache: TwoLevelCache, settings: Settings, *, clock: Callable[[], float] = time.time,
    on_applied: Applied | None = None,
) -> Handler:
    """The aiohttp handler for ``POST /webhooks/crm`` (see the module docstring)."""
    admin = settings.admin
    region = settings.phone.default_region

    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            result = await _handle(request)
        except _Refused as refused:
            WEBHOOKS.labels(outcome=refused.outcome).inc()
            log.warning("webhook refused (%s, %d): %s", refused.outcome, refused.status, refused)
            return web.json_response({"error": refused.outcome, "detail": str(refused)},
                                     status=refused.status)
        WEBHOOKS.labels(outcome="ok").inc()
        return web.json_response({"ok": True, **result})

    async def _handle(request: web.Request) -> dict[str, int]:
        if not admin.webhook_secret:
            raise _Refused(503, "not_configured", "admin.webhook_secret is empty")
        body = await _read_body(request, admin.webhook_max_bytes)
        signature = _check_signature(request, body, admin.webhook_secret.get_secret_value())
        _check_timestamp(request, clock(), admin.webhook_tolerance_s)
        payload = _parse(body)
        await _claim(cache, signature, admin.webhook_tolerance_s)
        try:
            result = await _apply(cache, payload, region, clock())
        except CacheError as exc:
            await _unclaim(cache, signature)
            raise _Refused(503, "redis_unavailable", f"cache not updated: {exc}") from exc
        if on_applied is not None:
            await on_applied(request, payload, result)
        return result

    return handler


def add_webhook_routes(app: web.Application, cache: TwoLevelCache, settings: Settings) -> None:
    """Mount ``POST /webhooks/crm`` on ``app``."""
    app.router.add_post(PATH, make_webhook_handler(cache, settings))


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _Refused(413, "too_large", f"body of {request.content_length} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _Refused(413, "too_large", f"body over {limit} bytes")
        chunks.append(chunk)


def _check_signature(request: web.Request, body: bytes, secret: str) -> str:
    given = request.headers.get(SIGNATURE_HEADER, "")
    stamp = request.headers.get(TIMESTAMP_HEADER, "")
    if not given or not stamp:
        raise _Refused(401, "bad_signature", "signature or timestamp header missing")
    expected = sign(secret, stamp, body)
    if not hmac.compare_digest(given.strip().lower().encode(), expected.encode()):
        raise _Refused(401, "bad_signature", "signature does not match")
    return expected


def _check_timestamp(request: web.Request, now: float, tolerance: float) -> None:
    stamp = request.headers.get(TIMESTAMP_HEADER, "")
    try:
        sent = int(stamp)
    except ValueError as exc:
        raise _Refused(401, "stale", f"timestamp {stamp[:20]!r} is not unix seconds") from exc
    if abs(now - sent) > tolerance:
        raise _Refused(401, "stale", f"timestamp {sent} is {now - sent:+.0f}s off our clock")


def _parse(body: bytes) -> WebhookPayload:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Refused(400, "bad_json", f"body is not JSON: {exc}") from exc
    try:
        payload = WebhookPayload.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise _Refused(400, "bad_json", f"{where}: {first['msg']}") from exc
    if payload.customer is not None and payload.customer.id != payload.customer_id:
        raise _Refused(400, "bad_json", "customer.id differs from customer_id")
    return payload


async def _claim(cache: TwoLevelCache, signature: str, tolerance: float) -> None:
    """Accept each signature once: SET NX with a TTL covering the timestamp window."""
    key = cache.keys.webhook_nonces + signature.removeprefix("sha256=")
    try:
        fresh = await cache.redis.set(key, b"1", nx=True, ex=int(2 * tolerance) + 1)
    except (RedisError, OSError, TimeoutError) as exc:
        cache.health.failed("webhook", exc)
        raise _Refused(503, "redis_unavailable", "cannot check for replays") from exc
    if not fresh:
        raise _Refused(409, "replay", "this signature was already accepted")


async def _unclaim(cache: TwoLevelCache, signature: str) -> None:
    """Forget a claimed signature so the CRM's retry of a failed webhook is accepted."""
    key = cache.keys.webhook_nonces + signature.removeprefix("sha256=")
    try:
        await cache.redis.delete(key)
    except (RedisError, OSError, TimeoutError) as exc:
        log.warning("could not release webhook signature after failure: %s", exc)


async def _apply(
    cache: TwoLevelCache, payload: WebhookPayload, region: str, now: float
) -> dict[str, int]:
    numbers: list[str] = []
    for raw in payload.numbers:
        number = normalize(raw, region)
        if number.e164 is None:
            log.warning("webhook for %s: ignoring a number that is not E.164-able (%s)",
                        payload.customer_id, number.kind)
            continue
        numbers.append(number.e164)
    dropped = await cache.invalidate_customer(payload.customer_id, strict=True)
    dropped += await cache.invalidate_numbers(numbers, strict=True)
    replaced = 0
    if payload.event == "customer.updated" and payload.customer is not None and numbers:
        entry = CacheEntry(payload.customer, now)
        await cache.put_many(((n, entry) for n in numbers), strict=True)
        replaced = len(numbers)
    log.info("webhook %s %s: %d cache entries dropped, %d replaced",
             payload.event, payload.customer_id, dropped, replaced)
    return {"invalidated": dropped, "replaced": replaced}
