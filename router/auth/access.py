"""The access check of every HTTP route: deny unless the route says who may use it.

Each handler declares its rule with a decorator::

    @requires(Permission.STATUS)          # a principal whose role holds the permission
    @signed_in                            # any principal
    @public("liveness probe")             # nobody needs to sign in (reason in the table)
    @signed("HMAC of the CRM's secret")   # the handler checks its own signature

and :func:`access_middleware` runs before every handler: it finds the route's rule
(a route with none is refused with 403 and an ERROR line: a new route must say who may
use it; the table-driven test over ``app.router.routes()`` fails first), turns the
request into a :class:`~router.auth.roles.Principal` (``Authorization: Bearer <token>``,
else the sign-in cookie of :mod:`router.auth.sessions`) and answers 401 (no or bad
credentials; a page redirects to the sign-in page) or 403 (the role lacks the
permission). Inside the handler, :func:`principal_of` gives the principal.

A loopback-only API with no user and no token at all (the out-of-the-box setup) treats
requests from loopback as :data:`~router.auth.roles.LOCAL_ADMIN`, when they name a
loopback ``Host`` (a page of another site reaching it through DNS rebinding names its
own) and, like a sign-in cookie, carry no foreign ``Origin`` on a state-changing request
or a WebSocket upgrade (a form of another site posted by the host's browser does);
:func:`check_exposure` refuses at start-up to bind elsewhere without TLS or without any
user. Peers that send
bad credentials ``THROTTLE_FAILURES`` times within ``THROTTLE_WINDOW_S`` get 429 until
the window ends.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web

from router.audit import AuditEntry
from router.auth.roles import LOCAL_ADMIN, Permission, Principal
from router.auth.sessions import COOKIE, SAFE_METHODS, SessionCodec, same_origin
from router.auth.users import Directory
from router.errors import ConfigError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Callable[..., Any])

ACCESS_ATTR = "__callroute_access__"
#: The principal of the request being handled (set by the middleware around the
#: handler, reset after it: a keep-alive connection's next request starts clean).
_PRINCIPAL: ContextVar[Principal | None] = ContextVar("callroute_principal", default=None)
THROTTLE_FAILURES = 20
THROTTLE_WINDOW_S = 60.0
LOGIN_PAGE = "/ui/login"


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use one route."""

    kind: Literal["public", "signed", "signed_in", "permission"]
    permission: Permission | None = None
    #: why a public or self-signed route needs no principal (shown in the route table)
    why: str = ""
    #: a page for browsers: no credentials -> redirect to the sign-in page, not 401
    page: bool = False

    def allows(self, principal: Principal) -> bool:
        """Whether ``principal`` passes (public and signed routes pass anyone)."""
        if self.kind == "permission":
            assert self.permission is not None
            return principal.can(self.permission)
        return True

    def describe(self) -> str:
        """``status``, ``signed in``, ``public (liveness probe)``..."""
        if self.kind == "permission":
            return str(self.permission)
        if self.kind == "signed_in":
            return "signed in"
        return f"{self.kind} ({self.why})"


def _mark(rule: Access) -> Callable[[H], H]:
    def decorate(handler: H) -> H:
        setattr(handler, ACCESS_ATTR, rule)
        return handler

    return decorate


def requires(permission: Permission | str, *, page: bool = False) -> Callable[[H], H]:
    """The route needs a principal whose role holds ``permission``."""
    return _mark(Access("permission", Permission(permission), page=page))


def signed_in(handler: H) -> H:
    """The route needs a principal, of any role."""
    return _mark(Access("signed_in"))(handler)


def signed_in_page(handler: H) -> H:
    """A page that needs a principal of any role (else: to the sign-in page)."""
    return _mark(Access("signed_in", page=True))(handler)


def public(why: str) -> Callable[[H], H]:
    """The route needs no principal (say why: it is in the route table)."""
    if not why:
        raise ValueError("a public route needs a reason")
    return _mark(Access("public", why=why))


def signed(why: str) -> Callable[[H], H]:
    """The route checks its own signature (the CRM's webhook): no principal needed here."""
    if not why:
        raise ValueError("a self-signed route needs a reason")
    return _mark(Access("signed", why=why))


def rule_of(handler: Any) -> Access | None:
    """The access rule a route handler declares (None: it declares none)."""
    rule = getattr(handler, ACCESS_ATTR, None)
    return rule if isinstance(rule, Access) else None


def principal_of(request: web.Request) -> Principal:
    """The principal the middleware found for this request (inside a protected handler)."""
    principal = _PRINCIPAL.get()
    if principal is None:
        raise web.HTTPUnauthorized()
    return principal


def peer_of(request: web.Request) -> str:
    """The peer's address (for the audit trail and the throttle)."""
    return request.remote or "?"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _json(body: dict[str, Any], status: int, headers: dict[str, str] | None = None
          ) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store", **(headers or {})})


