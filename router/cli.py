"""The ``callroute`` command line.

==============  ===================================================================
``serve``       run the service: FastAGI, AMI tracking, delivery, admin API
``deliver``     run a delivery worker alone (posts the outbox's call records)
``check``       validate the config file and the rules file; exit 1 naming the problem
``explain``     show the whole decision for one number, as a trace or ``--json``
``demo``        sample CRM + FastAGI server + example rules, and a set of calls played
``sample-crm``  serve the sample CRM alone (to try ``serve``/``explain`` against it)
``sync``        pre-warm the cache with customers changed since the last sync
``outbox``      inspect and re-send call records (``status|list|retry|replay``)
``users``       manage users, roles and tokens (``add|list|disable|enable|role|rotate``)
``audit``       read the audit trail (``list|export --since --who --action``)
``keys``        encryption keys at rest (``generate|status|rotate``)
``crm doctor``  show each CRM request and answer for a number (``--post``: a test record)
==============  ===================================================================
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime

from router import __version__, log
from router.errors import ConfigError
from router.runner import run
from router.settings import Settings, load_settings

DEFAULT_CONFIG = "examples/config.yaml"


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", default=DEFAULT_CONFIG, metavar="FILE",
        help=f"config file (default: {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="callroute", description=__doc__.splitlines()[0]
                                     if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"callroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the service")
    _config_arg(p)

    p = sub.add_parser("deliver", help="run a delivery worker alone")
    _config_arg(p)

    p = sub.add_parser("check", help="validate config and rules")
    _config_arg(p)

    p = sub.add_parser("explain", help="show the routing decision for a number")
    _config_arg(p)
    p.add_argument("number", help="the caller's number as Asterisk would pass it")
    p.add_argument("--did", help="the dialled number (DID)")
    p.add_argument("--at", type=_iso_time, help="the call time, ISO 8601 (default: now)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("demo", help="run the demo")
    _config_arg(p)
    p.add_argument("--calls", type=int, default=0, help="extra random calls to play")

    p = sub.add_parser("sample-crm", help="serve the sample CRM")
    _config_arg(p)
    p.add_argument("--host", default=None, help="listen address (default: from crm.base_url)")
    p.add_argument("--port", type=int, default=None, help="port (default: from crm.base_url)")

    p = sub.add_parser("sync", help="pre-warm the cache from the CRM")
    _config_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    from router.records import outbox_cli

    outbox_cli.register(sub)
    from router.auth import audit_cli, users_cli

    users_cli.register(sub)
    audit_cli.register(sub)
    from router.records import keys_cli

    keys_cli.register(sub)
    from router.crm import doctor as crm_doctor

    crm_doctor.register(sub)
    return parser


def _iso_time(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc


def cmd_check(settings: Settings) -> int:
    """Validate rules too; print a summary."""
    from router.rules.decide import load_rules
    from router.rules.ruleswatch import summary

    path = settings.path(settings.routing.rules)
    ruleset = load_rules(path, default_queue=settings.routing.default_queue)
    print(f"config OK: {settings.base_dir}")
    print(f"rules OK: {path} ({summary(ruleset)})")
    from router.crypto import keyring_from_settings

    if not keyring_from_settings(settings).enabled:
        print("WARNING: encryption at rest is off: cached customers, call records and the "
              "spool are stored in clear (set encryption.keys or keys_file; "
              "`callroute keys generate` makes a key)")
    return 0


async def cmd_explain(settings: Settings, args: argparse.Namespace) -> int:
    """Decide for one number with the configured CRM and cache, and print the trace."""
    from dialplan.explain import format_text, outcome_to_dict
    from router.app import build_router

    async with build_router(settings) as router:
        outcome = await router.decide(args.number, args.did, at=args.at)
    if args.json:
        print(json.dumps(outcome_to_dict(outcome), ensure_ascii=False, indent=2, default=str))
    else:
        print(format_text(outcome))
    return 0


async def cmd_sync(settings: Settings, args: argparse.Namespace) -> int:
    """Run one pre-warm sync."""
    from router.app import run_sync_once
    from router.errors import CacheError, CrmError

    try:
        report = await run_sync_once(settings, progress=not args.no_progress)
    except (CrmError, CacheError) as exc:
        print(f"callroute sync: stopped, will resume from the last saved page: {exc}",
              file=sys.stderr)
        return 1
    print(f"synced {report.customers} customers ({report.numbers} numbers) in "
          f"{report.pages} pages; cursor {report.cursor}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``callroute`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"callroute: invalid configuration: {exc}", file=sys.stderr)
        return 1
    log.setup(settings.log_level, show_personal_data=settings.log_personal_data)
    try:
        return _dispatch(settings, args)
    except ConfigError as exc:
        print(f"callroute: invalid configuration: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "check":
        return cmd_check(settings)
    if command == "explain":
        return run(cmd_explain(settings, args), settings.event_loop)
    if command == "sync":
        return run(cmd_sync(settings, args), settings.event_loop)
    if command == "serve":
        from router.app import serve

        return run(serve(settings), settings.event_loop)
    if command == "deliver":
        from router.app import deliver

        return run(deliver(settings), settings.event_loop)
    if command == "demo":
        from router.demo import run_demo

        demo_code: int = run(run_demo(settings, extra_calls=args.calls), settings.event_loop)
        return demo_code
    if command == "sample-crm":
        from router.samplecrm import serve_forever

        return run(
            serve_forever(settings, host=args.host, port=args.port), settings.event_loop
        )
    if command == "crm":
        from router.crm.doctor import doctor
        from router.records.delivery import plan

        doctor_code: int = run(doctor(settings, args.number, post=args.post, plan=plan),
                               settings.event_loop)
        return doctor_code
    if command == "outbox":
        handler = args.outbox_handler
        result: int = handler(settings, args)
        return result
    security = getattr(args, "security_handler", None)
    if security is not None:
        code: int = security(settings, args)
        return code
    raise SystemExit(f"unknown command {command}")  # pragma: no cover - argparse guards


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


