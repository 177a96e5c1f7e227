"""The ``callroute`` command line: one subcommand per task (see :data:`DESCRIPTION`).

Every command reads one config file (``--config``; without it ``./config.yaml``, else
the example config packaged with callroute). A problem the user can fix (a config or
rules mistake, a port in use, an Asterisk that lacks a queue) is one line on stderr
and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from router import __version__, log
from router.errors import CallrouteError, ConfigError, ListenError
from router.runner import run
from router.settings import (
    Settings,
    cli_time,
    config_option,
    data_dir,
    default_config,
    load_settings,
)

if TYPE_CHECKING:
    from router.rules.inventory import Named, Report

DESCRIPTION = """\
CRM-aware call routing for Asterisk: callroute answers the dialplan's FastAGI
request with a route chosen from the caller's CRM record and your rules, follows
the call over AMI, and posts a call record to the CRM when it ends.

New here? "callroute demo" shows it working; "callroute init DIR" writes a
commented config, rules and the Asterisk snippets to start from."""

EPILOG = """\
Every command takes --config FILE. Without it callroute reads ./config.yaml when
there is one, else the example config that comes with it (what the demo runs).
"callroute COMMAND --help" shows a command's options."""

def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="callroute", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"callroute {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands")

    p = sub.add_parser("init", help="write a commented config.yaml, rules.yaml and the "
                       "Asterisk snippets into DIR, to start from",
                       description="Write a commented config.yaml, rules.yaml, the CRM "
                       "examples (crm-examples/) and the Asterisk snippets (asterisk/) into "
                       "DIR. Existing files are left alone unless --force.")
    p.add_argument("dir", metavar="DIR", type=Path, help="where to write them (created)")
    p.add_argument("--force", action="store_true", help="overwrite files that exist")

    p = sub.add_parser("serve", help="run the service: FastAGI, AMI call tracking, delivery, "
                       "admin API",
                       description="Run the service: FastAGI routing, AMI call tracking, "
                       "call record delivery and the admin API, until SIGTERM/SIGINT.")
    config_option(p)

    p = sub.add_parser("deliver", help="run a delivery worker alone (posts the outbox's "
                       "call records)",
                       description="Post the outbox's call records to the CRM (a worker "
                       "beside serve, for more throughput).")
    config_option(p)

    p = sub.add_parser("check", help="validate the config and rules files (--asterisk: and "
                       "compare with a running Asterisk)",
                       description="Validate the config file and the rules file, and check "
                       "that the queues the rules name are in routing.queues (when listed). "
                       "Exit status 1 names the problem.")
    config_option(p)
    p.add_argument("--asterisk", action="store_true",
                   help="also log in to Asterisk (the ami: settings) and compare the queues "
                   "and agents the rules name with what it has (QueueStatus, device states)")

    p = sub.add_parser("explain", help="show the whole routing decision for one number",
                       description="Decide for one number as a call would be decided, and "
                       "print every step. Reads the cache and asks the CRM, but stores "
                       "nothing and counts in no metric.")
    config_option(p)
    p.add_argument("number", help="the caller's number as Asterisk would pass it")
    p.add_argument("--did", help="the dialled number (DID)")
    p.add_argument("--at", type=cli_time,
                   help="the call time, ISO 8601 (default: now); without a UTC offset it is "
                   "read in routing.timezone, else in the time zone of the rules' schedules")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("demo", help="sample CRM, FastAGI server and example rules on this "
                       "machine, with a set of calls played",
                       description="Start the sample CRM and a FastAGI server with the "
                       "example rules, play a set of calls the way Asterisk does, and print "
                       "each decision. Ports that are taken are replaced by free ones.")
    config_option(p)
    p.add_argument("--calls", type=int, default=0, help="extra random calls to play")

    p = sub.add_parser("sample-crm", help="serve the sample CRM alone (to try serve or "
                       "explain against it)",
                       description="Serve the sample CRM (customers, activities, leads, "
                       "tasks) at the address of crm.base_url, until interrupted.")
    config_option(p)
    p.add_argument("--host", default=None, help="listen address (default: from crm.base_url)")
    p.add_argument("--port", type=int, default=None, help="port (default: from crm.base_url, "
                   "as the connector reaches it: 8088 with the default crm.base_url)")

    p = sub.add_parser("sync", help="pre-warm the cache with the customers changed since the "
                       "last sync",
                       description="Fill the cache with the customers changed since the "
                       "last sync (resumes from its saved cursor).")
    config_option(p)
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


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    """Validate the rules too, and what they name; print a summary. With ``--asterisk``,
    compare with the running Asterisk as well."""
    from router.rules import inventory
    from router.rules.decide import load_rules
    from router.rules.ruleswatch import summary

    path = settings.path(settings.routing.rules)
    ruleset = load_rules(path, default_queue=settings.routing.default_queue)
    names = inventory.named(ruleset, settings.routing.default_queue)
    print(f"config OK: {settings.base_dir}")
    print(f"rules OK: {path} ({summary(ruleset)})")
    from router.crypto import keyring_from_settings

    if not keyring_from_settings(settings).enabled:
        print("WARNING: encryption at rest is off: cached customers, call records and the "
              "spool are stored in clear (set encryption.keys or keys_file; "
              "`callroute keys generate` makes a key)")
    report = inventory.against_list(names, settings.routing.queues)
    queues = ", ".join(names.queues)
    if settings.routing.queues:
        print(f"queues named by the rules: {queues} (checked against routing.queues)")
    elif args.asterisk:
        print(f"queues named by the rules: {queues}")
    else:
        print(f"queues named by the rules: {queues} (not checked: list the queues that exist "
              "in routing.queues, or run check --asterisk)")
    if args.asterisk:
        found = run(_check_asterisk(settings, names), settings.event_loop)
        report.errors += found.errors
        report.warnings += found.warnings
    for line in report.warnings:
        print(f"warning: {line}")
    for line in report.errors:
        print(f"callroute check: {line}", file=sys.stderr)
    return 0 if report.ok else 1


