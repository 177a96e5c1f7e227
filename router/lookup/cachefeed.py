"""Cache invalidations between callroute instances, over Redis pub/sub.

Every instance keeps an in-process LRU in front of the Redis entries they share. When
one instance changes a shared entry on purpose (a webhook invalidation or replacement, a
sync page), it publishes the keyed hashes of the numbers (and the
customer id) on the channel :attr:`~router.keys.Keys.cache_events`, in the same pipeline
as the write; every other instance drops those numbers from its LRU, so its next call
from them reads Redis. Messages carry no phone number in plaintext.

Pub/sub is at-most-once: a message sent while a subscriber is disconnected is lost. So
the feed says since when it has been listening without a break (:attr:`since`), and an
LRU entry stored before that (or at all while the feed is down) is trusted only for
``lru_recheck_s`` before the call path re-reads Redis, as without the feed; an entry
stored while the feed listens is trusted for ``lru_trust_s``.

Message format (text): ``<sender> n <hash> [<hash> ...]`` or ``<sender> c <customer id>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from router.log import detached
from router.metrics import CACHE_ERRORS, CACHE_FEED

log = logging.getLogger(__name__)

#: How long one read of the subscription waits before looping (and noticing a stop).
POLL_S = 1.0
#: Reconnect backoff bounds after the subscription failed.
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0

DropNumbers = Callable[[list[str]], int]
DropCustomer = Callable[[str], int]


def number_message(sender: str, hashes: list[str]) -> str:
    """The message announcing that the entries of these hashed numbers changed."""
    return f"{sender} n {' '.join(hashes)}"


def customer_message(sender: str, customer_id: str) -> str:
    """The message announcing that every entry of a CRM customer changed."""
    return f"{sender} c {customer_id}"


class InvalidationFeed:
    """Listens on the cache channel and drops what other instances changed.

    ``drop_numbers(hashes)`` and ``drop_customer(id)`` act on the local LRU. Start with
    :meth:`start` (idempotent), stop with :meth:`aclose`.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        channel: str,
        drop_numbers: DropNumbers,
        drop_customer: DropCustomer,
    ) -> None:
        self.redis = redis
        self.channel = channel
        #: This instance's id: our own messages are not applied twice.
        self.sender = secrets.token_hex(6)
        #: Monotonic time since which the subscription has been up without a break
        #: (None while it is down).
        self.since: float | None = None
        self._drop_numbers = drop_numbers
        self._drop_customer = drop_customer
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening in the background (no-op when already started)."""
        if self._task is None:
            # started by the first call's lookup, it serves every call after: not that
            # call's context, or each of its log lines would carry that call's id
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="cache-invalidation-feed", context=detached()
            )

    def covers(self, stored_at: float) -> bool:
        """True when every invalidation published since ``stored_at`` (monotonic) has
        reached us: the feed was already up then and has not broken since."""
        return self.since is not None and stored_at >= self.since

    async def aclose(self) -> None:
        """Stop listening."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.since = None

    # -- internals -----------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        task = asyncio.current_task()
        while True:
            try:
                await self._listen()
            except (RedisError, OSError, TimeoutError) as exc:
                if task is not None and task.cancelling():
                    # redis-py turned our cancellation into a connection error: honour it
                    raise asyncio.CancelledError from exc
                CACHE_ERRORS.labels(kind="feed").inc()
                log.warning("cache invalidation feed lost (%s: %s); LRU entries are "
                            "re-checked against Redis until it is back", type(exc).__name__, exc)
            finally:
                if self.since is not None:
                    CACHE_FEED.set(0)
                self.since = None
            await asyncio.sleep(backoff)
            backoff = min(BACKOFF_MAX_S, backoff * 2)

    async def _listen(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            while self.since is None:  # the subscription is only live once confirmed
                message = await pubsub.get_message(timeout=POLL_S)
                if message is not None and message.get("type") == "subscribe":
                    self.since = time.monotonic()
                    CACHE_FEED.set(1)
                    log.info("cache invalidation feed listening on %s", self.channel)
            task = asyncio.current_task()
            while task is None or not task.cancelling():  # a cancel redis-py swallowed
                message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=POLL_S)
                if message is not None and message.get("type") == "message":
                    self.apply(message.get("data"))
            raise asyncio.CancelledError
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def apply(self, data: object) -> int:
        """Apply one message; returns how many LRU entries it dropped. Malformed or own
        messages are ignored (counted when malformed)."""
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
        sender, _, rest = text.partition(" ")
        kind, _, args = rest.partition(" ")
        if sender == self.sender:
            return 0
        if kind == "n" and args:
            return self._drop_numbers(args.split())
        if kind == "c" and args:
            return self._drop_customer(args)
        CACHE_ERRORS.labels(kind="feed_message").inc()
        log.warning("unreadable cache invalidation message ignored: %r", text[:80])
        return 0
