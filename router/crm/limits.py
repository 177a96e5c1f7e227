"""The CRM's own rate limits, read from its answers, and the per-CRM pace of lookups.

Reading (pure, :func:`read_limits`): every answer's headers are read for what the CRM
says about its budget, in each style real CRMs use:

==============================================  ==============================================
``Retry-After``                                 seconds or an HTTP-date (RFC 9110)
``X-RateLimit-Remaining`` / ``-Reset``          also ``RateLimit-*`` and ``X-Rate-Limit-*``;
(``-Limit``)                                    reset as seconds from now, or an epoch in s
                                                or ms (told apart by size)
``X-HubSpot-RateLimit-Remaining`` / ``-Max`` /  the rolling window (10 s): none left means
``-Interval-Milliseconds``, ``-Secondly-*``,    wait for the window; daily quota exhausted
``-Daily-Remaining``                            means wait ``exhausted_pause_s``
``Sforce-Limit-Info: api-usage=N/M``            Salesforce's 24-hour org quota; at M it
                                                answers 403 ``REQUEST_LIMIT_EXCEEDED``
==============================================  ==============================================

A 429, or a 4xx whose body carries one of ``limit_error_codes`` (Salesforce's 403
``REQUEST_LIMIT_EXCEEDED``), is a rate limit: :class:`~router.errors.CrmRateLimited`
with the wait the headers give (``default_retry_s`` when they give none), bounded:
at least ``min_pause_s`` (``Retry-After: 0``, a negative value or a past date would
have the reads sent again at once, in a loop) and at most ``max_pause_s`` (one
``Retry-After: 999999`` would hold every request for days).

Acting (:class:`RateGate`, one per CRM per process, shared by the lookup and posting
connectors): a rate limit, or a successful answer saying nothing is left before a
reset, *pauses* the CRM for that long. Requests during a pause wait for its end when it
ends within their queue bound (``lookup_queue_s`` for lookups, ``queue_s`` for the
rest), else they fail at once with CrmRateLimited, without being sent. Lookups are
also paced at ``lookups_per_s`` (burst ``lookups_burst``; 0 = unpaced), in-process: the
call path never waits on Redis for its budget.

Budgets: lookups and posts have *separate* budgets. Posts are paced by the outbox's
token bucket (``outbox.rate_per_s``), shared by every instance through Redis, because
the delivery backlog after an outage must not starve the calls ringing now; lookups
are paced here, per instance. Size them so that ``lookups_per_s`` x instances +
``outbox.rate_per_s`` stays under the CRM's limit. The CRM's own signals (429, limit
headers) pause both in the process that sees them, and the outbox bucket carries a
pause to every instance's delivery.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from router.errors import CrmRateLimited
from router.metrics import CRM_LIMIT_REMAINING, CRM_LIMIT_WAITS

log = logging.getLogger(__name__)


class HeldBack(CrmRateLimited):
    """Not sent: the CRM's limit resets later than this request may wait."""


class RateLimitSettings(BaseModel):
    """Rate limits towards one CRM (the ``crm.limits`` section)."""

    model_config = ConfigDict(extra="forbid")

    lookups_per_s: float = Field(0.0, ge=0, description="pace of lookups per instance; 0 = off")
    lookups_burst: float = Field(10.0, ge=1)
    lookup_queue_s: float = Field(
        5.0, ge=0, description="a lookup waits this long at most for the CRM's limit to reset "
        "(in the background: the caller keeps its deadline)")
    queue_s: float = Field(
        5.0, ge=0, description="other requests (posts, sync) wait this long at most; beyond, "
        "they fail as rate limited and are retried later")
    default_retry_s: float = Field(1.0, gt=0, description="pause after a 429 that says no time")
    exhausted_pause_s: float = Field(
        300.0, gt=0, description="pause when a daily quota is used up (HubSpot, Salesforce)")
    min_pause_s: float = Field(
        0.5, gt=0, description="shortest pause after a rate limit: a Retry-After of 0, "
        "negative or in the past (a CRM saying 0 in a loop) is not hammered")
    max_pause_s: float = Field(
        3600.0, gt=0, description="longest pause taken from a header (Retry-After: 999999 "
        "does not park delivery for days: records wait in the retry set, lookups fall back)")

    @model_validator(mode="after")
    def _bounds(self) -> RateLimitSettings:
        if self.min_pause_s > self.max_pause_s:
            raise ValueError(f"min_pause_s {self.min_pause_s:g} is over max_pause_s "
                             f"{self.max_pause_s:g}")
        return self
    limit_error_codes: list[str] = Field(
        default_factory=lambda: ["REQUEST_LIMIT_EXCEEDED"],
        description="error codes in a 4xx body that mean 'rate limited' (Salesforce: 403)")


