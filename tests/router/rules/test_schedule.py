"""Time windows: weekly hours in a time zone, overnight windows, holidays, DST."""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from router.rules.schedule import Schedule, ScheduleSpec, parse_days, parse_window

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")


def make(hours: dict[str, str | list[str]], tz: str = "Asia/Shanghai",
         holidays: list[object] | None = None) -> Schedule:
    """Compile a schedule from its YAML-like parts."""
    spec = ScheduleSpec.model_validate(
        {"timezone": tz, "hours": hours, "holidays": holidays or []})
    return Schedule.compile("s", spec)


def sh(y: int, mo: int, d: int, h: int, mi: int = 0) -> datetime:
    """A Shanghai wall-clock time."""
    return datetime(y, mo, d, h, mi, tzinfo=SHANGHAI)


@pytest.mark.parametrize(("key", "days"), [
    ("mon", [0]),
    ("mon-fri", [0, 1, 2, 3, 4]),
    ("fri-mon", [4, 5, 6, 0]),
    ("mon,wed,fri", [0, 2, 4]),
    ("SAT, sun", [5, 6]),
])
def test_parse_days(key: str, days: list[int]) -> None:
    """Day keys accept single days, ranges (also wrapping) and comma lists."""
    assert parse_days(key) == days


@pytest.mark.parametrize("key", ["monday", "mon-", "x", "mon-funday", ""])
def test_parse_days_rejects_garbage(key: str) -> None:
    """Unknown day names are an error."""
    with pytest.raises(ValueError, match="bad day"):
        parse_days(key)


@pytest.mark.parametrize(("text", "window"), [
    ("09:00-18:00", (9 * 3600, 18 * 3600)),
    ("22:00-06:00", (22 * 3600, 6 * 3600)),
    ("00:00-24:00", (0, 86400)),
    (" 9:30 - 12:15 ", (9 * 3600 + 1800, 12 * 3600 + 900)),
    ("closed", None),
])
def test_parse_window(text: str, window: tuple[int, int] | None) -> None:
    """Windows are HH:MM-HH:MM in seconds since midnight, or closed."""
    assert parse_window(text) == window


@pytest.mark.parametrize("text", ["9-18", "25:00-26:00", "09:60-10:00", "10:00-10:00",
                                  "10:00-24:30", "always"])
def test_parse_window_rejects_garbage(text: str) -> None:
    """Malformed, out-of-range and empty windows are errors."""
    with pytest.raises(ValueError, match=r"window|time"):
        parse_window(text)


def test_business_hours_in_own_timezone() -> None:
    """A Shanghai 09:00-18:00 window is judged in Shanghai time, whatever zone `at` is in."""
    sched = make({"mon-fri": "09:00-18:00"})
    # Thursday 2025-11-20 09:00 Shanghai is 01:00 UTC.
    assert sched.is_open(datetime(2025, 11, 20, 1, 0, tzinfo=UTC))
    assert not sched.is_open(datetime(2025, 11, 20, 0, 59, tzinfo=UTC))
    assert sched.is_open(sh(2025, 11, 20, 17, 59))
    assert not sched.is_open(sh(2025, 11, 20, 18, 0))  # end excluded
    assert not sched.is_open(sh(2025, 11, 22, 12))  # Saturday
    # The same instant seen from New York is still Thursday 10:00 in Shanghai.
    assert sched.is_open(sh(2025, 11, 20, 10).astimezone(NEW_YORK))


def test_naive_time_is_utc() -> None:
    """A naive datetime is taken as UTC rather than rejected on the call path."""
    sched = make({"mon-fri": "09:00-18:00"})
    assert sched.is_open(datetime(2025, 11, 20, 1, 30))
    assert not sched.is_open(datetime(2025, 11, 20, 12, 0))


def test_several_windows_and_repeated_days() -> None:
    """A day may have a list of windows; a day named twice gets the union."""
    sched = make({"mon-fri": ["09:00-12:00", "13:00-18:00"], "wed": "12:00-13:00"})
    assert sched.is_open(sh(2025, 11, 17, 11, 59))
    assert not sched.is_open(sh(2025, 11, 17, 12, 30))  # Monday lunch
    assert sched.is_open(sh(2025, 11, 19, 12, 30))  # Wednesday lunch covered


def test_overnight_window_spills_into_next_day() -> None:
    """22:00-06:00 on Friday is open Friday night and Saturday early morning only."""
    sched = make({"fri": "22:00-06:00"})
    assert not sched.is_open(sh(2025, 11, 21, 21, 59))
    assert sched.is_open(sh(2025, 11, 21, 23, 0))
    assert sched.is_open(sh(2025, 11, 22, 5, 59))
    assert not sched.is_open(sh(2025, 11, 22, 6, 0))
    assert not sched.is_open(sh(2025, 11, 22, 23, 0))  # Saturday night: not listed
    assert not sched.is_open(sh(2025, 11, 21, 3, 0))  # Friday early: Thursday not listed


