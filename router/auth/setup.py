"""The service's access control, assembled from the settings (used by ``router.app``).

:func:`start_auth` loads the users (Redis, or ``auth.users_file``), keeps them fresh in
the background, and refuses (:class:`~router.errors.ConfigError`) to expose the admin
API beyond loopback without TLS or without any user; :func:`server_ssl` is the TLS
context when ``admin.tls_cert``/``tls_key`` are set.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from contextlib import AsyncExitStack

from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.audit import AuditLog
from router.audit import from_settings as audit_from_settings
from router.auth.access import AuthContext, check_exposure, is_loopback, ssl_context
from router.auth.roles import Principal, Role
from router.auth.sessions import SessionCodec
from router.auth.users import Directory, FileUserStore, RedisUserStore, UserStore, refresh_loop
from router.errors import AuthError
from router.keys import keys_from_settings
from router.settings import Settings

log = logging.getLogger(__name__)


def secret_text(value: object) -> str:
    """The text of a setting that is a SecretStr (or a plain str)."""
    getter = getattr(value, "get_secret_value", None)
    return str(getter()) if callable(getter) else str(value or "")


def user_store(settings: Settings, redis: Redis | None = None) -> UserStore:
    """Where this deployment keeps its users: ``auth.users_file``, else Redis."""
    if settings.auth.users_file is not None:
        return FileUserStore(settings.path(settings.auth.users_file))
    client = redis if redis is not None else Redis.from_url(
        settings.redis.url, socket_timeout=2.0,
        socket_connect_timeout=settings.redis.connect_timeout_s)
    return RedisUserStore(client, keys_from_settings(settings))


def server_ssl(settings: Settings) -> ssl.SSLContext | None:
    """The admin API's TLS context (None: plain HTTP)."""
    admin = settings.admin
    if admin.tls_cert is None or admin.tls_key is None:
        return None
    return ssl_context(settings.path(admin.tls_cert), settings.path(admin.tls_key))


async def start_auth(settings: Settings, stack: AsyncExitStack) -> AuthContext:
    """Users loaded and kept fresh until ``stack`` closes; exposure checked."""
    static = [(Principal("admin", Role.ADMIN), secret_text(settings.admin.token))]
    directory = Directory(static=static)
    store = user_store(settings)
    if isinstance(store, RedisUserStore):
        stack.push_async_callback(store.redis.aclose)
    try:
        directory.replace(await store.load())
    except (RedisError, OSError, AuthError) as exc:
        log.warning("users could not be loaded at start-up (retrying in the background): %s",
                    exc)
    check_exposure(settings.admin.host, tls=settings.admin.tls_cert is not None,
                   has_users=not directory.empty)
    if directory.empty:
        log.warning("the admin API has no users: anyone on this host is admin on it "
                    "(add one with `callroute users add NAME --role admin`)")
    stop = asyncio.Event()
    task = asyncio.create_task(refresh_loop(store, directory, settings.auth.refresh_s, stop),
                               name="users-refresh")

    async def stop_refresh() -> None:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(stop_refresh)
    codec = SessionCodec(secret_text(settings.auth.session_secret), settings.auth.session_ttl_s)
    return AuthContext(directory, codec, local_open=is_loopback(settings.admin.host))


async def start_audit(settings: Settings, stack: AsyncExitStack) -> AuditLog:
    """The audit trail, closed (after its background entries) when ``stack`` closes."""
    audit = audit_from_settings(settings)
    stack.push_async_callback(audit.aclose)
    return audit
