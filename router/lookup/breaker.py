"""A circuit breaker in front of the CRM (no I/O: the caller reports outcomes).

States::

    closed --(``failures`` consecutive CRM-side failures)--> open
    open   --(``cooldown_s`` elapsed)--> half-open
    half-open: exactly one probe request is let through;
               success -> closed, failure -> open again

Only failures that say the CRM is in trouble count (:func:`counts`): timeouts, refused or
dropped connections, 5xx and unreadable JSON. "Unknown caller" is an answer, not a
failure; 4xx and mapping errors are our configuration's fault, and opening the circuit
would not help. A 429 (rate limited) does not count either: the CRM is healthy and asks
us to slow down, which the connector's rate gate does (it holds lookups back until the
CRM's limit resets, :mod:`router.crm.limits`); a burst of new callers must never open
the circuit and leave every caller unrouted for a cooldown.

``callroute_breaker_open`` is 1 while open, 0.5 while half-open, 0 while closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import StrEnum

from router.errors import (
    CrmBadResponse,
    CrmServerError,
    CrmTimeout,
    CrmUnavailable,
)
from router.metrics import BREAKER_STATE

log = logging.getLogger(__name__)

_COUNTED = (CrmTimeout, CrmUnavailable, CrmServerError, CrmBadResponse)


def counts(exc: BaseException) -> bool:
    """True when ``exc`` is a CRM-side failure the breaker should count."""
    return isinstance(exc, _COUNTED)


class State(StrEnum):
    """Breaker state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_GAUGE = {State.CLOSED: 0.0, State.OPEN: 1.0, State.HALF_OPEN: 0.5}


class CircuitBreaker:
    """Consecutive-failure breaker with a single half-open probe.

    Use: ``if breaker.allow(): try request; breaker.success() / breaker.failure(exc)``.
    A caller that was allowed but ends without an outcome (cancelled) calls
    :meth:`release` so a half-open probe slot is not lost.
    """

    def __init__(
        self, failures: int, cooldown_s: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.threshold = failures
        self.cooldown_s = cooldown_s
        self.clock = clock
        self.state = State.CLOSED
        self.consecutive = 0
        self.open_until = 0.0
        self._probing = False
        BREAKER_STATE.set(0.0)

    def _set(self, state: State) -> None:
        if state is not self.state:
            log.log(logging.WARNING if state is State.OPEN else logging.INFO,
                    "CRM circuit breaker %s -> %s", self.state, state)
        self.state = state
        BREAKER_STATE.set(_GAUGE[state])

    def allow(self) -> bool:
        """May a request go to the CRM now? In half-open, True for one probe only."""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if self.clock() < self.open_until:
                return False
            self._set(State.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    @property
    def retry_in(self) -> float:
        """Seconds until the open circuit lets a probe through (0 when not open)."""
        return max(0.0, self.open_until - self.clock()) if self.state is State.OPEN else 0.0

    def success(self) -> None:
        """The CRM answered (a customer or "unknown"): close."""
        self.consecutive = 0
        self._probing = False
        self._set(State.CLOSED)

    def failure(self, exc: BaseException) -> None:
        """A request failed; only CRM-side failures (:func:`counts`) count."""
        if not counts(exc):
            self.release()
            return
        self._probing = False
        self.consecutive += 1
        if self.state is State.HALF_OPEN or self.consecutive >= self.threshold:
            self._open()

    def release(self) -> None:
        """An allowed request ended without an outcome (cancelled, or not a CRM failure)."""
        self._probing = False

    def _open(self) -> None:
        self.open_until = max(self.open_until, self.clock() + self.cooldown_s)
        self._set(State.OPEN)

