"""Dating Asterisk's zone-less Cdr times by the epochs its Uniqueids carry."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from ami.clock import CdrClock, infer_offset, parse_utc_offset, uid_epoch


def cdr(uid: str, start: str) -> dict[str, str]:
    return {"UniqueID": uid, "StartTime": start}


@pytest.mark.parametrize(("uid", "epoch"), [
    ("1796122613.3", 1796122613),
    ("pbx1-1796122613.12", 1796122613),   # systemname- prefix
    ("1796122613", None), ("", None), ("abc.1", None), (None, None),
])
def test_uid_epoch(uid: str | None, epoch: int | None) -> None:
    """The creation second of a Uniqueid, with or without a system name; None otherwise."""
    assert uid_epoch(uid) == epoch


@pytest.mark.parametrize(("text", "seconds"), [
    ("+0800", 8 * 3600), ("-0500", -5 * 3600), ("+05:45", 5 * 3600 + 45 * 60),
    ("+0000", 0), ("", None), ("UTC", None), (None, None),
])
def test_parse_utc_offset(text: str | None, seconds: int | None) -> None:
    """STRFTIME(,,%z) answers, with or without a colon; anything else is unknown."""
    assert parse_utc_offset(text) == seconds


def test_offset_inferred_from_the_call_itself() -> None:
    """A UTC+8 Asterisk: StartTime 19:12:14 for a channel created at 11:12:14 UTC gives
    +8 h, taken from the Cdr closest to its channel's creation (a later Cdr of the same
    channel, started 40 s after, does not disturb it)."""
    epoch = int(datetime(2026, 12, 1, 11, 12, 14, tzinfo=UTC).timestamp())
    cdrs = [cdr(f"{epoch}.7", "2026-12-01 19:12:54"), cdr(f"{epoch}.3", "2026-12-01 19:12:14")]
    assert infer_offset(cdrs) == 8 * 3600
    assert infer_offset([cdr(f"{epoch}.3", "2026-12-01 05:42:15")]) == -(5 * 3600 + 30 * 60)


def test_a_later_cdr_of_the_same_channel_never_dates_the_offset() -> None:
    """A UTC+8 caller whose first Cdr was written a second after its Uniqueid's epoch
    (the second turned in between) and that a queue rang again exactly 15 minutes later
    (a second Cdr of the same channel): the later Cdr fits a quarter hour better but
    starts at that ring, not at the channel's creation, so the offset stays +8 h, not
    +8 h 15."""
    epoch = int(datetime(2026, 12, 1, 11, 12, 14, tzinfo=UTC).timestamp())
    cdrs = [cdr(f"{epoch}.3", "2026-12-01 19:12:15"), cdr(f"{epoch}.3", "2026-12-01 19:27:14")]
    assert infer_offset(cdrs) == 8 * 3600
    assert infer_offset(list(reversed(cdrs))) == 8 * 3600


def test_no_evidence_no_offset() -> None:
    """No Uniqueid epoch, no start, or a start far from any quarter hour: unknown."""
    assert infer_offset([]) is None
    assert infer_offset([{"UniqueID": "x", "StartTime": "2026-12-01 19:12:14"}]) is None
    assert infer_offset([cdr("1796122613.1", "")]) is None
    assert infer_offset([cdr("1796122613.1", "garbage")]) is None
    # 7.5 minutes off the nearest quarter hour: not a clock offset
    assert infer_offset([cdr("1796122613.1", "2026-12-01 11:04:23")]) is None


def test_zone_precedence_and_cross_check(caplog: pytest.LogCaptureFixture) -> None:
    """The call's own evidence wins; without it the configured zone, then the server's
    reported offset, then UTC (with one warning). A server offset that disagrees with a
    call's evidence is logged once."""
    epoch = int(datetime(2026, 12, 1, 11, 0, tzinfo=UTC).timestamp())
    evidence = [cdr(f"{epoch}.1", "2026-12-01 19:00:00")]
    clock = CdrClock()
    with caplog.at_level(logging.WARNING):
        assert clock.zone_for([]) is UTC
        assert clock.zone_for([]) is UTC
    assert len(caplog.records) == 1
    clock.server_offset = 3600
    assert clock.zone_for([]) == timezone(timedelta(hours=1))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert clock.zone_for(evidence) == timezone(timedelta(hours=8))
        assert clock.zone_for(evidence) == timezone(timedelta(hours=8))
    assert len(caplog.records) == 1
    assert "+1.00h" in caplog.text
    shanghai = ZoneInfo("Asia/Shanghai")
    assert CdrClock(shanghai).zone_for([]) is shanghai


def test_read_turns_local_times_into_utc() -> None:
    """A naive Cdr time read in its zone comes out in UTC; empty or malformed is None."""
    clock = CdrClock()
    zone = timezone(timedelta(hours=8))
    assert clock.read("2026-12-01 19:12:14", zone) == datetime(2026, 12, 1, 11, 12, 14,
                                                                tzinfo=UTC)
    assert clock.read("", zone) is None
    assert clock.read("1/12/2026", zone) is None


def test_a_uniqueid_that_carries_no_real_epoch_dates_nothing() -> None:
    """A Uniqueid whose number is no second of our era (rewritten or synthetic traffic,
    e.g. ``0000008333.0``, 02:18:53 on 1 January 1970) would give an "offset" of decades,
    here a whole number of quarter hours: no zone has it, so none is inferred and the
    clock falls back to the server's offset."""
    bogus = [cdr("0000008333.0", "2026-12-01 19:03:53")]
    assert infer_offset(bogus) is None
    clock = CdrClock()
    clock.server_offset = 8 * 3600
    zone = clock.zone_for(bogus)
    assert clock.read("2026-12-01 19:03:53", zone) == datetime(2026, 12, 1, 11, 3, 53,
                                                               tzinfo=UTC)
