"""``callroute audit list|export``: read the audit trail.

``list`` prints a table (or ``--json``), ``export`` writes JSON lines (one entry per line,
the format of ``audit.file``) to stdout or ``--output FILE``. Both filter with
``--since``/``--until`` (ISO 8601; a time without a zone is local time), ``--who`` (a
user, ``cli:<os user>``, ``system``, ``crm-webhook``) and ``--action`` (a prefix:
``user.`` is every user change), and stop at ``--limit`` entries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from redis.exceptions import RedisError

from router.audit import AuditEntry
from router.audit import from_settings as audit_from_settings
from router.log import mask_url
from router.settings import Settings, cli_local_time, config_option


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit list|export`` to the ``callroute`` parser."""
    audit = subparsers.add_parser("audit", help="read the audit trail")
    sub = audit.add_subparsers(dest="audit_command", required=True)
    for name, what in (("list", "print entries"), ("export", "write entries as JSON lines")):
        p = sub.add_parser(name, help=what)
        config_option(p)
        p.add_argument("--since", type=cli_local_time, help="at or after (ISO 8601)")
        p.add_argument("--until", type=cli_local_time, help="before (ISO 8601)")
        p.add_argument("--who", help="only this user")
        p.add_argument("--action", help="only actions starting with this")
        p.add_argument("--limit", type=int, default=100 if name == "list" else 1_000_000)
        if name == "list":
            p.add_argument("--json", action="store_true", help="print JSON")
        else:
            p.add_argument("--output", "-o", type=Path, help="file to write (default stdout)")
        p.set_defaults(security_handler=_list if name == "list" else _export)


async def _entries(settings: Settings, args: argparse.Namespace) -> list[AuditEntry]:
    audit = audit_from_settings(settings)
    try:
        return await audit.entries(
            since=args.since.timestamp() if args.since else None,
            until=args.until.timestamp() if args.until else None,
            who=args.who, action=args.action, limit=max(1, args.limit))
    finally:
        await audit.aclose()


def _fetch(settings: Settings, args: argparse.Namespace) -> list[AuditEntry] | None:
    try:
        return asyncio.run(_entries(settings, args))
    except (RedisError, OSError) as exc:
        print(f"callroute audit: Redis unavailable at {mask_url(settings.redis.url)}: {exc}",
              file=sys.stderr)
        return None


def _list(settings: Settings, args: argparse.Namespace) -> int:
    entries = _fetch(settings, args)
    if entries is None:
        return 2
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2, ensure_ascii=False))
        return 0
    print(f"{'TIME (UTC)':<24} {'WHO':<20} {'ROLE':<10} {'ACTION':<17} {'FROM':<16} "
          "TARGET / OUTCOME")
    for e in entries:
        print(f"{e.to_dict()['time']:<24} {e.who:<20} {e.role:<10} {e.action:<17} "
              f"{e.source:<16} {e.target[:40]} {'' if e.outcome == 'ok' else e.outcome}")
    if not entries:
        print("(no entries)")
    return 0


def _export(settings: Settings, args: argparse.Namespace) -> int:
    entries = _fetch(settings, args)
    if entries is None:
        return 2
    lines = "".join(json.dumps(e.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
                    for e in entries)
    if args.output is None:
        sys.stdout.write(lines)
    else:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(lines)
        print(f"wrote {len(entries)} entries to {args.output}", file=sys.stderr)
    return 0
