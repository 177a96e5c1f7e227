"""Rolling windows for the supervisor's live figures (in-process, bounded, no I/O)."""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Window(Generic[K]):
    """Counts of keys seen in the last ``span_s`` seconds (one entry per event)."""

    def __init__(self, span_s: float, clock: Callable[[], float] = time.time,
                 max_items: int = 200_000) -> None:
        self.span_s = span_s
        self.clock = clock
        self._items: deque[tuple[float, K]] = deque(maxlen=max_items)

    def add(self, key: K) -> None:
        """Count one ``key`` now."""
        self._items.append((self.clock(), key))

    def _prune(self) -> None:
        edge = self.clock() - self.span_s
        items = self._items
        while items and items[0][0] < edge:
            items.popleft()

    def counts(self) -> Counter[K]:
        """Key → count over the window."""
        self._prune()
        return Counter(key for _, key in self._items)


class Samples:
    """Values (e.g. latencies) seen in the last ``span_s`` seconds, with percentiles."""

    def __init__(self, span_s: float, clock: Callable[[], float] = time.time,
                 max_items: int = 50_000) -> None:
        self.span_s = span_s
        self.clock = clock
        self._items: deque[tuple[float, float]] = deque(maxlen=max_items)

    def add(self, value: float) -> None:
        """Record ``value`` now."""
        self._items.append((self.clock(), value))

    def values(self) -> list[float]:
        """The values in the window, oldest first."""
        edge = self.clock() - self.span_s
        while self._items and self._items[0][0] < edge:
            self._items.popleft()
        return [v for _, v in self._items]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1, nearest rank) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


class CounterRate:
    """Success share of monotonic counters over a window, from periodic samples.

    ``sample(ok, failed)`` takes the counters' current totals; :meth:`rate` compares the
    newest sample with the oldest one still inside the window.
    """

    def __init__(self, span_s: float, clock: Callable[[], float] = time.time) -> None:
        self.span_s = span_s
        self.clock = clock
        self._samples: deque[tuple[float, float, float]] = deque()

    def sample(self, ok: float, failed: float) -> None:
        """Record the totals now; keep one sample just outside the window as a base."""
        now = self.clock()
        self._samples.append((now, ok, failed))
        edge = now - self.span_s
        while len(self._samples) > 2 and self._samples[1][0] <= edge:
            self._samples.popleft()

    def rate(self) -> tuple[float | None, int]:
        """(successes / attempts, attempts) over the window; (None, 0) without attempts."""
        if len(self._samples) < 2:
            return None, 0
        _, ok0, bad0 = self._samples[0]
        _, ok1, bad1 = self._samples[-1]
        ok, bad = max(0.0, ok1 - ok0), max(0.0, bad1 - bad0)
        attempts = int(ok + bad)
        return (ok / attempts if attempts else None), attempts
