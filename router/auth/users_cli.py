"""``callroute users add|list|disable|enable|role|rotate``: manage who may use the pages
and the admin API.

Users live where the service reads them (Redis, or ``auth.users_file``); running
instances pick changes up within ``auth.refresh_s``. ``add`` and ``rotate`` print the new
token once (only its scrypt hash is kept: a lost token is rotated, never recovered).
Every change is written to the audit trail (:mod:`router.audit`) with the operating
system user who ran the command and hashes of the user before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

from redis.exceptions import RedisError

from router.audit import AuditEntry, cli_actor, state_hash
from router.audit import from_settings as audit_from_settings
from router.auth.roles import Role
from router.auth.setup import user_store
from router.auth.users import User, UserStore, check_user, make_user, rotated
from router.errors import AuthError
from router.settings import Settings, config_option

Handler = Callable[[Settings, argparse.Namespace], int]


def _common(parser: argparse.ArgumentParser) -> None:
    config_option(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")


def _role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError as exc:
        roles = ", ".join(r.value for r in Role)
        raise argparse.ArgumentTypeError(f"unknown role {text!r} (one of {roles})") from exc


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``users ...`` to the ``callroute`` parser; each sets ``security_handler``."""
    users = subparsers.add_parser("users", help="manage users, roles and tokens")
    sub = users.add_subparsers(dest="users_command", required=True)
    p = sub.add_parser("add", help="add a user and print its token (shown once)")
    _common(p)
    p.add_argument("name")
    p.add_argument("--role", type=_role, required=True,
                   help="viewer, agent, supervisor, engineer or admin")
    p.add_argument("--agent", help="the agent id of an agent (rules' agents table)")
    p.set_defaults(security_handler=_run(_add))
    p = sub.add_parser("list", help="list users (never their tokens)")
    _common(p)
    p.set_defaults(security_handler=_run(_list))
    for name, what in (("disable", "stop a user's token and sessions working"),
                       ("enable", "let a disabled user in again"),
                       ("rotate", "give a user a new token (the old one stops working)")):
        p = sub.add_parser(name, help=what)
        _common(p)
        p.add_argument("name")
        p.set_defaults(security_handler=_run({"disable": _disable, "enable": _enable,
                                              "rotate": _rotate}[name]))
    p = sub.add_parser("role", help="change a user's role")
    _common(p)
    p.add_argument("name")
    p.add_argument("role", type=_role)
    p.add_argument("--agent", help="the agent id, for the agent role")
    p.set_defaults(security_handler=_run(_set_role))


Command = Callable[[UserStore, Settings, argparse.Namespace], Coroutine[Any, Any, int]]


def _run(func: Command) -> Handler:
    def handler(settings: Settings, args: argparse.Namespace) -> int:
        async def main() -> int:
            store = user_store(settings)
            try:
                return await func(store, settings, args)
            except AuthError as exc:
                print(f"callroute users: {exc}")
                return 1
            except (RedisError, OSError) as exc:
                print(f"callroute users: the users store is unavailable: {exc}")
                return 2
            finally:
                redis = getattr(store, "redis", None)
                if redis is not None:
                    await redis.aclose()

        return asyncio.run(main())

    return handler


def _state(user: User | None) -> str:
    """What the audit trail hashes of a user: everything stored (its token's hash too, so
    a rotation shows as a change)."""
    return state_hash(json.loads(user.to_json()) if user is not None else None)


async def _audit(settings: Settings, action: str, name: str,
                 before: User | None, after: User | None) -> None:
    who, role, source = cli_actor()
    audit = audit_from_settings(settings)
    try:
        await audit.write(AuditEntry(who=who, role=role, action=action, target=f"user:{name}",
                                     source=source, before=_state(before),
                                     after=_state(after)))
    finally:
        await audit.aclose()


async def _get(store: UserStore, name: str) -> User:
    user = (await store.load()).get(name)
    if user is None:
        raise AuthError(f"no user {name!r}")
    return user


def _show(args: argparse.Namespace, user: User, token: str | None, verb: str) -> None:
    if args.json:
        print(json.dumps({**user.public(), **({"token": token} if token else {})}, indent=2))
        return
    agent = f", agent {user.agent}" if user.agent else ""
    print(f"{verb} {user.name} ({user.role}{agent})")
    if token:
        print(f"token (shown once, keep it secret): {token}")


async def _add(store: UserStore, settings: Settings, args: argparse.Namespace) -> int:
    if args.name in await store.load():
        raise AuthError(f"user {args.name!r} exists (use `callroute users rotate` for a new "
                        "token, `role` for another role)")
    user, token = await asyncio.to_thread(make_user, args.name, args.role, args.agent)
    await store.save(user)
    await _audit(settings, "user.add", user.name, None, user)
    _show(args, user, token, "added")
    return 0


async def _list(store: UserStore, _settings: Settings, args: argparse.Namespace) -> int:
    users = sorted((await store.load()).values(), key=lambda u: u.name)
    if args.json:
        print(json.dumps([u.public() for u in users], indent=2))
        return 0
    print(f"{'USER':<24} {'ROLE':<11} {'AGENT':<12} STATE")
    for u in users:
        state = "disabled" if u.disabled else "active"
        print(f"{u.name:<24} {u.role:<11} {u.agent or '-':<12} {state}")
    if not users:
        print("(no users: the admin API is open to this host only)")
    return 0


async def _set_state(store: UserStore, settings: Settings, args: argparse.Namespace,
                     disabled: bool) -> int:
    before = await _get(store, args.name)
    after = replace(before, disabled=disabled, changed=time.time())
    await store.save(after)
    await _audit(settings, "user.disable" if disabled else "user.enable", after.name,
                 before, after)
    _show(args, after, None, "disabled" if disabled else "enabled")
    return 0


async def _disable(store: UserStore, settings: Settings, args: argparse.Namespace) -> int:
    return await _set_state(store, settings, args, True)


async def _enable(store: UserStore, settings: Settings, args: argparse.Namespace) -> int:
    return await _set_state(store, settings, args, False)


async def _rotate(store: UserStore, settings: Settings, args: argparse.Namespace) -> int:
    before = await _get(store, args.name)
    after, token = await asyncio.to_thread(rotated, before)
    await store.save(after)
    await _audit(settings, "user.rotate", after.name, before, after)
    _show(args, after, token, "new token for")
    return 0


async def _set_role(store: UserStore, settings: Settings, args: argparse.Namespace) -> int:
    before = await _get(store, args.name)
    agent = args.agent if args.role is Role.AGENT else None
    check_user(before.name, args.role, agent)
    after = replace(before, role=args.role, agent=agent, changed=time.time())
    await store.save(after)
    await _audit(settings, "user.role", after.name, before, after)
    _show(args, after, None, "changed")
    return 0
