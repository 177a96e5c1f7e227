"""OAuth2 and static auth against a loopback token endpoint and an API that checks
every header it gets; the token shared by instances through a real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr, ValidationError

from router.crm.auth import OAuth2Client, Token, TokenStore
from router.crm.config import CrmSettings
from router.crm.http import CrmHttp
from router.errors import CrmBadResponse, CrmClientError, CrmRedirected
from router.keys import Keys
from router.settings import load_settings
from tests.crm_server import closed_port, scripted_server
from tests.redis_server import RedisServer
from tests.router.crm.oauth_server import (
    CLIENT_ID,
    CLIENT_SECRET,
    REFRESH_TOKEN,
    OAuthServer,
    oauth_server,
)

KEYS = Keys(prefix="t:")


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def crm(server: OAuthServer, **oauth: Any) -> CrmSettings:
    """Settings for the loopback API with an oauth2 block."""
    base_url = oauth.pop("base_url", server.url)
    block = {"token_url": "/oauth/token", "client_id": CLIENT_ID,
             "client_secret": CLIENT_SECRET, **oauth}
    return CrmSettings.model_validate({
        "name": "loop", "base_url": base_url,
        "auth": {"type": "oauth2", "oauth2": block},
    })


def client(settings: CrmSettings, *, redis: aioredis.Redis | None = None,
           clock: Callable[[], float] = time.time) -> CrmHttp:
    """A CrmHttp whose OAuth2 client uses ``clock`` and, with ``redis``, the shared store."""
    http = CrmHttp(settings)
    assert settings.auth.oauth2 is not None
    store = TokenStore(redis, KEYS, settings.name) if redis is not None else None
    http.oauth = OAuth2Client(settings.auth.oauth2, http._token_request, store=store,
                              clock=clock)
    return http


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the flushed test Redis."""
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


async def ping(http: CrmHttp) -> Any:
    """One API request; the body the API answered."""
    return (await http.request("lookup", "GET", "/api/ping")).body


