"""Who a request to the pages (or their API, or their WebSocket) comes from, and what
that role may see.

Everything goes through :func:`principal_of`: a bearer token (``Authorization``) or
the sign-in cookie, checked by the :class:`Authenticator` the app was assembled with.
Today that is :class:`TokenTable` (``web.users`` of the config, plus ``admin.token`` as
an admin); the role store of the users' issue plugs in by passing its own object with
the same two methods to :func:`router.web.routes.add_web_routes`.

Tokens are compared as SHA-256 digests with :func:`hmac.compare_digest`, against every
user (no early exit). The cookie is ``user.expiry.stamp.signature`` (HMAC-SHA256 with
``web.session_secret``); ``stamp`` changes when the user's token does, so rotating or
removing a token ends its sessions. A cookie is only taken from this origin: a
state-changing request or a WebSocket upgrade with a foreign ``Origin`` is refused.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from aiohttp import web

from router.settings import Role, WebSettings

COOKIE = "callroute_session"

Permission = Literal["live", "customers", "cards", "dispose"]

#: Which roles hold each permission of the pages.
#: live: the supervisor's figures; customers: names and ids of callers on the live view
#: and in the export; cards: an agent's card stream (an agent only its own); dispose:
#: add a disposition to a call one answered.
PERMISSIONS: dict[Permission, frozenset[Role]] = {
    "live": frozenset({"viewer", "supervisor", "engineer", "admin"}),
    "customers": frozenset({"supervisor", "engineer", "admin"}),
    "cards": frozenset({"agent", "supervisor", "admin"}),
    "dispose": frozenset({"agent"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """A signed-in user: name, role and (for an agent) the agent id it is bound to."""

    user: str
    role: Role
    agent: str | None = None

    def can(self, permission: Permission) -> bool:
        """Whether this role holds ``permission``."""
        return self.role in PERMISSIONS[permission]

    def may_watch(self, agent: str) -> bool:
        """Whether this user may see the cards of ``agent``: an agent only its own."""
        if not self.can("cards"):
            return False
        return self.role != "agent" or self.agent == agent


class Authenticator(Protocol):
    """Resolves credentials to principals (the role store implements the same)."""

    def authenticate(self, token: str) -> Principal | None:
        """The principal a bearer token belongs to, or None."""

    def lookup(self, user: str) -> tuple[Principal, str] | None:
        """A user's principal and its credential stamp (changes with the credentials)."""


def token_digest(token: str) -> bytes:
    """SHA-256 of a token (what is kept and compared)."""
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True, slots=True)
class _Entry:
    principal: Principal
    digest: bytes


class TokenTable:
    """Users with a role and a token, from the config: compared in constant time."""

    def __init__(self, entries: Iterable[tuple[Principal, bytes]]) -> None:
        self._entries = [_Entry(p, d) for p, d in entries]
        self._by_user = {e.principal.user: e for e in self._entries}

    @classmethod
    def from_settings(cls, web_settings: WebSettings, admin_token: str = "") -> TokenTable:
        """``web.users``, plus the admin API's token as user ``admin`` (role admin)."""
        entries: list[tuple[Principal, bytes]] = []
        for u in web_settings.users:
            digest = bytes.fromhex(u.token_sha256) if u.token_sha256 else token_digest(u.token)
            entries.append((Principal(u.name, u.role, u.agent if u.role == "agent" else None),
                            digest))
        if admin_token and not any(p.user == "admin" for p, _ in entries):
            entries.append((Principal("admin", "admin"), token_digest(admin_token)))
        return cls(entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal of ``token``; every entry is compared (no early exit)."""
        if not token:
            return None
        digest = token_digest(token)
        found: _Entry | None = None
        for entry in self._entries:
            if hmac.compare_digest(digest, entry.digest):
                found = entry
        return found.principal if found is not None else None

    def lookup(self, user: str) -> tuple[Principal, str] | None:
        """The user's principal and a stamp derived from its token digest."""
        entry = self._by_user.get(user)
        if entry is None:
            return None
        return entry.principal, hashlib.sha256(b"stamp:" + entry.digest).hexdigest()[:16]


class SessionCodec:
    """Signs and checks the sign-in cookie."""

    def __init__(self, secret: str, ttl_s: float) -> None:
        self.key = secret.encode() if secret else secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _sign(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()

    def encode(self, user: str, stamp: str, now: float | None = None) -> str:
        """The cookie value for ``user`` (valid ``ttl_s``)."""
        name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        expiry = int((now if now is not None else time.time()) + self.ttl_s)
        payload = f"{name}.{expiry}.{stamp}"
        return f"{payload}.{self._sign(payload)}"

    def decode(self, value: str, now: float | None = None) -> tuple[str, str] | None:
        """``(user, stamp)`` of a valid, unexpired cookie; None otherwise."""
        parts = value.split(".")
        if len(parts) != 4:
            return None
        name, expiry, stamp, sig = parts
        if not hmac.compare_digest(sig, self._sign(f"{name}.{expiry}.{stamp}")):
            return None
        try:
            if int(expiry) < (now if now is not None else time.time()):
                return None
            user = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return user, stamp


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def same_origin(request: web.Request) -> bool:
    """True unless the request names a foreign ``Origin`` (browsers send it on POSTs and
    WebSocket upgrades; a missing one means a non-browser client)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in (f"{request.scheme}://{request.host}", f"http://{request.host}",
                      f"https://{request.host}")


def principal_of(request: web.Request, auth: Authenticator,
                 codec: SessionCodec) -> Principal | None:
    """THE check: who sent ``request`` (bearer token, else sign-in cookie), or None."""
    header = request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        return auth.authenticate(token.strip()) if scheme.lower() == "bearer" else None
    cookie = request.cookies.get(COOKIE)
    if not cookie:
        return None
    websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    if (request.method not in SAFE_METHODS or websocket) and not same_origin(request):
        return None
    decoded = codec.decode(cookie)
    if decoded is None:
        return None
    user, stamp = decoded
    found = auth.lookup(user)
    if found is None or not hmac.compare_digest(found[1], stamp):
        return None
    return found[0]
