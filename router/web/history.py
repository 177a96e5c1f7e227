"""callroute's own call history in Redis: the last calls of each customer (for the card)
and each day's figures and rows (for the supervisor's charts and CSV export).

Written once per call, when its record enters the outbox for the first time (so
several instances tracking the same AMI feed count each call once). Keys are in
:mod:`router.keys`; a caller the CRM does not know is filed under the keyed hash of
its number, never the number itself. Everything expires (``web.history_days``).

The rows (one per call: customer id, agent, disposition note...) are encrypted at rest
with the deployment's key ring (:mod:`router.crypto`), each bound to the Redis key it
is stored under; the day's counters (outcome, tier, queue names) are not personal and
stay plain. A row that does not decrypt (a key dropped too early) is skipped with a
log line.
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from redis.asyncio import Redis

from router.crypto import KeyRing, open_json, seal_json
from router.keys import Keys

log = logging.getLogger(__name__)

RECENT_KEEP = 20
RECENT_TTL_S = 90 * 86400
#: Columns of the CSV export, in order.
CSV_COLUMNS = ("start", "call", "outcome", "customer_id", "tier", "queue", "agent",
               "wait_s", "talk_s", "rule", "reason", "disposition", "note", "anonymous",
               "degraded", "voicemail_s")
#: Every outcome a call record can have (ami.records.Outcome), in the charts' order.
OUTCOMES = ("answered", "voicemail", "missed", "abandoned", "rejected", "busy", "failed")
#: Wait buckets of the "wait by tier" chart, upper bounds in seconds.
WAIT_BUCKETS = (10, 30, 60, 120)


def _wait_bucket(wait: float) -> str:
    for edge in WAIT_BUCKETS:
        if wait <= edge:
            return f"<={edge}"
    return f">{WAIT_BUCKETS[-1]}"


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a call record the pages show (no number, no recording)."""
    return {
        "call": record.get("linkedid"),
        "start": record.get("start"),
        "outcome": record.get("outcome"),
        "customer_id": record.get("customer_id"),
        "tier": record.get("customer_tier"),
        "queue": record.get("queue"),
        "agent": record.get("answered_by_agent"),
        "wait_s": record.get("wait_s"),
        "talk_s": record.get("talk_s"),
        "rule": record.get("routing_rule"),
        "reason": record.get("route_reason"),
        "disposition": record.get("disposition"),
        "note": record.get("disposition_note"),
        "anonymous": bool(record.get("anonymous")),
        "degraded": bool(record.get("degraded")),
        "voicemail_s": record.get("voicemail_s"),
    }