async def _check_asterisk(settings: Settings, names: Named) -> Report:
    """Log in to AMI with the config's user, ask, compare, log off."""
    from ami.client import AmiClient
    from router.errors import AmiError
    from router.rules import inventory

    ami = settings.ami
    where = f"{ami.host}:{ami.port} as {ami.username!r}"
    client = AmiClient(ami.model_copy(update={"reconnect_min_s": 60.0}))
    quiet = logging.getLogger("ami.client")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its reasons are in the one line printed below
    await client.start()
    try:
        why = await client.first_outcome(ami.connect_timeout_s + ami.action_timeout_s)
        if why is not None:
            return inventory.Report(errors=[f"cannot log in to Asterisk at {where}: {why}"])
        try:
            view = await inventory.ask_asterisk(client, names, ami.action_timeout_s)
        except (AmiError, PermissionError) as exc:
            return inventory.Report(errors=[f"Asterisk at {where}: {exc}"])
    finally:
        await client.stop()
        quiet.setLevel(level)
    report = inventory.against_asterisk(names, view)
    print(f"asterisk: {where}: {', '.join(report.checked)}")
    return report


#: The header of the config ``init`` writes (replacing the example's, which is about the demo).
INIT_HEADER = """\
# callroute configuration, written by `callroute init` (callroute {version}) from the
# example config. Next steps:
#   1. crm: where your CRM's REST API is and how to log in (crm-examples/ has one per
#      CRM callroute knows, and the sample CRM); secrets from the environment: ${{VAR}}
#   2. rules.yaml: your agents, schedules and rules; routing.queues: your Asterisk queues
#   3. asterisk/README.md: hook the dialplan, the AMI user and the queues into Asterisk
#      (ami: below must match the AMI user)
#   4. callroute check --config {config} --asterisk
#   5. callroute serve --config {config}
# A ${{VAR}} that is not set is an error; ${{VAR:-default}} falls back to the default.
"""


