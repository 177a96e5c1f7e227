"""Reading Asterisk's times right, whatever zone its clock runs in.

Asterisk writes Cdr ``StartTime``/``AnswerTime``/``EndTime`` in its own local time with no
zone (a call centre in UTC+8 writes ``2026-12-01 18:55:55`` for 10:55:55 UTC). What does
carry an epoch:

* a channel's ``Uniqueid`` (``[systemname-]<epoch>.<seq>``): the second it was created;
* event ``Timestamp`` headers, when manager.conf has ``timestampevents = yes``;
* AMI ``Getvar`` of ``STRFTIME(,,%z)``: the server's current UTC offset.

So the offset of a call's Cdr times is learned from the call itself: a channel's Cdr
starts when the channel is created, so ``StartTime`` minus its Uniqueid's epoch, rounded
to the quarter hour, is the offset (it handles a DST change between two calls). The
server's reported offset (or a configured zone) is the cross-check, and the fallback for a
call whose Cdrs carry no usable Uniqueid. No setting is needed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone, tzinfo

log = logging.getLogger(__name__)

_UID = re.compile(r"(?:^|-)(\d{9,11})\.\d+$")
_OFFSET = re.compile(r"^([+-])(\d\d):?(\d\d)$")
CDR_FORMAT = "%Y-%m-%d %H:%M:%S"
#: Zone offsets are whole quarter hours (UTC+5:45 is the oddest in use).
QUARTER_HOUR_S = 900
#: How far a Cdr start may be from its channel's creation and still date the offset.
MAX_RESIDUAL_S = 120.0
#: The zones in use run from UTC-12 to UTC+14: an "offset" outside is no offset (a
#: Uniqueid that carries no real epoch, as in rewritten or synthetic traffic).
MIN_OFFSET_S, MAX_OFFSET_S = -12 * 3600, 14 * 3600


def uid_epoch(uniqueid: str | None) -> int | None:
    """The creation second a Uniqueid carries (``1796122613.3`` -> 1796122613)."""
    match = _UID.search(uniqueid or "")
    return int(match.group(1)) if match else None


def naive_cdr_time(value: str | None) -> datetime | None:
    """A Cdr time as written (local, no zone), or None when empty or malformed."""
    if not value:
        return None
    try:
        return datetime.strptime(value, CDR_FORMAT)
    except ValueError:
        return None


def parse_utc_offset(text: str | None) -> int | None:
    """Seconds east of UTC from ``+0800`` / ``-05:30`` (``STRFTIME(,,%z)``), else None."""
    match = _OFFSET.match((text or "").strip())
    if not match:
        return None
    sign = -1 if match.group(1) == "-" else 1
    return sign * (int(match.group(2)) * 3600 + int(match.group(3)) * 60)


def infer_offset(cdrs: Iterable[Mapping[str, str]]) -> int | None:
    """The UTC offset (s) of these Cdrs' times, from the channel whose first Cdr starts
    closest to its creation; None when no Cdr has both a start and a Uniqueid epoch, or
    the offset found is none a zone can have.

    Only each channel's first Cdr counts: a later one (the same caller dialling again,
    a queue ringing another agent) starts when that leg began, and one begun a whole
    number of quarter hours after the channel's creation would look like a closer fit."""
    firsts: dict[str, tuple[int, datetime]] = {}
    for cdr in cdrs:
        uid = cdr.get("UniqueID") or cdr.get("Uniqueid") or ""
        epoch = uid_epoch(uid)
        start = naive_cdr_time(cdr.get("StartTime"))
        if epoch is None or start is None:
            continue
        if uid not in firsts or start < firsts[uid][1]:
            firsts[uid] = (epoch, start)
    best: tuple[float, int] | None = None
    for epoch, start in firsts.values():
        diff = start.replace(tzinfo=UTC).timestamp() - epoch
        offset = round(diff / QUARTER_HOUR_S) * QUARTER_HOUR_S
        residual = abs(diff - offset)
        if best is None or residual < best[0]:
            best = (residual, offset)
    if best is None or best[0] > MAX_RESIDUAL_S:
        return None
    return best[1] if MIN_OFFSET_S <= best[1] <= MAX_OFFSET_S else None


class CdrClock:
    """Turns a call's naive Cdr times into UTC.

    Per call: the offset inferred from its own Cdrs (:func:`infer_offset`). Otherwise the
    configured zone (``ami.cdr_timezone``, for a server whose Uniqueids carry no epoch),
    else the offset the server reported over AMI (:attr:`server_offset`), else UTC. A
    disagreement between the call's evidence and the server's word is logged once.
    """

    def __init__(self, zone: tzinfo | None = None) -> None:
        self.zone = zone
        self.server_offset: int | None = None
        self._warned: set[tuple[int, int]] = set()
        self._guessed = False

    def zone_for(self, cdrs: Iterable[Mapping[str, str]]) -> tzinfo:
        """The zone to read these Cdrs' times in."""
        inferred = infer_offset(cdrs)
        if inferred is not None:
            self._cross_check(inferred)
            return timezone(timedelta(seconds=inferred))
        if self.zone is not None:
            return self.zone
        if self.server_offset is not None:
            return timezone(timedelta(seconds=self.server_offset))
        if not self._guessed:
            self._guessed = True
            log.warning("Cdr times of a call could not be dated (no Uniqueid epoch, no "
                        "server offset over AMI): read as UTC")
        return UTC

    def _cross_check(self, inferred: int) -> None:
        server = self.server_offset
        if server is None or server == inferred or (server, inferred) in self._warned:
            return
        self._warned.add((server, inferred))
        log.warning("Asterisk reports UTC offset %+.2fh but its Cdr times run at %+.2fh "
                    "(a DST change?): each call's own Cdrs are trusted",
                    server / 3600, inferred / 3600)

    def read(self, value: str | None, zone: tzinfo) -> datetime | None:
        """One Cdr time in UTC (None when empty or malformed)."""
        naive = naive_cdr_time(value)
        return naive.replace(tzinfo=zone).astimezone(UTC) if naive is not None else None