class History:
    """Reads and writes the history keys."""

    def __init__(self, redis: Redis, keys: Keys, tz: str = "UTC", days: int = 8,
                 last_calls: int = 5, crypto: KeyRing | None = None) -> None:
        self.redis = redis
        self.keys = keys
        #: encrypts the rows at rest (off without a key)
        self.crypto = crypto or KeyRing()
        self.tz = ZoneInfo(tz)
        self.ttl_s = days * 86400
        self.last_calls = last_calls

    def subject(self, customer_id: str | None, caller: str | None) -> str | None:
        """Whose history a call belongs to: the customer id, else the number's keyed hash."""
        if customer_id:
            return f"c:{customer_id}"
        if caller:
            return f"n:{self.keys.number_hash(caller)}"
        return None

    def day_of(self, start: Any) -> str:
        """The local day (``web.timezone``) of a record's start time (ISO text)."""
        try:
            when = datetime.fromisoformat(str(start))
        except ValueError:
            when = datetime.now(self.tz)
        if when.tzinfo is None:
            when = when.replace(tzinfo=self.tz)
        return when.astimezone(self.tz).date().isoformat()

    def today(self) -> str:
        """Today in ``web.timezone``."""
        return datetime.now(self.tz).date().isoformat()

    async def add(self, record: Mapping[str, Any]) -> None:
        """File one finished call (a record's JSON dict)."""
        row = summary(record)
        start = record.get("start") or datetime.now(self.tz).isoformat()
        day = self.day_of(start)
        try:
            hour = f"{datetime.fromisoformat(str(start)).astimezone(self.tz).hour:02d}"
        except ValueError:
            hour = "00"
        outcome = str(record.get("outcome") or "unknown")
        tier = str(record.get("customer_tier") or "none")
        queue = record.get("queue")
        day_key, rows_key = self.keys.web_day(day), self.keys.web_day_calls(day)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(day_key, f"hour:{hour}:{outcome}", 1)
            pipe.hincrby(day_key, f"outcome:{outcome}", 1)
            for flag in ("anonymous", "degraded"):
                if record.get(flag):
                    pipe.hincrby(day_key, f"flag:{flag}", 1)
            wait = record.get("wait_s")
            if isinstance(wait, int | float):
                pipe.hincrbyfloat(day_key, f"wait_sum:{tier}", float(wait))
                pipe.hincrby(day_key, f"wait_n:{tier}", 1)
                pipe.hincrby(day_key, f"wait_bucket:{tier}:{_wait_bucket(float(wait))}", 1)
            if queue:
                pipe.hincrby(day_key, f"queue_offered:{queue}", 1)
                if outcome == "answered":
                    pipe.hincrby(day_key, f"queue_answered:{queue}", 1)
            pipe.expire(day_key, self.ttl_s)
            pipe.rpush(rows_key, seal_json(self.crypto, row, rows_key))
            pipe.expire(rows_key, self.ttl_s)
            subject = self.subject(record.get("customer_id"), record.get("caller"))
            if subject is not None:
                recent = self.keys.web_recent(subject)
                pipe.lpush(recent, seal_json(self.crypto, row, recent))
                pipe.ltrim(recent, 0, RECENT_KEEP - 1)
                pipe.expire(recent, RECENT_TTL_S)
            await pipe.execute()

    async def redispose(self, record: Mapping[str, Any]) -> None:
        """A disposition given after the call was filed (an update record): on the
        customer's last calls and the day's CSV rows."""
        lid = record.get("linkedid")
        change = {"disposition": record.get("disposition"),
                  "note": record.get("disposition_note")}
        day_key = self.keys.web_day_dispositions(self.day_of(record.get("start") or ""))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(day_key, str(lid), seal_json(self.crypto, change, f"{day_key}:{lid}"))
            pipe.expire(day_key, self.ttl_s)
            await pipe.execute()
        subject = self.subject(record.get("customer_id"), record.get("caller"))
        if subject is None:
            return
        key = self.keys.web_recent(subject)
        for index, item in enumerate(await self.redis.lrange(key, 0, RECENT_KEEP - 1)):
            row = self._open(item, key)
            if row is not None and row.get("call") == lid:
                row.update(change)
                await self.redis.lset(key, index, seal_json(self.crypto, row, key))
                return

    async def recent(self, customer_id: str | None, caller: str | None) -> list[dict[str, Any]]:
        """The last ``last_calls`` calls of a customer (or unknown number), newest first."""
        subject = self.subject(customer_id, caller)
        if subject is None or self.last_calls <= 0:
            return []
        key = self.keys.web_recent(subject)
        items = await self.redis.lrange(key, 0, self.last_calls - 1)
        return [row for item in items if (row := self._open(item, key)) is not None]

    def _open(self, item: Any, key: str) -> dict[str, Any] | None:
        """One stored row, or None (logged) when it does not decrypt or parse."""
        try:
            return open_json(self.crypto, item, key)
        except ValueError as exc:
            log.warning("a history row of %s skipped: it %s", key, exc)
            return None

    async def day(self, day: str) -> dict[str, Any]:
        """One day's figures, shaped for the charts."""
        raw: dict[str, str] = dict(await self.redis.hgetall(self.keys.web_day(day)))  # type: ignore[arg-type]
        hours: dict[str, dict[str, int]] = {}
        waits: dict[str, dict[str, Any]] = {}
        queues: dict[str, dict[str, Any]] = {}
        outcomes: dict[str, int] = {}
        flags = {"anonymous": 0, "degraded": 0}
        for field, value in raw.items():
            parts = field.split(":")
            if parts[0] == "hour" and len(parts) == 3:
                hours.setdefault(parts[1], {})[parts[2]] = int(value)
            elif parts[0] == "outcome" and len(parts) == 2:
                outcomes[parts[1]] = int(value)
            elif parts[0] == "flag" and len(parts) == 2:
                flags[parts[1]] = int(value)
            elif parts[0] in ("wait_sum", "wait_n") and len(parts) == 2:
                waits.setdefault(parts[1], {})[parts[0]] = float(value)
            elif parts[0] == "wait_bucket" and len(parts) == 3:
                waits.setdefault(parts[1], {}).setdefault("buckets", {})[parts[2]] = int(value)
            elif parts[0] in ("queue_offered", "queue_answered") and len(parts) == 2:
                queues.setdefault(parts[1], {})[parts[0].split("_")[1]] = int(value)
        wait_by_tier = {
            tier: {"avg_s": round(w.get("wait_sum", 0.0) / w["wait_n"], 1) if w.get("wait_n")
                   else None, "calls": int(w.get("wait_n", 0)), "buckets": w.get("buckets", {})}
            for tier, w in sorted(waits.items())
        }
        answer_by_queue = {
            q: {"offered": v.get("offered", 0), "answered": v.get("answered", 0),
                "rate": v.get("answered", 0) / v["offered"] if v.get("offered") else None}
            for q, v in sorted(queues.items())
        }
        return {"day": day, "outcomes": outcomes, "flags": flags,
                "hours": {h: hours[h] for h in sorted(hours)},
                "wait_by_tier": wait_by_tier, "answer_by_queue": answer_by_queue}

    async def rows(self, day: str) -> list[dict[str, Any]]:
        """Every call of ``day`` (the CSV rows), in the order they ended. A busy day's rows
        are opened in a worker thread: the event loop goes on routing calls meanwhile."""
        key = self.keys.web_day_calls(day)
        late_key = self.keys.web_day_dispositions(day)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.lrange(key, 0, -1)
            pipe.hgetall(late_key)
            items, late = await pipe.execute()
        return await asyncio.to_thread(self._open_rows, key, items, late_key, late)

    def _open_rows(self, key: str, items: list[Any], late_key: str,
                   late: Mapping[Any, Any]) -> list[dict[str, Any]]:
        rows = [row for item in items if (row := self._open(item, key)) is not None]
        for row in rows:
            given = late.get(row.get("call"))
            if given is not None:
                change = self._open(given, f"{late_key}:{row.get('call')}")
                row.update(change or {})
        return rows

    @staticmethod
    def to_csv(rows: list[dict[str, Any]], *, customers: bool) -> str:
        """CSV text of ``rows``; without ``customers`` the customer id column is blank.
        Cells that a spreadsheet would run as a formula are quoted with a leading '."""
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            cells = []
            for col in CSV_COLUMNS:
                value = row.get(col)
                if col == "customer_id" and not customers:
                    value = None
                if isinstance(value, bool):
                    text = "true" if value else "false"
                else:
                    text = "" if value is None else str(value)
                if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
                    text = "'" + text
                cells.append(text)
            writer.writerow(cells)
        return out.getvalue()


def days_back(today: str, n: int) -> list[str]:
    """``n`` days ending with ``today`` (ISO dates), oldest first."""
    end = datetime.fromisoformat(today).date()
    return [(end - timedelta(days=i)).isoformat() for i in reversed(range(n))]