class AuthContext:
    """What the middleware asks: the users in force and the session codec."""

    def __init__(self, directory: Directory, codec: SessionCodec | None = None, *,
                 local_open: bool = True) -> None:
        self.directory = directory
        self.codec = codec or SessionCodec()
        #: loopback requests are LOCAL_ADMIN while no user exists (see module doc)
        self.local_open = local_open
        self._failures: dict[str, tuple[int, float]] = {}

    def throttled(self, peer: str, now: float | None = None) -> bool:
        """Whether ``peer`` sent too many bad credentials lately."""
        entry = self._failures.get(peer)
        if entry is None:
            return False
        count, since = entry
        if (time.monotonic() if now is None else now) - since > THROTTLE_WINDOW_S:
            del self._failures[peer]
            return False
        return count >= THROTTLE_FAILURES

    def failed(self, peer: str) -> None:
        """Count one bad credential from ``peer``."""
        now = time.monotonic()
        count, since = self._failures.get(peer, (0, now))
        if now - since > THROTTLE_WINDOW_S:
            count, since = 0, now
        self._failures[peer] = (count + 1, since)
        if len(self._failures) > 10_000:  # bounded: forget the oldest
            self._failures.pop(next(iter(self._failures)))

    async def resolve(self, request: web.Request) -> tuple[Principal | None, bool]:
        """``(principal, offered)``: who sent ``request``; ``offered`` tells whether it
        carried credentials at all (bad ones count towards the throttle)."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                return None, True
            return await self.directory.authenticate(token.strip()), True
        cookie = request.cookies.get(COOKIE)
        if cookie:
            return self._from_cookie(request, cookie), True
        if (self.local_open and self.directory.empty and is_loopback(request.remote or "")
                and is_loopback(_host_name(request)) and _from_here(request)):
            return LOCAL_ADMIN, False
        return None, False

    def _from_cookie(self, request: web.Request, cookie: str) -> Principal | None:
        if not _from_here(request):
            return None
        decoded = self.codec.decode(cookie)
        if decoded is None:
            return None
        user, stamp = decoded
        found = self.directory.lookup(user)
        if found is None or not _same(found[1], stamp):
            return None
        return found[0]


def _host_name(request: web.Request) -> str:
    """The host the request names (its ``Host`` header without the port; "" when bad)."""
    try:
        return request.url.host or ""
    except ValueError:
        return ""


def _from_here(request: web.Request) -> bool:
    """False for a state-changing request or a WebSocket upgrade that a page of another
    site made the browser send (a foreign ``Origin``): what the browser adds on its own,
    a cookie or the loopback peer address, must not vouch for it."""
    websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    return (request.method in SAFE_METHODS and not websocket) or same_origin(request)


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def access_middleware(ctx: AuthContext) -> Any:
    """The aiohttp middleware enforcing each route's :class:`Access` rule."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        match = request.match_info
        if match.http_exception is not None:
            return await handler(request)  # 404 / 405: nothing to protect
        rule = rule_of(match.handler)
        if rule is None:
            log.error("route %s %s declares no access rule: refused", request.method,
                      match.route.resource.canonical if match.route.resource else "?")
            return _json({"error": "forbidden", "detail": "route has no access rule"}, 403)
        if rule.kind in ("public", "signed"):
            return await handler(request)
        peer = peer_of(request)
        if ctx.throttled(peer):
            return _json({"error": "too_many_attempts"}, 429, {"Retry-After": "60"})
        principal, offered = await ctx.resolve(request)
        if principal is None:
            if offered:
                ctx.failed(peer)
            if rule.page:
                raise web.HTTPSeeOther(LOGIN_PAGE)
            return _json({"error": "unauthorized"}, 401,
                         {"WWW-Authenticate": 'Bearer realm="callroute"'})
        if not rule.allows(principal):
            return _json({"error": "forbidden", "need": str(rule.permission),
                          "role": str(principal.role)}, 403)
        token = _PRINCIPAL.set(principal)
        try:
            return await handler(request)
        finally:
            _PRINCIPAL.reset(token)

    return middleware


def route_table(app: web.Application) -> list[tuple[str, str, Access | None]]:
    """``(method, path, rule)`` of every route of ``app`` (HEAD twins left out)."""
    rows = []
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        resource = route.resource
        path = resource.canonical if resource is not None else "?"
        rows.append((route.method, path, rule_of(route.handler)))
    return rows


def check_exposure(host: str, *, tls: bool, has_users: bool, what: str = "admin API") -> None:
    """Refuse (ConfigError) to serve ``what`` beyond loopback without TLS or without any
    user or token: one clear sentence saying what to set."""
    if is_loopback(host):
        return
    missing = []
    if not tls:
        missing.append("TLS (admin.tls_cert and admin.tls_key: certificate and key files)")
    if not has_users:
        missing.append("a user or token (`callroute users add NAME --role admin`, or "
                       "admin.token)")
    if missing:
        raise ConfigError(
            f"refusing to serve the {what} on {host}, beyond loopback, without "
            + " and without ".join(missing)
            + "; bind it to 127.0.0.1 or configure them", location="admin.host")


def ssl_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 or later) from PEM certificate and key files."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert} and key {key}: {exc}",
                          location="admin.tls_cert") from exc
    return context


def request_entry(request: web.Request, action: str, target: str, *, before: str = "",
                  after: str = "", outcome: str = "ok") -> AuditEntry:
    """An audit entry for an action taken through ``request`` by its principal."""
    principal = principal_of(request)
    return AuditEntry(who=principal.user, role=str(principal.role), action=action,
                      target=target, source=peer_of(request), before=before, after=after,
                      outcome=outcome)
