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
429 (``Retry-After`` seconds or HTTP-date parsed)      :class:`CrmRateLimited`
other 4xx                                              :class:`CrmClientError`
5xx                                                    :class:`CrmServerError`
body is not JSON, or too large                         :class:`CrmBadResponse`
====================================================  =========================

Statuses the caller expects (404 for "unknown caller") are returned, not raised.
Every request counts in ``CRM_REQUESTS{op}``, every failure in ``CRM_ERRORS{op,kind}``.
Log lines show the method and the URL path only (no query string, which may carry phone
numbers or keys) and never a header value that holds a secret.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import ssl
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from yarl import URL

from router.crm.config import CrmSettings
from router.errors import (
    ConfigError,
    CrmBadResponse,
    CrmClientError,
    CrmError,
    CrmRateLimited,
    CrmServerError,
    CrmTimeout,
    CrmUnavailable,
)
from router.metrics import CRM_ERRORS, CRM_REQUESTS

log = logging.getLogger(__name__)

#: Header names whose values are never shown.
SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})
MASK = "***"


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


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date).

    None when absent or unreadable; never negative.
    """
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN check
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


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


class CrmHttp:
    """A small JSON-over-HTTP client for one CRM (one connection pool)."""

    def __init__(self, settings: CrmSettings) -> None:
        self.settings = settings
        self.ssl = make_ssl(settings)
        self._timeout = settings.timeout_s
        self._client: aiohttp.ClientSession | None = None
        self._headers, self._auth_params = _auth(settings)
        self._secret_headers = (
            {settings.auth.header} if settings.auth.type == "api_key" else set()
        )
        #: When a list, every request and its answer is appended (``callroute crm doctor``).
        self.trace: list[Exchange] | None = None

    def __repr__(self) -> str:
        return f"CrmHttp({self.settings.name!r}, {self.settings.base_url!r})"

    @property
    def default_headers(self) -> dict[str, str]:
        """The headers sent on every request, masked for display."""
        return mask_headers(self._headers, self._secret_headers)

    def url(self, url: str) -> str:
        """An absolute URL: ``url`` itself, or ``base_url`` + ``url`` for a path."""
        if url.startswith(("http://", "https://")):
            return url
        return self.settings.base_url + (url if url.startswith("/") else "/" + url)

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
        statuses in ``accept_status`` are returned like a 2xx instead of raised.
        """
        CRM_REQUESTS.labels(op).inc()
        started = time.monotonic()
        target = self.url(url)
        exchange = None
        if self.trace is not None:
            exchange = Exchange(
                op, method, target, {**(params or {}), **self._auth_params},
                {**self._headers, **(headers or {})}, json_body)
            self.trace.append(exchange)
        try:
            status, resp_headers, raw = await self._send(
                method, target, params=params, json_body=json_body, headers=headers, data=data,
            )
            if exchange is not None:
                exchange.status = status
                exchange.response_headers = dict(resp_headers)
                exchange.response = _preview(raw)
            response = _classify(method, target, status, resp_headers, raw, accept_status)
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

    async def _send(
        self,
        method: str,
        target: str,
        *,
        params: Mapping[str, str] | None,
        json_body: Any,
        headers: Mapping[str, str] | None,
        data: aiohttp.FormData | None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        query = {**params, **self._auth_params} if params else self._auth_params or None
        try:
            async with asyncio.timeout(self._timeout):
                async with self._session().request(
                    method, target, params=query, json=json_body, headers=headers, data=data,
                ) as resp:
                    raw = await self._read(resp, method, target)
                    status, resp_headers = resp.status, resp.headers
        except TimeoutError as exc:
            raise CrmTimeout(
                f"{_where(method, target)}: no answer within {self._timeout:g} s"
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise CrmUnavailable(f"{_where(method, target)}: cannot connect: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise CrmUnavailable(
                f"{_where(method, target)}: connection failed: {type(exc).__name__}: {exc}"
            ) from exc
        return status, resp_headers, raw

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


def _auth(settings: CrmSettings) -> tuple[dict[str, str], dict[str, str]]:
    """Default headers and extra query parameters carrying the configured credentials."""
    headers = dict(settings.headers)
    params: dict[str, str] = {}
    auth = settings.auth
    if auth.type == "bearer":
        headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    elif auth.type == "basic":
        pair = f"{auth.username}:{auth.password.get_secret_value()}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    elif auth.type == "api_key":
        if auth.location == "query":
            params[auth.header] = auth.key.get_secret_value()
        else:
            headers[auth.header] = auth.key.get_secret_value()
    headers.setdefault("Accept", "application/json")
    return headers, params


def _preview(raw: bytes) -> Any:
    """An answer's body for the trace: its JSON, else its text (at most 4 kB)."""
    try:
        return json.loads(raw) if raw.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw[:4096].decode("utf-8", "replace")


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


def _classify(
    method: str, target: str, status: int, headers: Mapping[str, str], raw: bytes,
    accept: Collection[int],
) -> CrmResponse:
    if 200 <= status < 300:
        body = _parse_json(method, target, raw) if status != 204 and raw.strip() else None
        return CrmResponse(status=status, body=body, headers=headers)
    if status in accept:  # e.g. 404 "no such caller": the body may be an HTML error page
        try:
            body = _parse_json(method, target, raw) if raw.strip() else None
        except CrmBadResponse:
            body = None
        return CrmResponse(status=status, body=body, headers=headers)
    where = _where(method, target)
    if status == 429:
        retry = parse_retry_after(headers.get("Retry-After"))
        raise CrmRateLimited(f"{where}: HTTP 429 rate limited", retry_after=retry)
    if 400 <= status < 500:
        raise CrmClientError(f"{where}: HTTP {status}", status=status)
    if status >= 500:
        raise CrmServerError(f"{where}: HTTP {status}", status=status)
    raise CrmBadResponse(f"{where}: unexpected HTTP status {status}")


def _parse_json(method: str, target: str, raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CrmBadResponse(
            f"{_where(method, target)}: body is not valid JSON: {exc}"
        ) from exc