def test_overnight_window_wraps_the_week() -> None:
    """A Sunday overnight window spills into Monday morning."""
    sched = make({"sun": "20:00-02:00"})
    assert sched.is_open(sh(2025, 11, 24, 1, 0))  # Monday 01:00
    assert not sched.is_open(sh(2025, 11, 24, 2, 0))


def test_holiday_closes_the_whole_date() -> None:
    """A holiday (bare date or named) closes its date; the state names the holiday."""
    sched = make({"mon-sun": "00:00-24:00"},
                 holidays=[date(2025, 10, 1), {"date": "2025-10-02", "name": "National Day"}])
    assert not sched.is_open(sh(2025, 10, 1, 12))
    is_open, why = sched.state(sh(2025, 10, 2, 12))
    assert not is_open
    assert "National Day" in why
    assert sched.is_open(sh(2025, 10, 3, 0, 0))
    assert sched.is_open(sh(2025, 9, 30, 23, 59))


def test_holiday_and_overnight_windows() -> None:
    """The tail of an overnight window is closed on a holiday, and an overnight window
    that starts on a holiday does not open the next morning."""
    sched = make({"mon-sun": "22:00-06:00"}, holidays=["2025-10-01"])
    assert not sched.is_open(sh(2025, 10, 1, 2))   # tail from Sep 30 falls on the holiday
    assert not sched.is_open(sh(2025, 10, 1, 23))  # evening of the holiday
    assert not sched.is_open(sh(2025, 10, 2, 2))   # tail of the holiday's window
    assert sched.is_open(sh(2025, 10, 2, 23))
    assert sched.is_open(sh(2025, 9, 30, 23))


def test_dst_spring_forward_uses_wall_clock() -> None:
    """Across the US spring-forward (2025-03-09 02:00 → 03:00), windows follow local
    wall-clock time: 09:00 EST is 14:00 UTC, 09:00 EDT is 13:00 UTC."""
    sched = make({"mon-sun": "09:00-17:00"}, tz="America/New_York")
    assert not sched.is_open(datetime(2025, 3, 8, 13, 30, tzinfo=UTC))   # 08:30 EST
    assert sched.is_open(datetime(2025, 3, 8, 14, 30, tzinfo=UTC))       # 09:30 EST
    assert sched.is_open(datetime(2025, 3, 9, 13, 30, tzinfo=UTC))       # 09:30 EDT
    assert not sched.is_open(datetime(2025, 3, 9, 21, 30, tzinfo=UTC))   # 17:30 EDT


def test_dst_window_in_the_skipped_hour() -> None:
    """A 01:00-03:00 window on the spring-forward night lasts only one real hour:
    01:59 EST is open, the next minute is 03:00 EDT and closed."""
    sched = make({"sun": "01:00-03:00"}, tz="America/New_York")
    assert sched.is_open(datetime(2025, 3, 9, 6, 59, tzinfo=UTC))       # 01:59 EST
    assert not sched.is_open(datetime(2025, 3, 9, 7, 0, tzinfo=UTC))    # 03:00 EDT


def test_dst_fall_back_repeated_hour_open_twice() -> None:
    """On fall-back night (2025-11-02) 01:30 happens twice; a 01:00-02:00 window is open
    at both instants."""
    sched = make({"sun": "01:00-02:00"}, tz="America/New_York")
    assert sched.is_open(datetime(2025, 11, 2, 5, 30, tzinfo=UTC))   # 01:30 EDT
    assert sched.is_open(datetime(2025, 11, 2, 6, 30, tzinfo=UTC))   # 01:30 EST
    assert not sched.is_open(datetime(2025, 11, 2, 7, 30, tzinfo=UTC))  # 02:30 EST


def test_bad_timezone_is_rejected() -> None:
    """An unknown IANA zone name fails validation with a helpful message."""
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        ScheduleSpec.model_validate({"timezone": "Mars/Olympus"})


def test_unknown_field_and_bad_hours_are_rejected() -> None:
    """Schedules forbid unknown keys and check every day key and window."""
    with pytest.raises(ValidationError, match="extra"):
        ScheduleSpec.model_validate({"timezone": "UTC", "open": "always"})
    with pytest.raises(ValidationError, match="bad day"):
        ScheduleSpec.model_validate({"timezone": "UTC", "hours": {"weekdays": "09:00-17:00"}})
    with pytest.raises(ValidationError, match="bad window"):
        ScheduleSpec.model_validate({"timezone": "UTC", "hours": {"mon": ["9 to 5"]}})


def test_closed_day_and_state_message() -> None:
    """A day marked closed never opens; the state explains with weekday, time and zone."""
    sched = make({"mon-sat": "09:00-18:00", "sun": "closed"})
    is_open, why = sched.state(sh(2025, 11, 23, 12))
    assert not is_open
    assert why == "closed (sun 12:00 Asia/Shanghai)"
    assert sched.state(sh(2025, 11, 22, 12)) == (True, "open 09:00-18:00 (sat 12:00 "
                                                       "Asia/Shanghai)")