@dataclass(frozen=True)
class Limits:
    """What one answer said about the budget (None: it did not say)."""

    retry_after: float | None = None
    remaining: float | None = None
    limit: float | None = None
    reset_in: float | None = None
    exhausted: bool = False  # a daily quota is used up
    style: str = ""

    def wait(self, settings: RateLimitSettings, limited: bool) -> float | None:
        """Seconds to pause for: after a rate limit always, otherwise only when nothing
        is left (None: no pause). Whatever the headers say, a pause is at most
        ``max_pause_s``, and after a rate limit at least ``min_pause_s``."""
        wait: float | None = None
        if self.retry_after is not None:
            wait = self.retry_after
        elif self.exhausted:
            wait = settings.exhausted_pause_s
        elif self.remaining is not None and self.remaining <= 0:
            wait = self.reset_in if self.reset_in is not None else settings.default_retry_s
        if wait is None and limited:
            wait = self.reset_in if self.reset_in is not None else settings.default_retry_s
        if wait is None:
            return None
        floor = settings.min_pause_s if limited else 0.0
        return min(max(wait, floor), settings.max_pause_s)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date).

    None when absent or unreadable; never negative.
    """
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN check
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _number(headers: Mapping[str, str], *names: str) -> float | None:
    for name in names:
        value = headers.get(name)
        if value is None:
            continue
        try:
            number = float(value.split(",")[0].strip())
        except ValueError:
            continue
        if number == number:  # not NaN
            return number
    return None


def _reset_in(value: float, now: float) -> float:
    """A reset header as seconds from now: an epoch in ms or s (by size), or a delta."""
    if value > 1e12:
        return max(0.0, value / 1000.0 - now)
    if value > 1e9:
        return max(0.0, value - now)
    return max(0.0, value)


_SFORCE = re.compile(r"api-usage=(\d+)/(\d+)")


def read_limits(headers: Mapping[str, str], now: float | None = None) -> Limits:
    """What ``headers`` say about the CRM's budget (pure; ``headers`` case-insensitive,
    as aiohttp's are; a plain dict is looked up as given)."""
    wall = time.time() if now is None else now
    retry = parse_retry_after(headers.get("Retry-After"),
                              datetime.fromtimestamp(wall, UTC))
    hub_remaining = _number(headers, "X-HubSpot-RateLimit-Remaining")
    if hub_remaining is not None or "X-HubSpot-RateLimit-Daily-Remaining" in headers:
        interval = _number(headers, "X-HubSpot-RateLimit-Interval-Milliseconds")
        secondly = _number(headers, "X-HubSpot-RateLimit-Secondly-Remaining")
        daily = _number(headers, "X-HubSpot-RateLimit-Daily-Remaining")
        reset = interval / 1000.0 if interval is not None else None
        remaining = hub_remaining
        if secondly is not None and secondly <= 0 and (remaining is None or remaining > 0):
            remaining, reset = 0.0, 1.0
        return Limits(retry, remaining, _number(headers, "X-HubSpot-RateLimit-Max"), reset,
                      exhausted=daily is not None and daily <= 0, style="hubspot")
    sforce = headers.get("Sforce-Limit-Info")
    if sforce:
        match = _SFORCE.search(sforce)
        if match:
            used, limit = float(match.group(1)), float(match.group(2))
            return Limits(retry, max(0.0, limit - used), limit, None,
                          exhausted=used >= limit, style="salesforce")
    remaining = _number(headers, "X-RateLimit-Remaining", "RateLimit-Remaining",
                        "X-Rate-Limit-Remaining")
    reset = _number(headers, "X-RateLimit-Reset", "RateLimit-Reset", "X-Rate-Limit-Reset")
    if remaining is not None or reset is not None:
        return Limits(retry, remaining,
                      _number(headers, "X-RateLimit-Limit", "RateLimit-Limit",
                              "X-Rate-Limit-Limit"),
                      _reset_in(reset, wall) if reset is not None else None, style="ratelimit")
    return Limits(retry_after=retry, style="retry-after" if retry is not None else "")


