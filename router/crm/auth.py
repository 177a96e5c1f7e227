"""How each CRM request proves who we are: the ``crm.auth`` block and its runtime.

Static credentials (``bearer``, ``api_key`` in a header or the query, HTTP ``basic``) are
default headers or query parameters of the connection pool: nothing per request.

``oauth2`` gets an access token from the CRM's token endpoint, by the client
credentials grant (Salesforce, Zoho self-client, most self-hosted CRMs) or the refresh
token grant (HubSpot, Zoho, Pipedrive), and sends it as ``<header>: <scheme> <token>``:

- the token lives in memory; a request while it is valid costs no I/O and no await
  (the call path's lookups take it synchronously);
- a token is kept for its ``expires_in`` (``default_expires_s`` when the answer has
  none or not a number), bounded to 60 s .. 1 day (:data:`MIN_LIFETIME_S`,
  :data:`MAX_LIFETIME_S`): a 0 or negative one would be refreshed in a loop, one of
  years kept long after it was revoked;
- ``refresh_margin_s`` (at most half the token's lifetime) before it expires, the
  next request starts one refresh in the background and goes on with the still-valid
  token (after a failed one, the next starts ``RETRY_S`` later); only a request that
  finds no valid token (the first one, or after a long idle) waits for the endpoint;
- a 401 from the API invalidates the token that was sent and the request is sent again
  once with a new one (a second 401 is the API's final word: CrmClientError);
- with ``shared: true`` (the default) and Redis, the token is kept in Redis for every
  instance (``Keys.crm_token``, expiring with the token) and a refresh takes a lock
  (``Keys.crm_token_lock``, SET NX PX): one instance asks the endpoint, the others wait
  for the lock (polling the stored token) and adopt the new token, or take over as soon
  as the lock is released without one (that refresh failed). A refresh token the
  endpoint rotates is kept there too (``Keys.crm_refresh_token``), so every instance
  uses the newest. Redis trouble degrades to refreshing per instance, with a log line.

Secrets come from the environment (``client_secret: ${CRM_CLIENT_SECRET}``) or a file
(``client_secret_file: /run/secrets/crm``); they are ``SecretStr``, never logged, and
masked wherever a request is shown. Tokens in Redis are as
sensitive as the credentials: protect Redis as you protect the CRM's keys.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import secrets as _random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from redis.asyncio import Redis
from redis.exceptions import RedisError

from router.crypto import KeyRing
from router.errors import CrmBadResponse, CrmClientError, CrmServerError, CryptoError
from router.keys import Keys

log = logging.getLogger(__name__)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OAuth2Settings(_Model):
    """An OAuth 2.0 token endpoint (RFC 6749 sections 4.4 and 6).

    ``client_auth``: the client's id and secret in the form body (``body``, what HubSpot
    and Salesforce document) or as HTTP basic (``basic``, Pipedrive). ``send_as``: the
    parameters as a form body or in the query string (Zoho's documented form).
    ``default_expires_s`` applies when the answer has no ``expires_in`` (Salesforce).
    ``base_url_field``: a field of the token answer that holds the API's base URL
    (Salesforce ``instance_url``, Zoho and Pipedrive ``api_domain``); request paths are
    then relative to it.
    """

    grant: Literal["client_credentials", "refresh_token"] = "client_credentials"
    token_url: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr = SecretStr("")
    refresh_token: SecretStr = SecretStr("")
    scope: str = ""
    extra_params: dict[str, str] = Field(default_factory=dict)
    client_auth: Literal["body", "basic"] = "body"
    send_as: Literal["form", "query"] = "form"
    header: str = "Authorization"
    scheme: str = "Bearer"
    refresh_margin_s: float = Field(60.0, ge=0)
    default_expires_s: float = Field(3600.0, gt=0)
    base_url_field: str | None = None
    shared: bool = True
    lock_s: float = Field(15.0, gt=0, description="longest a refresh may hold the lock")

    @model_validator(mode="after")
    def _grant_needs(self) -> OAuth2Settings:
        if not self.token_url.startswith(("/", "http://", "https://")):
            raise ValueError("token_url must be a path starting with / or an http(s):// URL")
        if self.grant == "refresh_token" and not self.refresh_token:
            raise ValueError("grant refresh_token needs crm.auth.oauth2.refresh_token "
                             "(e.g. ${CRM_REFRESH_TOKEN})")
        if self.grant == "client_credentials" and not self.client_secret:
            raise ValueError("grant client_credentials needs crm.auth.oauth2.client_secret "
                             "(e.g. ${CRM_CLIENT_SECRET})")
        return self


class AuthSettings(_Model):
    """How each request proves who we are.

    ``bearer``: ``Authorization: Bearer <token>``; ``api_key``: ``<header>: <key>`` (or a
    query parameter named ``header`` when ``location: query``); ``basic``: HTTP basic
    with ``username``/``password``; ``oauth2``: a token from ``oauth2.token_url``,
    refreshed before it expires (see the module); ``none``: nothing.
    """

    type: Literal["none", "bearer", "api_key", "basic", "oauth2"] = "none"
    token: SecretStr = SecretStr("")
    header: str = "X-API-Key"
    key: SecretStr = SecretStr("")
    location: Literal["header", "query"] = "header"
    username: str = ""
    password: SecretStr = SecretStr("")
    oauth2: OAuth2Settings | None = None

    @model_validator(mode="after")
    def _complete(self) -> AuthSettings:
        needed = {"bearer": "token", "api_key": "key", "basic": "username",
                  "oauth2": "oauth2"}.get(self.type)
        if needed and not getattr(self, needed):
            hint = "a token_url and client" if needed == "oauth2" else "${CRM_TOKEN}"
            raise ValueError(f"auth type {self.type} needs crm.auth.{needed} (e.g. {hint})")
        if ":" in self.username:
            raise ValueError("crm.auth.username must not contain ':' (HTTP basic auth)")
        return self

    @property
    def secrets(self) -> list[str]:
        """The secret values (to mask wherever they could be printed)."""
        values = [self.token, self.key, self.password]
        if self.oauth2 is not None:
            values += [self.oauth2.client_secret, self.oauth2.refresh_token]
        return [s.get_secret_value() for s in values if s]


def static_credentials(
    auth: AuthSettings, headers: Mapping[str, str] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """Default headers and query parameters carrying static credentials (none for oauth2)."""
    out = dict(headers or {})
    params: dict[str, str] = {}
    if auth.type == "bearer":
        out["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    elif auth.type == "basic":
        out["Authorization"] = basic_header(auth.username, auth.password.get_secret_value())
    elif auth.type == "api_key":
        if auth.location == "query":
            params[auth.header] = auth.key.get_secret_value()
        else:
            out[auth.header] = auth.key.get_secret_value()
    return out, params


def basic_header(username: str, password: str) -> str:
    """The ``Authorization`` value of HTTP basic auth."""
    pair = f"{username}:{password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


# --- OAuth 2.0 ----------------------------------------------------------------------------


#: The bounds of a token's lifetime, whatever the endpoint's ``expires_in`` says (0,
#: negative, years): below, the client would refresh in a loop; above, it would keep a
#: token long after it was revoked.
MIN_LIFETIME_S = 60.0
MAX_LIFETIME_S = 86400.0


@dataclass(frozen=True)
class Token:
    """An access token, when it stops being valid (epoch seconds), the API base URL and
    when it was issued (None for a token stored before that was kept)."""

    access_token: str
    expires_at: float
    base_url: str | None = None
    issued_at: float | None = None

    def to_json(self) -> str:
        doc: dict[str, Any] = {"a": self.access_token, "e": self.expires_at, "b": self.base_url}
        if self.issued_at is not None:
            doc["i"] = self.issued_at
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes | None) -> Token | None:
        """The token stored as JSON, or None for nothing or garbage."""
        if not text:
            return None
        try:
            doc = json.loads(text)
            issued = doc.get("i")
            token = cls(str(doc["a"]), float(doc["e"]), doc.get("b") or None,
                        float(issued) if issued is not None else None)
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
                RecursionError):
            return None
        if not math.isfinite(token.expires_at) or (
                token.issued_at is not None and not math.isfinite(token.issued_at)):
            return None
        return token if token.access_token else None

    def refresh_margin(self, configured: float) -> float:
        """How long before the expiry a refresh starts: the configured margin, at most
        half the token's lifetime (a 60 s token is not refreshed on every request)."""
        if self.issued_at is None:
            return configured
        return min(configured, (self.expires_at - self.issued_at) / 2)


#: Sends a token request: (url, form fields, headers, send_as) -> (status, raw body).
TokenSender = Callable[[str, dict[str, str], dict[str, str], str], Awaitable[tuple[int, bytes]]]


class TokenStore:
    """The token (and a rotated refresh token) in Redis, shared by every instance.

    With encryption at rest configured (``crypto``: main's key ring, router.crypto), both
    are sealed, each bound to its Redis key; values written before encryption was turned
    on are still read, and one that does not open (an unknown key) reads as absent: the
    next request refreshes the token.
    """

    def __init__(self, redis: Redis, keys: Keys, crm: str, crypto: KeyRing | None = None
                 ) -> None:
        self.redis = redis
        self.crypto = crypto or KeyRing()
        self.token_key = keys.crm_token(crm)
        self.lock_key = keys.crm_token_lock(crm)
        self.refresh_key = keys.crm_refresh_token(crm)

    async def load(self) -> tuple[Token | None, str | None]:
        """The stored token and refresh token (None when absent)."""
        token, refresh, _locked = await self.poll()
        return token, refresh

    async def poll(self) -> tuple[Token | None, str | None, bool]:
        """The stored token and refresh token, and whether the refresh lock is held
        (one round trip)."""
        token, refresh, lock = await self.redis.mget(
            [self.token_key, self.refresh_key, self.lock_key])
        return (Token.from_json(self._open(token, self.token_key)),
                self._open(refresh, self.refresh_key) or None, lock is not None)

    async def save(self, token: Token, refresh_token: str | None, now: float) -> None:
        """Store ``token`` until it expires, and a rotated refresh token for good."""
        ttl_ms = max(1000, int((token.expires_at - now) * 1000))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self.token_key, self.crypto.seal(token.to_json(), self.token_key),
                     px=ttl_ms)
            if refresh_token:
                pipe.set(self.refresh_key, self.crypto.seal(refresh_token, self.refresh_key))
            await pipe.execute()

    def _open(self, value: str | bytes | None, key: str) -> str | None:
        if value is None:
            return None
        text = value.decode() if isinstance(value, bytes) else str(value)
        try:
            return self.crypto.open(text, key)
        except CryptoError as exc:
            log.warning("crm oauth2: the stored %s does not decrypt (%s): ignored",
                        "refresh token" if key == self.refresh_key else "token", exc)
            return None

    async def lock(self, ttl_s: float) -> str | None:
        """Take the refresh lock; its owner's random value, or None when held elsewhere."""
        owner = _random.token_hex(8)
        got = await self.redis.set(self.lock_key, owner, nx=True, px=int(ttl_s * 1000))
        return owner if got else None

    async def unlock(self, owner: str) -> None:
        """Release the lock if we still own it (compare and delete, one script)."""
        await self.redis.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('DEL', KEYS[1]) end return 0", 1, self.lock_key, owner,
        )


