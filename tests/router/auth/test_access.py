"""The access middleware over real HTTP on loopback: 401, 403, sessions, throttle, routes
without a rule, exposure beyond loopback, TLS."""

from __future__ import annotations

import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from router.auth import access
from router.auth.access import (
    AuthContext,
    access_middleware,
    check_exposure,
    principal_of,
    public,
    requires,
    route_table,
    signed_in,
    ssl_context,
)
from router.auth.roles import Permission, Principal, Role
from router.auth.sessions import COOKIE, SessionCodec
from router.auth.users import Directory, make_user
from router.errors import ConfigError


@requires(Permission.RULES)
async def _rules(request: web.Request) -> web.Response:
    return web.json_response({"user": principal_of(request).user})


@requires(Permission.CARDS, page=True)
async def _page(_: web.Request) -> web.Response:
    return web.Response(text="page")


@public("probe")
async def _open(_: web.Request) -> web.Response:
    return web.Response(text="ok")


@signed_in
async def _any(request: web.Request) -> web.Response:
    return web.json_response({"role": str(principal_of(request).role)})


async def _forgotten(_: web.Request) -> web.Response:
    return web.Response(text="should never be served")


async def _serve(ctx: AuthContext, ssl_ctx: ssl.SSLContext | None = None
                 ) -> AsyncIterator[str]:
    app = web.Application(middlewares=[access_middleware(ctx)])
    app.router.add_post("/rules", _rules)
    app.router.add_get("/page", _page)
    app.router.add_get("/open", _open)
    app.router.add_get("/any", _any)
    app.router.add_get("/forgotten", _forgotten)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=ssl_ctx)
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@pytest.fixture
async def users() -> dict[str, tuple[Principal, str]]:
    """An engineer and an agent with tokens."""
    out = {}
    for name, role, agent in (("eve", Role.ENGINEER, None), ("al", Role.AGENT, "7001")):
        user, token = make_user(name, role, agent)
        out[name] = (user, token)
    return out  # type: ignore[return-value]


@pytest.fixture
async def served(users: dict[str, tuple[object, str]]
                 ) -> AsyncIterator[tuple[str, AuthContext]]:
    """A small app with one route of each kind, and the users above."""
    directory = Directory({n: u for n, (u, _) in users.items()})  # type: ignore[misc]
    ctx = AuthContext(directory, SessionCodec(b"k" * 32, 60))
    async for url in _serve(ctx):
        yield url, ctx


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_401_without_or_with_bad_credentials_403_for_the_wrong_role(
        served: tuple[str, AuthContext], users: dict[str, tuple[object, str]]) -> None:
    """No token: 401 with a Bearer challenge; a wrong token or scheme: 401; an agent on
    an engineer's route: 403 naming the permission; the engineer: served, and the handler
    sees its principal."""
    url, _ = served
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/rules") as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.post(f"{url}/rules", headers=_bearer("crt_000000000000_nope")) as r:
            assert r.status == 401
        async with http.post(f"{url}/rules", headers={"Authorization": "Basic eDp5"}) as r:
            assert r.status == 401
        async with http.post(f"{url}/rules", headers=_bearer(users["al"][1])) as r:
            assert r.status == 403
            assert await r.json() == {"error": "forbidden", "need": "rules", "role": "agent"}
        async with http.post(f"{url}/rules", headers=_bearer(users["eve"][1])) as r:
            assert r.status == 200
            assert await r.json() == {"user": "eve"}
        async with http.get(f"{url}/open") as r:
            assert r.status == 200
        async with http.get(f"{url}/any", headers=_bearer(users["al"][1])) as r:
            assert await r.json() == {"role": "agent"}
        async with http.get(f"{url}/nowhere") as r:
            assert r.status == 404


