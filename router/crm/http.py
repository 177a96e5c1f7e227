"""The HTTP client every CRM request goes through.

One :class:`aiohttp.ClientSession` per client, created lazily inside the running event
loop, with TLS verification on unless the config says otherwise, a hard per-request
timeout (connect + send + read of the whole body) and a bound on the body size.
Failures become :mod:`router.errors` classes (``raise ... from exc``):

====================================================  =========================
what happened                                          raised
====================================================  =========================
no complete answer within ``timeout_s``                :class:`CrmTimeout`
refused, reset, dropped, DNS failure, TLS failure      :class:`CrmUnavailable`
a redirect (3xx): never followed                      :class:`CrmRedirected`
429, or a 4xx naming a ``limits.limit_error_codes``   :class:`CrmRateLimited`
other 4xx                                              :class:`CrmClientError`
5xx                                                    :class:`CrmServerError`
body is not JSON, or too large                         :class:`CrmBadResponse`
====================================================  =========================

An HTTP error keeps what the CRM said (its body, compacted, truncated, with secrets and
personal data masked: :mod:`router.crm.redact`) in ``.detail`` and in its message, so
the log line, the dead letter and ``outbox list`` say *why*. Statuses the caller expects
(404 for "unknown caller") are returned, not raised.

Every answer's rate-limit headers feed the CRM's :class:`~router.crm.limits.RateGate`
(pauses after a 429 or an exhausted budget; lookups paced per ``crm.limits``), and
every request first waits for its turn there. Credentials come from
:mod:`router.crm.auth`: static ones are default headers of the pool; an OAuth2 token
is added per request from memory, refreshed once and the request sent again on a 401.

No redirect is followed (aiohttp follows them by default): a 3xx would carry the
credentials (an API key header, a token) to whatever host it names, and a POST answered
301/302/303 would be replayed as a GET without its body. A 3xx is a
:class:`CrmRedirected` naming where it pointed (without the query), for the request,
the OAuth2 token endpoint and the doctor alike: the configured address is wrong.

Every request counts in ``CRM_REQUESTS{op}``, every failure in ``CRM_ERRORS{op,kind}``.
Log lines show the method and the URL path only (no query string, which may carry phone
numbers or keys) and never a header value that holds a secret.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from router.crm.auth import OAuth2Client, Token, TokenStore, static_credentials
from router.crm.config import CrmSettings
from router.crm.limits import (
    HeldBack,
    RateGate,
    limit_error,
    parse_retry_after,
    read_limits,
)
from router.crm.redact import summarize_body
from router.errors import (
    ConfigError,
    CrmBadResponse,
    CrmClientError,
    CrmError,
    CrmRateLimited,
    CrmRedirected,
    CrmServerError,
    CrmTimeout,
    CrmUnavailable,
)
from router.metrics import CRM_ERRORS, CRM_REQUESTS, CRM_TOKEN_REFRESHES

log = logging.getLogger(__name__)

#: Header names whose values are never shown.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
MASK = "***"
#: Operations that only read: sent again after a rate limit (a write is retried by its
#: caller, which knows whether it was carried out).
READS = frozenset({"lookup", "changed"})

__all__ = ["CrmHttp", "CrmResponse", "Exchange", "make_ssl", "mask_headers",
           "parse_retry_after"]


@dataclass
class Exchange:
    """One request and what came back, as :attr:`CrmHttp.trace` keeps them (unmasked:
    mask before showing)."""

    op: str
    method: str
    url: str
    params: dict[str, str]
    headers: dict[str, str]
    body: Any
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    response: Any = None
    error: str | None = None
    elapsed_ms: float = 0.0


@dataclass(frozen=True)
class CrmResponse:
    """A CRM answer that was accepted: status, headers and the parsed JSON (None if empty)."""

    status: int
    body: Any
    headers: Mapping[str, str] = field(default_factory=dict)


def mask_headers(headers: Mapping[str, str], extra_secret: Collection[str] = ()) -> dict[str, str]:
    """A copy of ``headers`` safe to log: secret values replaced by ``***``."""
    secret = SECRET_HEADERS | {h.lower() for h in extra_secret}
    return {k: (MASK if k.lower() in secret else v) for k, v in headers.items()}


def make_ssl(settings: CrmSettings) -> ssl.SSLContext | bool:
    """The TLS setting for the connector: a verifying context, or False when turned off."""
    if not settings.verify_tls:
        return False
    context = ssl.create_default_context()
    if settings.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(settings.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load CA bundle: {exc}", location="crm.ca_file") from exc
    return context


@dataclass(frozen=True)
class _Raw:
    status: int
    headers: Mapping[str, str]
    body: bytes


class CrmHttp:
    """A small JSON-over-HTTP client for one CRM (one connection pool).

    ``gate``: the CRM's rate gate, to share between the connectors of one process (a
    new one by default); ``token_store``: Redis for an OAuth2 token shared by every
    instance; ``oauth``: an OAuth2 client to share (made from the settings by default).
    """

    def __init__(
        self,
        settings: CrmSettings,
        *,
        gate: RateGate | None = None,
        token_store: TokenStore | None = None,
        oauth: OAuth2Client | None = None,
    ) -> None:
        self.settings = settings
        self.ssl = make_ssl(settings)
        self._timeout = settings.timeout_s
        self._client: aiohttp.ClientSession | None = None
        self._headers, self._auth_params = static_credentials(settings.auth, settings.headers)
        self._headers.setdefault("Accept", "application/json")
        self._secret_headers = (
            {settings.auth.header} if settings.auth.type == "api_key" else set()
        )
        self.gate = gate or RateGate(settings.limits, crm=settings.name)
        oauth2 = settings.auth.oauth2 if settings.auth.type == "oauth2" else None
        if oauth is None and oauth2 is not None:
            oauth = OAuth2Client(oauth2, self._token_request, store=token_store)
        self.oauth = oauth
        if oauth2 is not None:
            self._secret_headers.add(oauth2.header)
        #: When a list, every request and its answer is appended (``callroute crm doctor``).
        self.trace: list[Exchange] | None = None

    def __repr__(self) -> str:
        return f"CrmHttp({self.settings.name!r}, {self.settings.base_url!r})"

    @property
    def default_headers(self) -> dict[str, str]:
        """The headers sent on every request, masked for display."""
        return mask_headers(self._headers, self._secret_headers)

    @property
    def secret_headers(self) -> frozenset[str]:
        """The headers, besides :data:`SECRET_HEADERS`, whose values are secrets (an API
        key's, an OAuth2 token's), to pass to :func:`mask_headers`."""
        return frozenset(self._secret_headers)

    @property
    def secrets(self) -> list[str]:
        """Every secret value this client holds (to mask wherever text is shown)."""
        held = list(self.settings.auth.secrets)
        if self.oauth is not None:
            held += self.oauth.secrets
        return held

    def url(self, url: str, base: str | None = None) -> str:
        """An absolute URL: ``url`` itself, or ``base_url`` (or ``base``) + ``url``."""
        if url.startswith(("http://", "https://")):
            return url
        return (base or self.settings.base_url) + (url if url.startswith("/") else "/" + url)

    def _session(self) -> aiohttp.ClientSession:
        if self._client is None or self._client.closed:
            connector = aiohttp.TCPConnector(
                limit=self.settings.max_connections, ssl=self.ssl, ttl_dns_cache=300
            )
            self._client = aiohttp.ClientSession(
                connector=connector,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._timeout),
            )
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool (a later request opens a new one)."""
        if self.oauth is not None:
            await self.oauth.aclose()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def request(
        self,
        op: str,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        data: aiohttp.FormData | None = None,
        accept_status: Collection[int] = (),
    ) -> CrmResponse:
        """Send one request; return the answer or raise a :class:`CrmError` subclass.

        ``op`` labels metrics and logs (``lookup``, ``changed``, ``activity``...);
        statuses in ``accept_status`` are returned like a 2xx instead of raised. A read
        (``lookup``, ``changed``) that is rate limited is sent again once the CRM's
        limit resets, as long as that is within the op's queue bound.
        """
        started = time.monotonic()
        while True:
            try:
                return await self._once(
                    op, method, url, params=params, json_body=json_body, headers=headers,
                    data=data, accept_status=accept_status,
                )
            except HeldBack:
                raise
            except CrmRateLimited:
                # reads wait their turn again (the gate queues or holds them back); a
                # write is the caller's to retry (the outbox schedules it)
                if op not in READS or time.monotonic() - started >= self.gate.queue_bound(op):
                    raise

    async def _once(
        self,
        op: str,
        method: str,
        url: str,
        *,
        params: Mapping[str, str] | None,
        json_body: Any,
        headers: Mapping[str, str] | None,
        data: aiohttp.FormData | None,
        accept_status: Collection[int],
    ) -> CrmResponse:
        try:
            await self.gate.admit(op)
        except HeldBack as exc:
            log.info("crm %s %s %s not sent: %s", op, method, _path(self.url(url)), exc)
            raise
        CRM_REQUESTS.labels(op).inc()
        started = time.monotonic()
        target = self.url(url)
        exchange = None
        try:
            token = await self._token()
            if token is not None:
                target = self.url(url, token.base_url)
            if self.trace is not None:
                sent = {**self._headers, **(headers or {})}
                if token is not None and self.oauth is not None:
                    sent.update([self.oauth.header(token)])
                exchange = Exchange(op, method, target, {**(params or {}), **self._auth_params},
                                    sent, json_body)
                self.trace.append(exchange)
            raw = await self._exchange(
                method, target, token, params=params, json_body=json_body, headers=headers,
                data=data,
            )
            if raw.status == 401 and token is not None:
                assert self.oauth is not None
                log.info("crm %s: 401 with the current token: refreshing it once", op)
                token = await self.oauth.rejected(token)
                if data is not None:  # a form is sent once: the caller retries the step
                    refused = CrmUnavailable(f"{_where(method, target)}: HTTP 401 with an "
                                             "expired token; refreshed, to be sent again")
                    refused.may_have_acted = False
                    raise refused
                target = self.url(url, token.base_url)
                raw = await self._exchange(
                    method, target, token, params=params, json_body=json_body,
                    headers=headers, data=data,
                )
            if exchange is not None:
                exchange.status = raw.status
                exchange.response_headers = dict(raw.headers)
                exchange.response = _preview(raw.body)
            response = self._classify(op, method, target, raw, accept_status)
        except CrmError as exc:
            if exchange is not None:
                exchange.error = f"{exc.kind}: {exc}"
                exchange.elapsed_ms = (time.monotonic() - started) * 1000
            CRM_ERRORS.labels(op, exc.kind).inc()
            log.warning(
                "crm %s %s %s failed after %.0f ms: %s",
                op, method, _path(target), (time.monotonic() - started) * 1000, exc,
            )
            raise
        if exchange is not None:
            exchange.response = response.body
            exchange.elapsed_ms = (time.monotonic() - started) * 1000
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "crm %s %s %s -> %d in %.1f ms", op, method, _path(target), response.status,
                (time.monotonic() - started) * 1000,
            )
        return response

    async def _token(self) -> Token | None:
        """The OAuth2 token to send: from memory without an await when valid."""
        if self.oauth is None:
            return None
        token = self.oauth.valid()
        return token if token is not None else await self.oauth.get()

    async def _exchange(
        self,
        method: str,
        target: str,
        token: Token | None,
        *,
        params: Mapping[str, str] | None,
        json_body: Any,
        headers: Mapping[str, str] | None,
        data: aiohttp.FormData | None,
    ) -> _Raw:
        query = {**params, **self._auth_params} if params else self._auth_params or None
        if token is not None:
            assert self.oauth is not None
            name, value = self.oauth.header(token)
            headers = {**(headers or {}), name: value}
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session().request(
                    method, target, params=query, json=json_body, headers=headers, data=data,
                    allow_redirects=False,
                ) as resp:
                    raw = await self._read(resp, method, target)
                    return _Raw(resp.status, resp.headers, raw)
        except TimeoutError as exc:
            raise CrmTimeout(
                f"{_where(method, target)}: no answer within {self._timeout:g} s"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            unreached = CrmUnavailable(f"{_where(method, target)}: cannot connect: {exc}")
            unreached.may_have_acted = False  # nothing left this host
            raise unreached from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise CrmUnavailable(
                f"{_where(method, target)}: connection failed: {_reason(exc)}"
            ) from exc

    async def _token_request(
        self, url: str, form: dict[str, str], headers: dict[str, str], send_as: str
    ) -> tuple[int, bytes]:
        """POST to the OAuth2 token endpoint (form body or query); status and raw body."""
        CRM_REQUESTS.labels("token").inc()
        target = self.url(url)
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session().post(
                    target, headers=headers,
                    data=form if send_as == "form" else None,
                    params=form if send_as == "query" else None,
                    allow_redirects=False,
                ) as resp:
                    raw = await self._read(resp, "POST", target)
                    status = resp.status
                    location = resp.headers.get("Location")
        except TimeoutError as exc:
            CRM_TOKEN_REFRESHES.labels("failed").inc()
            CRM_ERRORS.labels("token", CrmTimeout.kind).inc()
            raise CrmTimeout(f"POST {_path(target)}: no answer within {self._timeout:g} s") \
                from exc
        except (aiohttp.ClientError, OSError) as exc:
            CRM_TOKEN_REFRESHES.labels("failed").inc()
            CRM_ERRORS.labels("token", CrmUnavailable.kind).inc()
            raise CrmUnavailable(f"POST {_path(target)}: {_reason(exc)}") from exc
        CRM_TOKEN_REFRESHES.labels("ok" if 200 <= status < 300 else "failed").inc()
        if 300 <= status < 400:
            CRM_ERRORS.labels("token", CrmRedirected.kind).inc()
            raise _redirected("POST", target, status, location, "crm.auth.oauth2.token_url")
        return status, raw

    async def _read(self, resp: aiohttp.ClientResponse, method: str, target: str) -> bytes:
        limit = self.settings.max_response_bytes
        length = resp.content_length
        if length is not None:
            if length > limit:
                raise CrmBadResponse(
                    f"{_where(method, target)}: body of {length} bytes over {limit}"
                )
            return await resp.read()  # bounded by the announced length
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise CrmBadResponse(f"{_where(method, target)}: body over {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _classify(
        self, op: str, method: str, target: str, raw: _Raw, accept: Collection[int]
    ) -> CrmResponse:
        status = raw.status
        limited = status == 429 or (
            400 <= status < 500 and status not in accept
            and limit_error(raw.body, self.settings.limits.limit_error_codes)
        )
        wait = self.gate.observe(op, read_limits(raw.headers), limited=limited)
        if 200 <= status < 300:
            body = _parse_json(method, target, raw.body) \
                if status != 204 and raw.body.strip() else None
            return CrmResponse(status=status, body=body, headers=raw.headers)
        if status in accept:  # e.g. 404 "no such caller": the body may be an HTML error page
            try:
                body = _parse_json(method, target, raw.body) if raw.body.strip() else None
            except CrmBadResponse:
                body = None
            return CrmResponse(status=status, body=body, headers=raw.headers)
        where = _where(method, target)
        if 300 <= status < 400 and "Location" in raw.headers:
            raise _redirected(method, target, status, raw.headers.get("Location"),
                              "crm.base_url (or the step's url)")
        detail = summarize_body(raw.body, self.secrets) if status >= 400 else ""
        if limited:
            raise CrmRateLimited(f"{where}: HTTP {status} rate limited", status=status,
                                 retry_after=wait, detail=detail)
        if 400 <= status < 500:
            raise CrmClientError(f"{where}: HTTP {status}", status=status, detail=detail)
        if status >= 500:
            raise CrmServerError(f"{where}: HTTP {status}", status=status, detail=detail)
        raise CrmBadResponse(f"{where}: unexpected HTTP status {status}")


def _preview(raw: bytes) -> Any:
    """An answer's body for the trace: its JSON, else its text (at most 4 kB)."""
    try:
        return json.loads(raw) if raw.strip() else None
    except (ValueError, RecursionError):  # not JSON, or an integer of over 4300 digits
        return raw[:4096].decode("utf-8", "replace")


def _reason(exc: BaseException) -> str:
    """What failed, for a message: aiohttp's errors about an answer (too many redirects)
    without the URL they carry, whose query may hold keys and phone numbers."""
    if isinstance(exc, aiohttp.ClientResponseError):
        status = f" HTTP {exc.status}" if exc.status else ""
        return f"{type(exc).__name__}{status}" + (f": {exc.message}" if exc.message else "")
    return f"{type(exc).__name__}: {exc}"


def _redirected(method: str, target: str, status: int, location: str | None,
                setting: str) -> CrmRedirected:
    """The error of a redirect that was not followed: where it pointed (resolved
    against the request's URL, without query or credentials) and what to fix."""
    try:
        resolved = str(URL(target).join(URL(location or "")))
    except (ValueError, TypeError):
        resolved = ""
    where = _path(resolved) if resolved else "<bad url>"
    same_host = bool(resolved) and URL(resolved).origin() == URL(target).origin()
    hint = ("the CRM moved this path" if same_host else "the CRM answers at another address")
    return CrmRedirected(
        f"{_where(method, target)}: HTTP {status} redirect to {where} not followed "
        f"(the credentials would go along): {hint}; set {setting} to the address the "
        "CRM answers at", status=status, location=where)


def _where(method: str, url: str) -> str:
    """``METHOD /path`` of a request, for error messages (built only when one is raised)."""
    return f"{method} {_path(url)}"


def _path(url: str) -> str:
    """The URL without query string or credentials, for logs."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "<bad url>"
    return str(parsed.with_query(None).with_user(None).with_fragment(None))


def _parse_json(method: str, target: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:  # not JSON (or not UTF-8), or an integer of over 4300 digits
        raise CrmBadResponse(
            f"{_where(method, target)}: body is not valid JSON: {exc}"
        ) from exc
    except RecursionError:
        raise CrmBadResponse(f"{_where(method, target)}: body is nested too deeply") from None
