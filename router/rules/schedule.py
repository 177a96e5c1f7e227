"""Named time windows for routing rules: weekly opening hours in a time zone, plus holidays.

A schedule in the rules file looks like::

    business-hours:
      timezone: Asia/Shanghai          # IANA name, checked against the zoneinfo database
      hours:
        mon-fri: "09:00-18:00"         # a day range, one window
        sat: ["10:00-12:00", "13:00-16:00"]   # several windows
        sun: closed
      holidays:
        - 2025-10-01                    # a bare date
        - {date: 2025-10-02, name: National Day}

Rules of interpretation (all in the schedule's own wall-clock time, so DST is handled by
the time zone database):

* Day keys are ``mon`` .. ``sun``, ranges ``mon-fri`` (wrapping ranges such as ``fri-mon``
  work) and comma lists ``mon,wed,fri``. A day given twice gets the union of its windows.
* A window ``HH:MM-HH:MM`` is open from its start (included) to its end (excluded);
  ``24:00`` is allowed as an end. An end before the start is an overnight window:
  ``fri: "22:00-06:00"`` is open Friday 22:00 to Saturday 06:00.
* A holiday closes the whole local calendar date, including the tail of an overnight
  window that spills into it; an overnight window that starts on a holiday is not opened.

:class:`Schedule` is the compiled, immutable form: ``state(at)`` is a few integer
comparisons and is safe on the call path.
"""

from __future__ import annotations

import re
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, field_validator

from router.models import ZoneName, load_zone

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
_DAY_SECONDS = 86_400


class HolidaySpec(BaseModel):
    """A closed date, optionally named (the name shows in decision traces)."""

    model_config = ConfigDict(extra="forbid")

    date: date
    name: str | None = None


class ScheduleSpec(BaseModel):
    """One named schedule as written in the rules file."""

    model_config = ConfigDict(extra="forbid")

    timezone: ZoneName
    hours: dict[str, str | list[str]] = Field(default_factory=dict)
    holidays: list[date | HolidaySpec] = Field(default_factory=list)

    @field_validator("hours")
    @classmethod
    def _hours(cls, value: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        for key, windows in value.items():
            parse_days(key)
            for text in [windows] if isinstance(windows, str) else windows:
                parse_window(text)
        return value


def parse_days(key: str) -> list[int]:
    """Weekday numbers (Monday = 0) named by ``mon``, ``mon-fri`` or ``mon,wed,fri``."""
    days: list[int] = []
    for part in key.lower().split(","):
        part = part.strip()
        first, sep, last = part.partition("-")
        if first not in DAYS or (sep and last not in DAYS):
            raise ValueError(f"bad day {part!r} in {key!r} (use mon..sun, mon-fri, mon,wed)")
        start = DAYS.index(first)
        end = DAYS.index(last) if sep else start
        days.extend((start + i) % 7 for i in range((end - start) % 7 + 1))
    return days


def parse_window(text: str) -> tuple[int, int] | None:
    """``"09:00-18:00"`` → seconds since midnight (start, end); None for ``closed``.

    The end is smaller than the start for an overnight window.
    """
    if text.strip().lower() == "closed":
        return None
    match = _WINDOW.match(text)
    if not match:
        raise ValueError(f"bad window {text!r} (use HH:MM-HH:MM or closed)")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        raise ValueError(f"bad time in window {text!r}")
    start, end = (h1 * 60 + m1) * 60, (h2 * 60 + m2) * 60
    if start == end:
        raise ValueError(f"empty window {text!r} (use 00:00-24:00 for all day)")
    return start, end


def _hhmm(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}"


@dataclass(frozen=True, slots=True)
class Schedule:
    """A compiled schedule: per weekday, its own windows and the overnight spill-in."""

    name: str
    zone: zoneinfo.ZoneInfo
    #: per weekday, windows (start, end) in seconds since midnight, end <= 86400
    windows: tuple[tuple[tuple[int, int], ...], ...]
    #: per weekday, end of the longest overnight tail spilling in from the day before (0: none)
    spill: tuple[int, ...]
    holidays: dict[date, str]

    @classmethod
    def compile(cls, name: str, spec: ScheduleSpec) -> Schedule:
        """Build the fast form from a validated spec."""
        windows: list[list[tuple[int, int]]] = [[] for _ in DAYS]
        spill = [0] * 7
        for key, value in spec.hours.items():
            for text in [value] if isinstance(value, str) else value:
                window = parse_window(text)
                if window is None:
                    continue
                start, end = window
                for day in parse_days(key):
                    if end > start:
                        windows[day].append((start, end))
                    else:
                        windows[day].append((start, _DAY_SECONDS))
                        nxt = (day + 1) % 7
                        spill[nxt] = max(spill[nxt], end)
        holidays: dict[date, str] = {}
        for item in spec.holidays:
            if isinstance(item, HolidaySpec):
                holidays[item.date] = item.name or "holiday"
            else:
                holidays[item] = "holiday"
        return cls(
            name=name,
            zone=load_zone(spec.timezone),
            windows=tuple(tuple(sorted(w)) for w in windows),
            spill=tuple(spill),
            holidays=holidays,
        )

    def local(self, at: datetime) -> datetime:
        """``at`` in the schedule's zone (a naive ``at`` is taken as UTC)."""
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        return at.astimezone(self.zone)

    def state(self, at: datetime) -> tuple[bool, str]:
        """Whether the schedule is open at ``at``, and a short human explanation."""
        local = self.local(at)
        day = local.date()
        weekday = local.weekday()
        now = local.hour * 3600 + local.minute * 60 + local.second
        stamp = f"{DAYS[weekday]} {local.hour:02d}:{local.minute:02d} {self.zone.key}"
        holiday = self.holidays.get(day)
        if holiday is not None:
            return False, f"closed: {holiday} ({stamp})"
        for start, end in self.windows[weekday]:
            if start <= now < end:
                return True, f"open {_hhmm(start)}-{_hhmm(end)} ({stamp})"
        tail = self.spill[weekday]
        if now < tail and (day - timedelta(days=1)) not in self.holidays:
            return True, f"open until {_hhmm(tail)} from the day before ({stamp})"
        return False, f"closed ({stamp})"

    def is_open(self, at: datetime) -> bool:
        """True when ``at`` falls in an opening window and not on a holiday."""
        return self.state(at)[0]
