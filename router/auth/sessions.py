"""The pages' sign-in cookie: ``<user b64>.<expiry>.<stamp>.<HMAC-SHA256>``.

Signed with ``auth.session_secret`` (or ``session_secret_file``; a random key per process
when unset, so sessions end with a restart and do not carry across instances). ``stamp``
is the user's (:attr:`router.auth.users.User.stamp`): rotating the token, changing the
role or disabling the user ends every session of that user. The cookie is HttpOnly,
SameSite=Strict, and Secure when served over TLS; a state-changing request or a
WebSocket upgrade carrying it from a foreign ``Origin`` is refused
(:func:`same_origin`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

from aiohttp import web

COOKIE = "callroute_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class SessionCodec:
    """Signs and checks sign-in cookies."""

    def __init__(self, secret: str | bytes = b"", ttl_s: float = 12 * 3600.0) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        self.key = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def _sign(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()

    def encode(self, user: str, stamp: str, now: float | None = None) -> str:
        """The cookie value for ``user`` (valid ``ttl_s``)."""
        name = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        expiry = int((time.time() if now is None else now) + self.ttl_s)
        payload = f"{name}.{expiry}.{stamp}"
        return f"{payload}.{self._sign(payload)}"

    def decode(self, value: str, now: float | None = None) -> tuple[str, str] | None:
        """``(user, stamp)`` of a valid, unexpired cookie; None otherwise."""
        parts = value.split(".")
        if len(parts) != 4:
            return None
        name, expiry, stamp, sig = parts
        if not hmac.compare_digest(sig.encode(), self._sign(f"{name}.{expiry}.{stamp}").encode()):
            return None
        try:
            if int(expiry) < (time.time() if now is None else now):
                return None
            user = base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return user, stamp


def same_origin(request: web.Request) -> bool:
    """True unless the request names a foreign ``Origin`` (browsers send it on POSTs and
    WebSocket upgrades; a missing one means a non-browser client)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin in (f"{request.scheme}://{request.host}", f"http://{request.host}",
                      f"https://{request.host}")


def set_cookie(response: web.StreamResponse, request: web.Request, codec: SessionCodec,
               user: str, stamp: str, path: str = "/") -> None:
    """Put the sign-in cookie on ``response``."""
    response.set_cookie(COOKIE, codec.encode(user, stamp), max_age=int(codec.ttl_s),
                        httponly=True, samesite="Strict", path=path, secure=request.secure)