async def test_a_route_without_a_rule_is_refused(served: tuple[str, AuthContext],
                                                 users: dict[str, tuple[object, str]],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """A handler that declares no access rule is never run, even for an admin-grade
    token, and the refusal is logged as an error naming the route."""
    url, _ = served
    async with (aiohttp.ClientSession() as http,
                http.get(f"{url}/forgotten", headers=_bearer(users["eve"][1])) as r):
        assert r.status == 403
        assert "no access rule" in (await r.json())["detail"]
    assert any("/forgotten" in r.getMessage() and r.levelname == "ERROR"
               for r in caplog.records)


async def test_pages_redirect_to_sign_in_and_cookies_sign_in(
        served: tuple[str, AuthContext], users: dict[str, tuple[object, str]]) -> None:
    """A page without credentials redirects to the sign-in page; a valid session cookie
    is a principal; a forged, expired or stale-stamp cookie is not; a cookie on a POST
    from a foreign Origin is refused."""
    url, ctx = served
    found = ctx.directory.lookup("al")
    assert found is not None
    good = ctx.codec.encode("al", found[1])
    async with (aiohttp.ClientSession() as http,
                http.get(f"{url}/page", allow_redirects=False) as r):
        assert r.status == 303
        assert r.headers["Location"] == access.LOGIN_PAGE
    forged = good[:-1] + ("0" if good[-1] != "0" else "1")  # a signature one character off
    for cookie, status in ((good, 200), (forged, 303),
                           (ctx.codec.encode("al", found[1], now=0), 303),
                           (ctx.codec.encode("al", "stale-stamp"), 303),
                           (ctx.codec.encode("nobody", found[1]), 303)):
        async with (aiohttp.ClientSession(cookies={COOKIE: cookie}) as http,
                    http.get(f"{url}/page", allow_redirects=False) as r):
            assert r.status == status, cookie
    eve = ctx.directory.lookup("eve")
    assert eve is not None
    async with aiohttp.ClientSession(cookies={COOKIE: ctx.codec.encode("eve", eve[1])}) as http:
        async with http.post(f"{url}/rules", headers={"Origin": "http://evil.example"}) as r:
            assert r.status == 401
        async with http.post(f"{url}/rules", headers={"Origin": url}) as r:
            assert r.status == 200


async def test_bad_credentials_are_throttled_per_peer(served: tuple[str, AuthContext],
                                                      users: dict[str, tuple[object, str]],
                                                      monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """After THROTTLE_FAILURES bad tokens within the window, the peer gets 429, even with
    a good token, until the window passes."""
    monkeypatch.setattr(access, "THROTTLE_FAILURES", 3)
    url, ctx = served
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(f"{url}/rules", headers=_bearer("wrong")) as r:
                assert r.status == 401
        async with http.post(f"{url}/rules", headers=_bearer(users["eve"][1])) as r:
            assert r.status == 429
    assert ctx.throttled("127.0.0.1")
    assert not ctx.throttled("127.0.0.1", now=10**9)


async def test_no_users_on_loopback_is_local_admin_until_a_user_exists() -> None:
    """With no user at all, loopback requests are the local admin; once a user exists,
    they need credentials like everyone."""
    directory = Directory()
    ctx = AuthContext(directory)
    async for url in _serve(ctx):
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/any") as r:
                assert await r.json() == {"role": "admin"}
            user, _ = make_user("eve", Role.ENGINEER)
            directory.replace({"eve": user})
            async with http.get(f"{url}/any") as r:
                assert r.status == 401


async def test_the_local_admin_is_not_lent_to_other_sites() -> None:
    """With no user at all, a loopback request is the local admin only when it names a
    loopback host and no foreign Origin: another site's form posted by the host's
    browser (CSRF), its WebSocket, or its page reaching loopback under its own name (DNS
    rebinding) gets 401."""
    ctx = AuthContext(Directory())
    async for url in _serve(ctx):
        port = url.rsplit(":", 1)[1]
        evil = {"Origin": "http://evil.example"}
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/rules", headers=evil) as r:
                assert r.status == 401
            async with http.get(f"{url}/any", headers={**evil, "Upgrade": "websocket",
                                                       "Connection": "Upgrade"}) as r:
                assert r.status == 401
            async with http.get(f"{url}/any", headers={"Host": f"evil.example:{port}"}) as r:
                assert r.status == 401
            async with http.get(f"{url}/any", headers=evil) as r:  # cannot read it anyway
                assert await r.json() == {"role": "admin"}
            async with http.post(f"{url}/rules", headers={"Origin": url}) as r:
                assert await r.json() == {"user": "local"}
            async with http.get(f"{url}/any", headers={"Host": f"localhost:{port}"}) as r:
                assert await r.json() == {"role": "admin"}


async def test_route_table_lists_every_route_with_its_rule() -> None:
    """`route_table` gives each route (HEAD twins aside) with the rule it declares."""
    app = web.Application()
    app.router.add_get("/open", _open)
    app.router.add_get("/forgotten", _forgotten)
    rows = {(m, p): (r.describe() if r else None) for m, p, r in route_table(app)}
    assert rows == {("GET", "/open"): "public (probe)", ("GET", "/forgotten"): None}


@pytest.mark.parametrize(("host", "tls", "users", "refused"), [
    ("127.0.0.1", False, False, None),
    ("::1", False, False, None),
    ("localhost", False, False, None),
    ("0.0.0.0", False, True, "without TLS"),
    ("0.0.0.0", True, False, "without a user or token"),
    ("10.1.2.3", False, False, "without TLS .* and without a user"),
    ("10.1.2.3", True, True, None),
])
def test_exposure_beyond_loopback_needs_tls_and_users(host: str, tls: bool, users: bool,
                                                      refused: str | None) -> None:
    """Loopback is always allowed; any other address needs both TLS and a user, and the
    refusal says what is missing."""
    if refused is None:
        check_exposure(host, tls=tls, has_users=users)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_exposure(host, tls=tls, has_users=users)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_tls_serves_with_the_configured_certificate(tmp_path: Path) -> None:
    """`ssl_context` loads PEM files and aiohttp serves HTTPS with them; missing files
    are a ConfigError naming them."""
    cert, key = _self_signed(tmp_path)
    context = ssl_context(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    client.check_hostname = False
    async for url in _serve(AuthContext(Directory()), context):
        assert url.startswith("https://")
        async with (aiohttp.ClientSession() as http,
                    http.get(f"{url}/open", ssl=client) as r):
            assert r.status == 200
    with pytest.raises(ConfigError, match="nothere"):
        ssl_context(tmp_path / "nothere.pem", key)