def limit_error(body: bytes, codes: list[str]) -> bool:
    """Whether a 4xx body names one of the configured rate-limit error codes."""
    if not codes or not body:
        return False
    text = body[:4096].decode("utf-8", "replace")
    return any(code in text for code in codes)


class RateGate:
    """Pauses and paces the requests to one CRM in this process (see the module)."""

    def __init__(
        self, settings: RateLimitSettings | None = None, *, crm: str = "crm",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings or RateLimitSettings()
        self.crm = crm
        self.clock = clock
        self.paused_until = 0.0
        rate = self.settings.lookups_per_s
        self._rate = rate
        self._tokens = self.settings.lookups_burst
        self._stamp = clock()

    @property
    def pause_left(self) -> float:
        """Seconds until the CRM may be asked again (0 when not paused)."""
        return max(0.0, self.paused_until - self.clock())

    def observe(self, op: str, limits: Limits, *, limited: bool) -> float | None:
        """Take note of an answer; return the pause it caused (None: none)."""
        if limits.remaining is not None:
            CRM_LIMIT_REMAINING.labels(self.crm).set(limits.remaining)
        wait = limits.wait(self.settings, limited)
        if wait is None:
            return None
        until = self.clock() + wait
        if until > self.paused_until:
            self.paused_until = until
            log.warning("crm %s: %s; pausing requests to %s for %.2f s",
                        op, "rate limited" if limited else "no budget left before the reset",
                        self.crm, wait)
        return wait

    def queue_bound(self, op: str) -> float:
        """The longest an ``op`` request waits for its turn."""
        return self.settings.lookup_queue_s if op == "lookup" else self.settings.queue_s

    async def admit(self, op: str) -> float:
        """Wait for this request's turn; CrmRateLimited (not sent) when the wait would be
        longer than the op's queue bound. Returns the time waited."""
        lookup = op == "lookup"
        bound = self.queue_bound(op)
        wait = self.pause_left
        if lookup and self._rate > 0:
            wait = max(wait, self._pace_wait())
        if wait <= 0:
            if lookup and self._rate > 0:
                self._tokens -= 1
            return 0.0
        if wait > bound:
            CRM_LIMIT_WAITS.labels(op, "refused").inc()
            raise HeldBack(
                f"{self.crm} {op}: held back, the CRM's rate limit resets in {wait:.1f} s",
                retry_after=wait,
            )
        CRM_LIMIT_WAITS.labels(op, "queued").inc()
        if lookup and self._rate > 0:
            self._tokens -= 1  # reserved now: later callers queue behind this one
        await asyncio.sleep(wait)
        return wait

    def _pace_wait(self) -> float:
        now = self.clock()
        self._tokens = min(self.settings.lookups_burst,
                           self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate


__all__ = [
    "HeldBack",
    "Limits",
    "RateGate",
    "RateLimitSettings",
    "limit_error",
    "parse_retry_after",
    "read_limits",
]
