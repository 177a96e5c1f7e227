"""``POST /webhooks/<name>``: a CRM tells callroute a customer changed, so the cache follows.

What a CRM's webhook looks like (signature scheme, event names, where the record and
its numbers are, how to fetch a record the event only names) is configured per CRM in
``crm.webhooks`` and decoded by a :class:`~router.crm.base.ChangeReceiver`
(:mod:`router.crm.webhooks`); this module applies the changes to the cache.

callroute's own scheme (``POST /webhooks/crm``, for CRMs you can program)
--------------------------------------------------------------------------
Configure the same secret on both sides (``admin.webhook_secret`` here). For each
webhook send::

    POST /webhooks/crm
    Content-Type: application/json
    X-Callroute-Timestamp: <unix time in whole seconds, e.g. 1767225600>
    X-Callroute-Signature: sha256=<hex>

where ``<hex>`` is the lower-case hex HMAC-SHA256, keyed with the secret (UTF-8), of the
bytes ``<timestamp>`` + ``.`` + ``<raw request body>``. In Python::

    mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()

(:func:`router.crm.webhooks.sign` does exactly this). The body is JSON::

    {"event": "customer.updated" | "customer.deleted",
     "customer_id": "C42",
     "numbers": ["+8613800138000", ...],      # the customer's numbers (any format)
     "customer": {...}}                       # optional: the new record, our Customer shape

Answers (every receiver): 200 applied (or the acknowledgement the CRM expects, such as
Salesforce's SOAP ``Ack``); 400 ``bad_json`` (not JSON/XML) or ``bad_shape`` naming the
path that was missing; 401 ``bad_signature`` or ``stale`` (timestamp outside the
window); 409 ``replay`` (a timestamped signature accepted before); 413 body too large;
503 not configured, or Redis unavailable (the CRM retries). Never 500. Every answer is
logged when refused and counted in ``callroute_webhooks{outcome}``.

Effect of each change: ``deleted``, or ``updated`` without a record, invalidates the
entries of the listed numbers and of every number cached for the customer id (via the
index); ``updated`` with a record replaces them: the old numbers of that customer are
dropped and each listed number is cached with the new record, fresh from now. An update
without a record whose receiver can fetch is then fetched by id in the background (at
most ``max_fetches`` at once) and the fetched record cached for its numbers: the
invalidation already made the cache correct, the fetch only warms it again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web
from redis.exceptions import RedisError

from router.crm.base import ChangeReceiver, CustomerChange, InboundRequest
from router.errors import CacheError, CrmError, WebhookError
from router.lookup.cache import CacheEntry, TwoLevelCache
from router.metrics import WEBHOOKS
from router.phone import normalize

log = logging.getLogger(__name__)

PATH = "/webhooks/crm"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: Told of each applied webhook (the audit trail): the request, its changes, the result.
Applied = Callable[[web.Request, Sequence[CustomerChange], dict[str, int]], Awaitable[None]]


class WebhookEndpoint:
    """One receiver's endpoint; :meth:`handler` is its aiohttp handler."""

    def __init__(
        self,
        cache: TwoLevelCache,
        receiver: ChangeReceiver | None,
        region: str,
        *,
        clock: Callable[[], float] = time.time,
        max_fetches: int = 32,
        on_applied: Applied | None = None,
    ) -> None:
        self.cache = cache
        self.on_applied = on_applied
        self.receiver = receiver
        self.region = region
        self.clock = clock
        self.max_fetches = max_fetches
        self._fetches: set[asyncio.Task[None]] = set()

    def handler(self) -> Handler:
        """A fresh coroutine function handling the requests (each mount may mark its own
        with an access rule)."""

        async def handle(request: web.Request) -> web.StreamResponse:
            return await self.handle(request)

        return handle

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one webhook request (see the module docstring)."""
        try:
            result = await self._handle(request)
        except WebhookError as refused:
            WEBHOOKS.labels(outcome=refused.outcome).inc()
            log.warning("webhook %s refused (%s, %d): %s", request.path, refused.outcome,
                        refused.status, refused)
            return web.json_response({"error": refused.outcome, "detail": str(refused)},
                                     status=refused.status)
        WEBHOOKS.labels(outcome="ok").inc()
        answer = self.receiver.answer() if self.receiver is not None else None
        if answer is not None:
            return web.Response(body=answer[1], content_type=answer[0])
        return web.json_response({"ok": True, **result})

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) for the background fetches, then cancel what is left."""
        if self._fetches:
            _done, pending = await asyncio.wait(set(self._fetches), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _handle(self, request: web.Request) -> dict[str, int]:
        receiver = self.receiver
        if receiver is None:
            raise WebhookError(503, "not_configured", "no webhook is configured here "
                               "(admin.webhook_secret, or crm.webhooks)")
        body = await _read_body(request, receiver.max_bytes)
        inbound = InboundRequest(
            method=request.method, url=str(request.url), headers=request.headers,
            query=request.query, body=body,
        )
        message = await receiver.receive(inbound, self.clock())
        if message.nonce is not None:
            await self._claim(message.nonce, receiver.replay_ttl_s)
        try:
            result = await self._apply(message.changes)
        except CacheError as exc:
            if message.nonce is not None:
                await self._unclaim(message.nonce)
            raise WebhookError(503, "redis_unavailable", f"cache not updated: {exc}") from exc
        result["ignored"] = message.ignored
        if self.on_applied is not None and message.changes:
            await self.on_applied(request, message.changes, result)
        return result

    async def _apply(self, changes: Sequence[CustomerChange]) -> dict[str, int]:
        dropped = replaced = fetching = 0
        now = self.clock()
        for change in changes:
            numbers = self._e164(change.customer_id, change.numbers)
            dropped += await self.cache.invalidate_customer(change.customer_id, strict=True)
            dropped += await self.cache.invalidate_numbers(numbers, strict=True)
            if change.event == "updated" and change.customer is not None and numbers:
                entry = CacheEntry(change.customer, now)
                await self.cache.put_many(((n, entry) for n in numbers), strict=True)
                replaced += len(numbers)
            elif change.fetch and self._fetch_later(change.customer_id):
                fetching += 1
        log.info("webhook: %d change(s): %d cache entries dropped, %d replaced, %d fetching",
                 len(changes), dropped, replaced, fetching)
        return {"changes": len(changes), "invalidated": dropped, "replaced": replaced,
                "fetching": fetching}

    def _e164(self, customer_id: str, raw_numbers: Sequence[str]) -> list[str]:
        numbers: list[str] = []
        for raw in raw_numbers:
            number = normalize(raw, self.region)
            if number.e164 is None:
                log.warning("webhook for %s: ignoring a number that is not E.164-able (%s)",
                            customer_id, number.kind)
            elif number.e164 not in numbers:
                numbers.append(number.e164)
        return numbers

    def _fetch_later(self, customer_id: str) -> bool:
        if len(self._fetches) >= self.max_fetches:
            log.warning("webhook: %d fetches running; %s is invalidated, not fetched",
                        len(self._fetches), customer_id)
            return False
        task = asyncio.create_task(self._fetch(customer_id), name=f"webhook-fetch-{customer_id}")
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)
        return True

    async def _fetch(self, customer_id: str) -> None:
        assert self.receiver is not None
        try:
            fetched = await self.receiver.fetch(customer_id)
        except CrmError as exc:
            log.warning("webhook: fetching %s failed (%s: %s); its entries stay invalidated",
                        customer_id, exc.kind, exc)
            return
        if fetched is None:
            log.info("webhook: %s is gone from the CRM; its entries stay invalidated",
                     customer_id)
            return
        customer, raw_numbers = fetched
        numbers = self._e164(customer_id, raw_numbers)
        if not numbers:
            return
        entry = CacheEntry(customer, self.clock())
        try:
            await self.cache.invalidate_customer(customer.id, strict=True)
            await self.cache.put_many(((n, entry) for n in numbers), strict=True)
        except CacheError as exc:
            log.warning("webhook: fetched %s but could not cache it: %s", customer_id, exc)
            return
        log.info("webhook: fetched %s, %d number(s) cached", customer_id, len(numbers))

    async def _claim(self, nonce: str, ttl_s: float) -> None:
        """Accept each nonce once: SET NX with a TTL covering the timestamp window."""
        key = self.cache.keys.webhook_nonces + nonce.removeprefix("sha256=")
        try:
            fresh = await self.cache.redis.set(key, b"1", nx=True, ex=max(1, math.ceil(ttl_s)))
        except (RedisError, OSError, TimeoutError) as exc:
            self.cache.health.failed("webhook", exc)
            raise WebhookError(503, "redis_unavailable", "cannot check for replays") from exc
        if not fresh:
            raise WebhookError(409, "replay", "this signature was already accepted")

    async def _unclaim(self, nonce: str) -> None:
        """Forget a claimed nonce so the CRM's retry of a failed webhook is accepted."""
        key = self.cache.keys.webhook_nonces + nonce.removeprefix("sha256=")
        try:
            await self.cache.redis.delete(key)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning("could not release webhook signature after failure: %s", exc)


def add_webhook_routes(app: web.Application, cache: TwoLevelCache,
                       receivers: Sequence[ChangeReceiver], region: str) -> list[WebhookEndpoint]:
    """Mount one endpoint per receiver (tests; the admin server mounts them with their
    access rule in :func:`router.admin.add_crm_webhook`)."""
    endpoints = []
    for receiver in receivers:
        endpoint = WebhookEndpoint(cache, receiver, region)
        app.router.add_post(receiver.path, endpoint.handler())
        endpoints.append(endpoint)
    return endpoints


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise WebhookError(413, "too_large", f"body of {request.content_length} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise WebhookError(413, "too_large", f"body over {limit} bytes")
        chunks.append(chunk)


__all__ = ["PATH", "WebhookEndpoint", "add_webhook_routes"]