class OAuth2Client:
    """Keeps a valid access token for one CRM (see the module docstring)."""

    #: A token this close to its expiry is not sent any more (clock skew, time on the wire).
    SAFETY_S = 5.0
    #: After a refresh failed, the next background refresh waits this long (the requests
    #: meanwhile send the still-valid token instead of each asking the endpoint again).
    RETRY_S = 5.0

    def __init__(
        self,
        settings: OAuth2Settings,
        send: TokenSender,
        *,
        store: TokenStore | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 0.05,
    ) -> None:
        self.settings = settings
        self.send = send
        self.store = store if settings.shared else None
        self.clock = clock
        self.poll_s = poll_s
        self.token: Token | None = None
        self.refresh_token = settings.refresh_token.get_secret_value()
        self._refresh: asyncio.Task[Token] | None = None
        self._retry_at = 0.0
        #: Token endpoint requests made by this instance (tests, doctor).
        self.requests = 0

    @property
    def secrets(self) -> list[str]:
        """Values to mask: the current token and refresh token."""
        return [s for s in (self.token.access_token if self.token else "",
                            self.refresh_token) if s]

    def header(self, token: Token) -> tuple[str, str]:
        """The header that carries ``token``."""
        scheme = self.settings.scheme
        return self.settings.header, f"{scheme} {token.access_token}" if scheme else \
            token.access_token

    def valid(self) -> Token | None:
        """The in-memory token if it may be sent now (no I/O); starts a background
        refresh when it is within ``refresh_margin_s`` of its expiry."""
        token = self.token
        if token is None:
            return None
        left = token.expires_at - self.clock()
        if left <= self.SAFETY_S:
            return None
        if left <= token.refresh_margin(self.settings.refresh_margin_s) \
                and self._refresh is None \
                and self.clock() >= self._retry_at:
            self._start(stale=token)
        return token

    async def get(self) -> Token:
        """A valid token: the one in memory, else a refreshed one (waits for it)."""
        return self.valid() or await self._wait(stale=self.token)

    async def rejected(self, token: Token) -> Token:
        """The API refused ``token`` (401): a different one, refreshed unless another
        request already did."""
        current = self.token
        if current is not None and current.access_token != token.access_token \
                and current.expires_at - self.clock() > self.SAFETY_S:
            return current
        if current is not None and current.access_token == token.access_token:
            self.token = None  # never send it again
        return await self._wait(stale=token)

    async def aclose(self) -> None:
        """Cancel a background refresh."""
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- one refresh at a time per process --------------------------------------------
    def _start(self, stale: Token | None) -> asyncio.Task[Token]:
        task = asyncio.get_running_loop().create_task(self._obtain(stale), name="oauth2-token")
        self._refresh = task
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Token]) -> None:
        if self._refresh is task:
            self._refresh = None
        if not task.cancelled() and task.exception() is not None:
            self._retry_at = self.clock() + self.RETRY_S
            log.warning("crm oauth2: token refresh failed: %s", task.exception())

    async def _wait(self, stale: Token | None) -> Token:
        task = self._refresh or self._start(stale)
        return await asyncio.shield(task)

    async def _obtain(self, stale: Token | None) -> Token:
        """Adopt a newer token from Redis, or refresh under the shared lock."""
        if self.store is None:
            return self._adopt(*await self._fetch())
        try:
            shared, refresh = await self.store.load()
            if refresh:
                self.refresh_token = refresh
            if self._usable(shared, stale):
                assert shared is not None
                return self._adopt(shared, None)
            owner = await self.store.lock(self.settings.lock_s)
            if owner is None:
                waited = await self._await_other(stale)
                if waited is not None:
                    return self._adopt(waited, None)
                owner = await self.store.lock(self.settings.lock_s)
        except (RedisError, OSError) as exc:
            log.warning("crm oauth2: Redis unavailable (%s): refreshing for this instance", exc)
            return self._adopt(*await self._fetch())
        try:
            if owner is not None:  # the lock is ours: someone may have stored one meanwhile
                shared, _ = await self.store.load()
                if self._usable(shared, stale):
                    assert shared is not None
                    return self._adopt(shared, None)
            token, rotated = await self._fetch()
            try:
                await self.store.save(token, rotated, self.clock())
            except (RedisError, OSError) as exc:
                log.warning("crm oauth2: token not shared (Redis: %s)", exc)
            return self._adopt(token, rotated)
        finally:
            if owner is not None:
                try:
                    await self.store.unlock(owner)
                except (RedisError, OSError) as exc:
                    log.warning("crm oauth2: lock not released (expires by itself): %s", exc)

    async def _await_other(self, stale: Token | None) -> Token | None:
        """Another instance refreshes: poll the stored token until it changes; None when
        the lock is released without a new token (that refresh failed) or its time runs
        out (that instance died)."""
        assert self.store is not None
        deadline = time.monotonic() + self.settings.lock_s
        while time.monotonic() < deadline:
            await asyncio.sleep(self.poll_s)
            shared, refresh, locked = await self.store.poll()
            if refresh:
                self.refresh_token = refresh
            if self._usable(shared, stale):
                return shared
            if not locked:
                return None
        return None

    def _usable(self, token: Token | None, stale: Token | None) -> bool:
        if token is None or token.expires_at - self.clock() <= self.SAFETY_S:
            return False
        return stale is None or token.access_token != stale.access_token

    def _adopt(self, token: Token, rotated: str | None) -> Token:
        self.token = token
        if rotated:
            self.refresh_token = rotated
        return token

    async def _fetch(self) -> tuple[Token, str | None]:
        """Ask the token endpoint; the new token and a rotated refresh token (if any)."""
        s = self.settings
        form: dict[str, str] = {"grant_type": s.grant}
        headers = {"Accept": "application/json"}
        if s.grant == "refresh_token":
            form["refresh_token"] = self.refresh_token
        if s.scope:
            form["scope"] = s.scope
        form.update(s.extra_params)
        secret = s.client_secret.get_secret_value()
        if s.client_auth == "basic":
            headers["Authorization"] = basic_header(s.client_id, secret)
        else:
            form["client_id"] = s.client_id
            if secret:
                form["client_secret"] = secret
        self.requests += 1
        started = self.clock()
        status, raw = await self.send(s.token_url, form, headers, s.send_as)
        return self._parse(status, raw, started)

    def _parse(self, status: int, raw: bytes, now: float) -> tuple[Token, str | None]:
        from router.crm.redact import summarize_body

        secrets = [self.settings.client_secret.get_secret_value(), self.refresh_token]
        if status >= 400 or status < 200:
            detail = summarize_body(raw, secrets)
            message = f"oauth2 token endpoint: HTTP {status}"
            if status >= 500:
                raise CrmServerError(message, status=status, detail=detail)
            raise CrmClientError(message, status=status, detail=detail)
        try:
            doc: Any = json.loads(raw)
            access = doc["access_token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CrmBadResponse("oauth2 token endpoint: no access_token in the answer") from exc
        except RecursionError:
            raise CrmBadResponse("oauth2 token endpoint: answer nested too deeply") from None
        if not isinstance(access, str) or not access:
            raise CrmBadResponse("oauth2 token endpoint: access_token is not a string")
        lifetime = self._lifetime(doc.get("expires_in"))
        base = None
        if self.settings.base_url_field:
            value = doc.get(self.settings.base_url_field)
            if isinstance(value, str) and value.startswith(("http://", "https://")):
                base = value.rstrip("/")
        rotated = doc.get("refresh_token")
        log.info("crm oauth2: new access token, valid %.0f s", lifetime)
        token = Token(access, now + lifetime, base, issued_at=now)
        return token, rotated if isinstance(rotated, str) else None

    def _lifetime(self, given: Any) -> float:
        """Seconds a new token is kept: its ``expires_in`` (a number, or a number as
        text), else ``default_expires_s``; either between :data:`MIN_LIFETIME_S` and
        :data:`MAX_LIFETIME_S` (0, negative or years would refresh in a loop or keep a
        revoked token)."""
        seconds: float | None = None
        if given is not None and not isinstance(given, bool):
            try:
                seconds = float(given)
            except OverflowError:  # an integer past a float's range: as long or short
                seconds = math.inf if given > 0 else -math.inf
            except (TypeError, ValueError):
                seconds = None
        if seconds is None or math.isnan(seconds):
            if given is not None:
                log.warning("crm oauth2: expires_in %r is not a number: the token is kept "
                            "default_expires_s", _short(given))
            seconds = self.settings.default_expires_s
        bounded = min(max(seconds, MIN_LIFETIME_S), MAX_LIFETIME_S)
        if bounded != seconds:
            log.warning("crm oauth2: a token lifetime of %g s is out of bounds: kept %g s",
                        seconds, bounded)
        return bounded


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


__all__ = [
    "MAX_LIFETIME_S",
    "MIN_LIFETIME_S",
    "AuthSettings",
    "OAuth2Client",
    "OAuth2Settings",
    "Token",
    "TokenStore",
    "basic_header",
    "static_credentials",
]