def init_files(target: Path) -> dict[Path, str]:
    """What ``callroute init`` writes into ``target``: path -> text. The texts are read
    from the files packaged with callroute at run time (the examples and asterisk-conf)."""
    examples = data_dir("examples")
    config = (examples / "config.yaml").read_text(encoding="utf-8")
    body = config.lstrip("\n")
    while body.startswith("#"):  # the example's own header: about the demo
        body = body.partition("\n")[2]
    header = INIT_HEADER.format(version=__version__, config=target / "config.yaml")
    # keep the spool beside the config (the example's is the checkout's var/)
    body = body.replace("spool_dir: ../var/spool", "spool_dir: var/spool")
    files = {target / "config.yaml": header + body,
             target / "rules.yaml": (examples / "rules.yaml").read_text(encoding="utf-8")}
    for crm in sorted(examples.glob("crm-*.yaml")):
        files[target / "crm-examples" / crm.name] = crm.read_text(encoding="utf-8")
    for snippet in sorted(data_dir("asterisk-conf").iterdir()):
        if snippet.is_file() and snippet.suffix in {".conf", ".md"}:
            files[target / "asterisk" / snippet.name] = snippet.read_text(encoding="utf-8")
    return files


def cmd_init(args: argparse.Namespace) -> int:
    """Write the starting files into ``args.dir``."""
    target: Path = args.dir
    files = init_files(target)
    existing = [path for path in files if path.exists()]
    if existing and not args.force:
        print(f"callroute init: {len(existing)} file(s) exist already, left alone: "
              f"{', '.join(str(p) for p in existing)} (--force overwrites them)",
              file=sys.stderr)
        return 1
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} files into {target}:")
    for path in files:
        print(f"  {path}")
    config = target / "config.yaml"
    print("next: edit crm: in config.yaml and rules.yaml, hook asterisk/ into Asterisk "
          "(asterisk/README.md), then")
    print(f"  callroute check --config {config} --asterisk")
    print(f"  callroute serve --config {config}")
    return 0


async def cmd_explain(settings: Settings, args: argparse.Namespace) -> int:
    """Decide for one number with the configured CRM and cache (read only), and print the
    trace."""
    from dialplan.explain import explain, format_text, outcome_to_dict
    from router.app import build_router
    from router.lookup.cached_lookup import CachedLookup
    from router.lookup.readonly import ReadOnlyLookup

    async with build_router(settings) as router:
        assert isinstance(router.lookup, CachedLookup)
        explaining = router.explaining(ReadOnlyLookup(router.lookup))
        try:
            outcome = await explain(explaining, args.number, args.did, args.at)
        except ConfigError as exc:  # --at without an offset, and no single zone to read it in
            print(f"callroute explain: {exc}", file=sys.stderr)
            return 1
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


def _config_path(args: argparse.Namespace) -> Path:
    """``--config``, else ./config.yaml, else the packaged example (said on stderr, except
    by the demo, which runs it on purpose)."""
    if args.config is not None:
        return Path(args.config)
    path = default_config()
    if path.parent == data_dir("examples") and args.command != "demo":
        print(f"callroute: no --config and no ./config.yaml: using the example config "
              f"({path}); `callroute init DIR` writes one to edit", file=sys.stderr)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``callroute`` console script."""
    args = build_parser().parse_args(argv)
    command: str = args.command
    try:
        if command == "init":
            return cmd_init(args)
        settings = load_settings(_config_path(args))
    except ConfigError as exc:
        print(f"callroute: invalid configuration: {exc}", file=sys.stderr)
        return 1
    log.setup(settings.log_level, show_personal_data=settings.log_personal_data)
    try:
        return _dispatch(settings, args)
    except ListenError as exc:
        print(f"callroute {command}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"callroute: invalid configuration: {exc}", file=sys.stderr)
        return 1
    except CallrouteError as exc:
        print(f"callroute {command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "check":
        return cmd_check(settings, args)
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