async def test_client_credentials_token_is_fetched_once_and_sent() -> None:
    """The client credentials grant posts grant_type, client_id and client_secret as a
    form; the token is sent as Bearer on every request and fetched only once."""
    async with oauth_server() as server:
        http = client(crm(server))
        try:
            for _ in range(5):
                assert (await ping(http))["token"] == "at-1"
        finally:
            await http.aclose()
    (request,) = server.token_requests
    assert request["grant_type"] == "client_credentials"
    assert (request["client_id"], request["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)
    assert {r["authorization"] for r in server.api_requests} == {"Bearer at-1"}


async def test_refresh_before_expiry_runs_in_the_background() -> None:
    """Within refresh_margin_s of the expiry a request goes on with the valid token while
    one refresh runs; past the expiry a request waits for a new token. The API never
    gets an expired token."""
    clock = Clock()
    async with oauth_server(expires_in=3600) as server:
        http = client(crm(server, refresh_margin_s=60), clock=clock)
        try:
            assert (await ping(http))["token"] == "at-1"
            clock.now += 3550  # 50 s left: inside the margin
            assert (await ping(http))["token"] == "at-1"
            assert http.oauth is not None
            refresh = http.oauth._refresh
            assert refresh is not None
            await refresh
            assert (await ping(http))["token"] == "at-2"
            assert len(server.token_requests) == 2
            clock.now += 7200  # at-2 expired long ago
            assert (await ping(http))["token"] == "at-3"
        finally:
            await http.aclose()
    assert [r["authorization"] for r in server.api_requests] == [
        "Bearer at-1", "Bearer at-1", "Bearer at-2", "Bearer at-3"]


@pytest.mark.parametrize(("expires_in", "kept"), [
    (None, 3600.0),                 # absent: default_expires_s
    (0, 60.0),
    (-300, 60.0),
    ("7200", 7200.0),               # a number as text
    ("soon", 3600.0),               # not a number: default_expires_s
    ("NaN", 3600.0),
    (True, 3600.0),
    (10**12, 86400.0),              # years: one day
    ("Infinity", 86400.0),
    pytest.param(10**400, 86400.0, id="10**400"),  # an integer too large for a float
    pytest.param(-(10**400), 60.0, id="-10**400"),
])
async def test_a_token_lifetime_is_kept_between_a_minute_and_a_day(
        expires_in: Any, kept: float) -> None:
    """Whatever expires_in the endpoint answers (absent, 0, negative, text, absurd), the
    token is kept between 60 s and one day: never refreshed in a loop, never kept for
    years."""
    clock = Clock()
    async with oauth_server(expires_in=expires_in) as server:
        http = client(crm(server), clock=clock)
        try:
            await ping(http)
            assert http.oauth is not None
            assert http.oauth.token is not None
            assert http.oauth.token.expires_at - clock.now == pytest.approx(kept, abs=1)
        finally:
            await http.aclose()


@pytest.mark.parametrize("answer", [
    pytest.param("[" * 100_000 + "]" * 100_000, id="nested"),
    pytest.param('{"access_token": "at-1", "expires_in": 1' + "0" * 5000 + "}", id="huge-int"),
])
async def test_an_unparseable_token_answer_is_a_bad_response(answer: str) -> None:
    """A token endpoint answering JSON nested too deeply, or an integer of over 4300
    digits, fails the request as CrmBadResponse (a CRM error, counted and retried as
    one), not as a bare RecursionError or ValueError out of the connector."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return (200, answer, {}) if req["path"] == "/oauth/token" else (200, {}, {})

    async with scripted_server(reply) as server:
        http = CrmHttp(CrmSettings.model_validate({
            "name": "loop", "base_url": server.url, "auth": {"type": "oauth2", "oauth2": {
                "token_url": "/oauth/token", "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET}}}))
        try:
            with pytest.raises(CrmBadResponse, match="oauth2 token endpoint"):
                await ping(http)
        finally:
            await http.aclose()


async def test_a_short_lived_token_is_not_refreshed_on_every_request() -> None:
    """A token answered with expires_in 0 lives 60 s; the refresh margin (60 s by
    default) is cut to half of that: requests in its first 30 s send it without starting
    a refresh, and the one after starts exactly one."""
    clock = Clock()
    async with oauth_server(expires_in=0) as server:
        http = client(crm(server), clock=clock)
        try:
            for _ in range(20):
                await ping(http)
                clock.now += 1
            assert http.oauth is not None
            assert http.oauth._refresh is None
            assert len(server.token_requests) == 1
            clock.now += 11  # 31 s old: within half its lifetime of the expiry
            await ping(http)
            refresh = http.oauth._refresh
            assert refresh is not None
            await refresh
        finally:
            await http.aclose()
    assert len(server.token_requests) == 2


def test_a_stored_token_that_never_expires_is_not_read() -> None:
    """A token stored with an expiry that is no finite time (written by a broken peer)
    reads as absent: the next request refreshes it instead of sending it forever."""
    assert Token.from_json('{"a":"at-1","e":Infinity,"b":null}') is None
    assert Token.from_json('{"a":"at-1","e":NaN,"b":null}') is None
    assert Token.from_json('{"a":"at-1","e":1' + "0" * 400 + ',"b":null}') is None
    assert Token.from_json('{"a":"at-1","e":100.0,"b":null,"i":40.0}') == Token(
        "at-1", 100.0, None, 40.0)
    assert Token("at-1", 100.0, None, 40.0).refresh_margin(60) == 30


async def test_a_401_forces_exactly_one_refresh_and_one_resend() -> None:
    """A token the API refuses (revoked) is refreshed once and the request sent again;
    when the new token is refused too, the 401 is final and says what the API said."""
    async with oauth_server() as server:
        http = client(crm(server))
        try:
            await ping(http)
            server.revoke_all()
            assert (await ping(http))["token"] == "at-2"
            assert [r["authorization"] for r in server.api_requests] == [
                "Bearer at-1", "Bearer at-1", "Bearer at-2"]
            server.accept = False  # from now on no token is accepted
            before = len(server.token_requests)
            with pytest.raises(CrmClientError) as refused:
                await ping(http)
        finally:
            await http.aclose()
    assert len(server.token_requests) == before + 1
    assert refused.value.status == 401
    assert "invalid_token" in str(refused.value)


async def test_refresh_token_grant_with_basic_client_auth_and_rotation(
    redis: aioredis.Redis,
) -> None:
    """The refresh grant (Pipedrive's form: client as HTTP basic) sends the refresh token;
    a rotated one is used next time and kept in Redis, so a second instance configured
    with the old one still refreshes."""
    async with oauth_server(client_auth="basic", rotate=True) as server:
        settings = crm(server, grant="refresh_token", refresh_token=REFRESH_TOKEN,
                       client_auth="basic")
        first = client(settings, redis=redis)
        second = client(settings, redis=redis)
        try:
            await ping(first)
            server.revoke_all()
            await ping(first)
            await redis.delete(KEYS.crm_token("loop"))  # the second must refresh itself
            server.revoke_all()
            assert (await ping(second))["token"] == "at-6"
        finally:
            await first.aclose()
            await second.aclose()
    grants = [(r["grant_type"], r["refresh_token"]) for r in server.token_requests]
    assert grants == [("refresh_token", REFRESH_TOKEN), ("refresh_token", "rt-rotated-1"),
                      ("refresh_token", "rt-rotated-3")]
    assert all(r["authorization"].startswith("Basic ") for r in server.token_requests)
    assert all("client_secret" not in r for r in server.token_requests)
    assert (await redis.get(KEYS.crm_refresh_token("loop"))) == b"rt-rotated-5"


async def test_instances_share_the_token_and_only_one_refreshes(
    redis: aioredis.Redis,
) -> None:
    """A second instance adopts the token from Redis without asking the endpoint; when
    every token is revoked, 3 instances x 5 concurrent requests cause ONE refresh (the
    lock holder's; the others wait for it and adopt it)."""
    async with oauth_server(delay_s=0.2) as server:
        settings = crm(server)
        instances = [client(settings, redis=redis) for _ in range(3)]
        try:
            await ping(instances[0])
            assert (await ping(instances[1]))["token"] == "at-1"
            assert len(server.token_requests) == 1
            server.revoke_all()
            answers = await asyncio.gather(*(ping(i) for i in instances for _ in range(5)))
        finally:
            for i in instances:
                await i.aclose()
    assert {a["token"] for a in answers} == {"at-2"}
    assert len(server.token_requests) == 2
    assert await redis.exists(KEYS.crm_token_lock("loop")) == 0
    stored = Token.from_json(await redis.get(KEYS.crm_token("loop")))
    assert stored is not None
    assert stored.access_token == "at-2"


async def test_an_instance_waiting_for_a_refresh_that_fails_takes_over_at_once(
    redis: aioredis.Redis,
) -> None:
    """Instance A holds the refresh lock and its refresh fails (the endpoint refuses A's
    secret); B, waiting for A's token, asks the endpoint itself as soon as A's lock is
    released, not after lock_s."""
    async with oauth_server(delay_s=0.3) as server:
        good = crm(server, lock_s=8)
        bad = crm(server, lock_s=8)
        assert bad.auth.oauth2 is not None
        bad.auth.oauth2.client_secret = SecretStr("wrong-SECRET-1")
        first, second = client(bad, redis=redis), client(good, redis=redis)
        try:
            failing = asyncio.create_task(ping(first))
            await asyncio.sleep(0.1)  # A has the lock and waits for the endpoint
            started = time.monotonic()
            assert (await ping(second))["token"] == "at-1"
            waited = time.monotonic() - started
            with pytest.raises(CrmClientError):
                await failing
        finally:
            await first.aclose()
            await second.aclose()
    assert waited < 4.0  # A's 0.2 s left + B's own 0.3 s, far from lock_s (8 s)
    assert [r["client_secret"] for r in server.token_requests] == ["wrong-SECRET-1",
                                                                  CLIENT_SECRET]


async def test_a_failed_background_refresh_is_not_started_again_by_every_request() -> None:
    """Within the refresh margin, a background refresh that fails is tried again after
    a pause, not by each request meanwhile (the still-valid token is sent all along)."""
    clock = Clock()
    async with oauth_server() as server:
        settings = crm(server, refresh_margin_s=60)
        http = client(settings, clock=clock)
        assert http.oauth is not None
        assert settings.auth.oauth2 is not None
        try:
            await ping(http)
            settings.auth.oauth2.client_secret = SecretStr("revoked-SECRET-2")
            clock.now += 3550  # 50 s left: inside the margin
            for _ in range(5):
                assert (await ping(http))["token"] == "at-1"
                refresh = http.oauth._refresh
                if refresh is not None:
                    await asyncio.gather(refresh, return_exceptions=True)
            assert len(server.token_requests) == 2
            clock.now += OAuth2Client.RETRY_S
            assert (await ping(http))["token"] == "at-1"
            refresh = http.oauth._refresh
            assert refresh is not None
            await asyncio.gather(refresh, return_exceptions=True)
        finally:
            await http.aclose()
    assert len(server.token_requests) == 3


async def test_a_valid_token_costs_no_redis_command(redis: aioredis.Redis) -> None:
    """With a valid token in memory, requests send no command to Redis at all (the
    call path's lookups add no await on Redis for auth)."""
    async with oauth_server() as server:
        http = client(crm(server), redis=redis)
        try:
            await ping(http)
            before = await redis.info("commandstats")
            for _ in range(30):
                await ping(http)
            after = await redis.info("commandstats")
        finally:
            await http.aclose()

    def calls(stats: dict[str, Any]) -> int:
        return sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")

    assert calls(after) == calls(before)
    assert len(server.api_requests) == 31


async def test_redis_down_degrades_to_a_refresh_per_instance(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """With the token store's Redis gone, the token is still fetched (per instance) and
    requests go through; a log line says so."""
    caplog.set_level(logging.WARNING, logger="router.crm.auth")
    store_redis = aioredis.Redis.from_url(own_redis.url, socket_timeout=0.2,
                                          socket_connect_timeout=0.2)
    own_redis.stop()
    async with oauth_server() as server:
        http = client(crm(server), redis=store_redis)
        try:
            assert (await ping(http))["token"] == "at-1"
        finally:
            await http.aclose()
            await store_redis.aclose()
    assert "Redis unavailable" in caplog.text


async def test_a_token_endpoint_redirect_is_not_followed() -> None:
    """A token endpoint answering 302 (to a login page elsewhere) is not followed: the
    client secret in the form would go along. The error names where it pointed, without
    its query, and crm.auth.oauth2.token_url as what to fix; no API request is sent."""
    async with scripted_server(lambda _r: (200, {"access_token": "stolen"}, {})) as thief:
        def moved(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
            return 302, "", {"Location": f"{thief.url}/login?next=x"}

        async with scripted_server(moved) as server:
            http = CrmHttp(CrmSettings.model_validate({
                "name": "loop", "base_url": server.url, "auth": {"type": "oauth2", "oauth2": {
                    "token_url": "/oauth/token", "client_id": CLIENT_ID,
                    "client_secret": CLIENT_SECRET}}}))
            try:
                with pytest.raises(CrmRedirected) as failed:
                    await ping(http)
            finally:
                await http.aclose()
    assert thief.seen == []
    assert [r["path"] for r in server.seen] == ["/oauth/token"]
    assert failed.value.location == f"{thief.url}/login"
    assert "crm.auth.oauth2.token_url" in str(failed.value)
    assert CLIENT_SECRET not in str(failed.value)


async def test_token_endpoint_refusal_says_why_with_the_secret_masked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong client secret fails with the endpoint's own error (invalid_client) in the
    exception and the log line, and the secret it echoes is masked."""
    caplog.set_level(logging.WARNING)
    async with oauth_server() as server:
        settings = crm(server)
        assert settings.auth.oauth2 is not None
        settings.auth.oauth2.client_secret = SecretStr("wrong-SECRET-999")
        http = client(settings)
        try:
            with pytest.raises(CrmClientError) as refused:
                await ping(http)
        finally:
            await http.aclose()
    assert refused.value.status == 401
    assert '"error":"invalid_client"' in str(refused.value)
    assert "wrong-SECRET-999" not in str(refused.value)
    assert "***" in refused.value.detail
    assert "invalid_client" in caplog.text
    assert "wrong-SECRET-999" not in caplog.text


async def test_zoho_style_query_parameters_and_token_scheme() -> None:
    """send_as: query puts the grant in the query string (Zoho's documented form), and
    the token goes out as 'Authorization: Zoho-oauthtoken <token>'."""
    async with oauth_server(scheme="Zoho-oauthtoken") as server:
        http = client(crm(server, grant="refresh_token", refresh_token=REFRESH_TOKEN,
                          send_as="query", scheme="Zoho-oauthtoken"))
        try:
            assert (await ping(http))["token"] == "at-1"
        finally:
            await http.aclose()
    assert server.token_requests[0]["grant_type"] == "refresh_token"
    assert server.api_requests[0]["authorization"] == "Zoho-oauthtoken at-1"


async def test_salesforce_style_instance_url_and_default_lifetime() -> None:
    """A token answer without expires_in lives default_expires_s; its instance_url is
    the base of the API requests (the configured base_url points nowhere)."""
    clock = Clock()
    async with oauth_server(expires_in=None) as server:
        server.instance_url = server.url.replace("127.0.0.1", "localhost")
        settings = crm(server, base_url=f"http://127.0.0.1:{closed_port()}",
                       token_url=f"{server.url}/oauth/token", base_url_field="instance_url",
                       default_expires_s=7200)
        http = client(settings, clock=clock)
        try:
            assert (await ping(http))["token"] == "at-1"
        finally:
            await http.aclose()
    assert http.oauth is not None
    assert http.oauth.token is not None
    assert http.oauth.token.expires_at == pytest.approx(clock.now + 7200, abs=1)


def test_oauth2_config_needs_its_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """oauth2 without its block, or a grant without its secret, fails validation naming
    the field; secrets come from the environment with ${VAR}."""
    with pytest.raises(ValidationError, match=r"crm\.auth\.oauth2"):
        CrmSettings.model_validate({"auth": {"type": "oauth2"}})
    with pytest.raises(ValidationError, match="refresh_token"):
        CrmSettings.model_validate({"auth": {"type": "oauth2", "oauth2": {
            "token_url": "/t", "client_id": "c", "grant": "refresh_token"}}})
    with pytest.raises(ValidationError, match="client_secret"):
        CrmSettings.model_validate({"auth": {"type": "oauth2", "oauth2": {
            "token_url": "/t", "client_id": "c"}}})
    monkeypatch.setenv("CRM_CLIENT_SECRET", "from-env-123")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("crm:\n  base_url: http://crm.example.com\n  auth:\n    type: oauth2\n"
                   "    oauth2:\n      token_url: /t\n"
                   "      client_id: c\n      client_secret: ${CRM_CLIENT_SECRET}\n")
    oauth2 = load_settings(cfg).crm.auth.oauth2
    assert oauth2 is not None
    assert oauth2.client_secret.get_secret_value() == "from-env-123"
    assert "from-env-123" in load_settings(cfg).crm.auth.secrets


async def test_an_upload_refused_with_an_expired_token_is_left_to_the_retry() -> None:
    """A multipart upload (sent once) refused with 401: the token is refreshed and the
    request is not sent again here: a retryable CrmUnavailable that says nothing was
    done, so the outbox's retry sends it with the new token."""
    import aiohttp

    from router.errors import CrmUnavailable

    async with oauth_server() as server:
        http = client(crm(server))
        try:
            await ping(http)
            server.revoke_all()
            form = aiohttp.FormData()
            form.add_field("file", b"RIFF", filename="1.wav")
            with pytest.raises(CrmUnavailable) as refused:
                await http.request("recording", "POST", "/api/upload", data=form)
            assert (await ping(http))["token"] == "at-2"
        finally:
            await http.aclose()
    assert refused.value.retryable
    assert not refused.value.may_have_acted
    assert [r["path"] for r in server.api_requests] == ["/api/ping", "/api/upload", "/api/ping"]
    assert len(server.token_requests) == 2


async def test_shared_tokens_are_sealed_with_the_key_ring(
        redis: aioredis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    """With encryption at rest configured, the token and the rotated refresh token are
    stored sealed (enc1:, bound to their Redis key) and read back by every instance; a
    token stored in clear before encryption was turned on is still read; one sealed
    under a key the ring lacks reads as absent (a refresh follows), with a warning."""
    import base64

    from router.crypto import KeyRing

    ring = KeyRing.parse("k1:" + base64.b64encode(b"k" * 32).decode())
    other = KeyRing.parse("k9:" + base64.b64encode(b"z" * 32).decode())
    now = time.time()
    token = Token("at-sealed-123", now + 600)
    await TokenStore(redis, KEYS, "loop", ring).save(token, "rt-sealed-456", now)
    raw = await redis.mget([KEYS.crm_token("loop"), KEYS.crm_refresh_token("loop")])
    assert all(v.startswith(b"enc1:k1:") for v in raw)
    assert not any(b"sealed" in v for v in raw)
    assert await TokenStore(redis, KEYS, "loop", ring).load() == (token, "rt-sealed-456")
    await redis.set(KEYS.crm_token("loop"), token.to_json())
    await redis.set(KEYS.crm_refresh_token("loop"), "rt-plain")
    assert await TokenStore(redis, KEYS, "loop", ring).load() == (token, "rt-plain")
    await TokenStore(redis, KEYS, "loop", other).save(token, "rt-other", now)
    caplog.set_level(logging.WARNING)
    assert await TokenStore(redis, KEYS, "loop", ring).load() == (None, None)
    assert "does not decrypt" in caplog.text
