"""A loopback OAuth 2.0 token endpoint and an API behind it, for the auth tests.

``POST /oauth/token`` follows RFC 6749: a form body (or the query string, as Zoho
documents) with ``grant_type`` ``client_credentials`` or ``refresh_token``, the client
authenticated in the body (``client_id``/``client_secret``) or by HTTP basic; it answers
``{"access_token", "token_type": "bearer", "expires_in"}`` (plus a rotated
``refresh_token`` when ``rotate`` is on, and ``instance_url`` when set), or 400/401
``{"error": "invalid_grant" | "invalid_client", "error_description"}``. It can be made
slow (``delay_s``) to let several clients race for a refresh.

``GET /api/ping`` checks ``Authorization: Bearer <token>`` (or the configured scheme)
against the tokens issued and not revoked, answers 401 ``{"error": "invalid_token"}``
otherwise, and logs every request it receives.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.crm_server import serving

CLIENT_ID = "callroute-client"
CLIENT_SECRET = "cs-SECRET-4711"
REFRESH_TOKEN = "rt-SECRET-0001"


@dataclass
class OAuthServer:
    """State and knobs of the loopback server."""

    url: str = ""
    scheme: str = "Bearer"
    expires_in: Any = 3600  # None: left out; any JSON value is sent as is
    rotate: bool = False
    instance_url: str | None = None
    delay_s: float = 0.0
    client_auth: str = "body"  # body | basic
    accept: bool = True  # False: the API refuses every token
    refresh_tokens: set[str] = field(default_factory=lambda: {REFRESH_TOKEN})
    issued: list[str] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    api_requests: list[dict[str, str]] = field(default_factory=list)
    _n: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def revoke_all(self) -> None:
        """Every token issued so far is now refused (as after an expiry or a revocation)."""
        self.revoked.update(self.issued)

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post()) if request.can_read_body else {}
        form.update(request.query)
        fields = {k: str(v) for k, v in form.items()}
        self.token_requests.append({**fields, "authorization": request.headers.get(
            "Authorization", "")})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if not self._client_ok(request, fields):
            return web.json_response({"error": "invalid_client",
                                      "error_description":
                                      f"bad secret {fields.get('client_secret')}"},
                                     status=401)
        grant = fields.get("grant_type")
        reply: dict[str, Any] = {}
        if grant == "refresh_token":
            if fields.get("refresh_token") not in self.refresh_tokens:
                return web.json_response({"error": "invalid_grant",
                                          "error_description": "refresh token not valid"},
                                         status=400)
            if self.rotate:
                self.refresh_tokens = {f"rt-rotated-{next(self._n)}"}
                reply["refresh_token"] = next(iter(self.refresh_tokens))
        elif grant != "client_credentials":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        access = f"at-{next(self._n)}"
        self.issued.append(access)
        reply.update({"access_token": access, "token_type": "bearer"})
        if self.expires_in is not None:
            reply["expires_in"] = self.expires_in
        if self.instance_url:
            reply["instance_url"] = self.instance_url
        return web.json_response(reply)

    def _client_ok(self, request: web.Request, fields: dict[str, str]) -> bool:
        if self.client_auth == "basic":
            given = request.headers.get("Authorization", "")
            want = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
            return given == f"Basic {want}" and "client_secret" not in fields
        return fields.get("client_id") == CLIENT_ID and \
            fields.get("client_secret", CLIENT_SECRET) == CLIENT_SECRET

    async def api(self, request: web.Request) -> web.Response:
        given = request.headers.get("Authorization", "")
        self.api_requests.append({"authorization": given, "path": request.path})
        prefix = f"{self.scheme} "
        token = given[len(prefix):] if given.startswith(prefix) else ""
        if not self.accept or token not in self.issued or token in self.revoked:
            return web.json_response({"error": "invalid_token"}, status=401)
        return web.json_response({"ok": True, "token": token})


@asynccontextmanager
async def oauth_server(**knobs: Any) -> AsyncIterator[OAuthServer]:
    """Serve an :class:`OAuthServer` on 127.0.0.1 for the block."""
    server = OAuthServer(**knobs)
    app = web.Application()
    app.router.add_post("/oauth/token", server.token)
    app.router.add_route("*", "/api/{tail:.*}", server.api)
    async with serving(app) as server.url:
        yield server
