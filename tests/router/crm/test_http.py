"""The CRM HTTP layer: auth headers, TLS, timeouts and the classification of failures."""

from __future__ import annotations

import logging
import ssl
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest

from router.crm.config import CrmSettings
from router.crm.http import CrmHttp, mask_headers, parse_retry_after
from router.errors import (
    CrmBadResponse,
    CrmClientError,
    CrmRateLimited,
    CrmRedirected,
    CrmServerError,
    CrmTimeout,
    CrmUnavailable,
)
from router.metrics import REGISTRY
from tests.crm_server import closed_port, running_crm, scripted_server, write_test_cert


def _value(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _ok(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
    return 200, {"results": []}, {}


async def _get(settings: CrmSettings, op: str = "test") -> Any:
    http = CrmHttp(settings)
    try:
        return await http.request(op, "GET", "/api/customers", params={"phone": "+861"})
    finally:
        await http.aclose()


@pytest.mark.parametrize(
    ("auth", "header", "expected"),
    [
        ({"type": "bearer", "token": "s3cret"}, "Authorization", "Bearer s3cret"),
        ({"type": "api_key", "header": "X-Api-Key", "key": "k-123"}, "X-Api-Key", "k-123"),
        ({"type": "basic", "username": "crm", "password": "pw"}, "Authorization",
         "Basic Y3JtOnB3"),
        ({"type": "api_key", "header": "Authorization", "key": "Zoho-oauthtoken 1000.abc"},
         "Authorization", "Zoho-oauthtoken 1000.abc"),
    ],
)
async def test_auth_header_received(auth: dict[str, str], header: str, expected: str) -> None:
    """Each auth type puts the configured credentials in the header the server receives."""
    async with scripted_server(_ok) as server:
        await _get(CrmSettings.model_validate({"base_url": server.url, "auth": auth}))
    assert server.seen[0]["headers"][header] == expected


async def test_api_key_in_query_and_no_auth() -> None:
    """``location: query`` sends the key as a query parameter; ``none`` sends no credentials."""
    async with scripted_server(_ok) as server:
        await _get(CrmSettings.model_validate({
            "base_url": server.url,
            "auth": {"type": "api_key", "header": "hapikey", "key": "q-1", "location": "query"},
        }))
        await _get(CrmSettings(base_url=server.url))
    assert server.seen[0]["query"] == {"phone": "+861", "hapikey": "q-1"}
    assert "Authorization" not in server.seen[1]["headers"]
    assert server.seen[1]["query"] == {"phone": "+861"}


async def test_default_headers_sent_and_secrets_masked(caplog: pytest.LogCaptureFixture) -> None:
    """Configured headers are sent; logs and the masked view never show the token."""
    caplog.set_level(logging.DEBUG, logger="router.crm")

    def fail(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 500, {"error": "x"}, {}

    async with scripted_server(fail) as server:
        settings = CrmSettings.model_validate({
            "base_url": server.url, "headers": {"X-Tenant": "acme"},
            "auth": {"type": "bearer", "token": "tok-SECRET-42"},
        })
        http = CrmHttp(settings)
        with pytest.raises(CrmServerError):
            await http.request("lookup", "GET", "/x", params={"phone": "+8613800138000"})
        await http.aclose()
    assert server.seen[0]["headers"]["X-Tenant"] == "acme"
    assert http.default_headers["Authorization"] == "***"
    assert "tok-SECRET-42" not in caplog.text
    assert "+8613800138000" not in caplog.text  # the query string is not logged
    assert "/x" in caplog.text
    assert mask_headers({"X-Api-Key": "k", "x-custom": "v"}, ["X-Custom"]) == {
        "X-Api-Key": "***", "x-custom": "***"}


async def test_a_redirect_is_not_followed_and_names_where_without_the_query(
        caplog: pytest.LogCaptureFixture) -> None:
    """A 302 is not followed: the key (sent in the query here) and the caller's number
    stay out of the error and the log line, which name where it pointed (its path, no
    query) and crm.base_url as what to fix; it is not retried."""
    caplog.set_level(logging.DEBUG, logger="router.crm")

    def loop(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 302, "", {"Location": "/again?x=1&key=k-SECRET-7"}

    async with scripted_server(loop) as server:
        http = CrmHttp(CrmSettings.model_validate({"base_url": server.url, "auth": {
            "type": "api_key", "header": "api_key", "key": "k-SECRET-7", "location": "query"}}))
        try:
            with pytest.raises(CrmRedirected) as failed:
                await http.request("lookup", "GET", "/x", params={"phone": "+8613800138000"})
        finally:
            await http.aclose()
    assert len(server.seen) == 1
    assert failed.value.location == f"{server.url}/again"
    assert f"redirect to {server.url}/again not followed" in str(failed.value)
    assert "crm.base_url" in str(failed.value)
    assert failed.value.retryable is False
    assert failed.value.may_have_acted is False
    for text in (str(failed.value), caplog.text):
        assert "k-SECRET-7" not in text
        assert "8613800138000" not in text


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_to_another_host_never_carries_the_credentials_there(
        status: int) -> None:
    """A create answered by a redirect to another host: that host gets no request (the
    API key header would go along, and a 301/302/303 would replay the POST as a GET
    without its body); the error names the other host and says the CRM answers at
    another address."""
    def elsewhere(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 200, {"id": "stolen"}, {}

    async with scripted_server(elsewhere) as thief:
        def moved(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
            return status, "", {"Location": f"{thief.url}/collect?token=t-1"}

        async with scripted_server(moved) as server:
            http = CrmHttp(CrmSettings.model_validate({"base_url": server.url, "auth": {
                "type": "api_key", "header": "X-Api-Key", "key": "k-SECRET-9"}}))
            try:
                with pytest.raises(CrmRedirected) as failed:
                    await http.request("call", "POST", "/calls", json_body={"n": 1})
            finally:
                await http.aclose()
    assert thief.seen == []
    assert [(r["method"], r["body"]) for r in server.seen] == [("POST", {"n": 1})]
    assert failed.value.status == status
    assert failed.value.location == f"{thief.url}/collect"
    assert "another address" in str(failed.value)
    assert "t-1" not in str(failed.value)


def test_tls_verification_on_by_default() -> None:
    """Without configuration the client verifies certificates and host names."""
    context = CrmHttp(CrmSettings(base_url="https://crm.example.com")).ssl
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname is True
    assert CrmHttp(CrmSettings(verify_tls=False)).ssl is False


async def test_self_signed_certificate_rejected_then_trusted(tmp_path: Path) -> None:
    """A self-signed HTTPS CRM fails with CrmUnavailable unless its CA is configured."""
    cert = write_test_cert(tmp_path)
    async with scripted_server(_ok, tls=tmp_path) as server:
        with pytest.raises(CrmUnavailable, match="cannot connect"):
            await _get(CrmSettings(base_url=server.url))
        trusted = await _get(CrmSettings(base_url=server.url, ca_file=cert))
        unverified = await _get(CrmSettings(base_url=server.url, verify_tls=False))
    assert trusted.status == unverified.status == 200
    assert trusted.body == {"results": []}


async def test_https_to_plain_http_server_fails_fast() -> None:
    """Speaking TLS to a plain-HTTP port is a clean CrmUnavailable, not a hang."""
    async with running_crm() as crm:
        settings = CrmSettings(base_url=crm.url.replace("http://", "https://"), timeout_s=2.0)
        started = time.monotonic()
        with pytest.raises(CrmUnavailable):
            await _get(settings)
    assert time.monotonic() - started < 1.5


async def test_timeout_within_deadline() -> None:
    """A slow CRM raises CrmTimeout within timeout_s plus a small margin."""
    async with running_crm() as crm:
        crm.faults.add("delay", delay_s=2.0)
        started = time.monotonic()
        with pytest.raises(CrmTimeout):
            await _get(CrmSettings(base_url=crm.url, timeout_s=0.2))
        elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 0.45


async def test_stalled_crm_times_out() -> None:
    """A CRM that never answers is cut off by the timeout."""
    async with running_crm() as crm:
        crm.faults.add("stall")
        started = time.monotonic()
        with pytest.raises(CrmTimeout):
            await _get(CrmSettings(base_url=crm.url, timeout_s=0.2))
        elapsed = time.monotonic() - started  # measured before the server shuts down
    assert 0.2 <= elapsed < 0.45


async def test_refused_is_unavailable() -> None:
    """A closed port raises CrmUnavailable."""
    with pytest.raises(CrmUnavailable) as info:
        await _get(CrmSettings(base_url=f"http://127.0.0.1:{closed_port()}"))
    assert info.value.__cause__ is not None


async def test_dropped_connection_is_unavailable() -> None:
    """A connection closed without an answer raises CrmUnavailable."""
    async with running_crm() as crm:
        crm.faults.add("drop")
        with pytest.raises(CrmUnavailable):
            await _get(CrmSettings(base_url=crm.url))


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, CrmServerError), (503, CrmServerError), (400, CrmClientError),
     (401, CrmClientError), (404, CrmClientError)],
)
async def test_status_classified(status: int, error: type[Exception]) -> None:
    """5xx → CrmServerError, 4xx → CrmClientError with the status (404 unless accepted)."""
    async with running_crm() as crm:
        crm.faults.add("status", status=status)
        with pytest.raises(error) as info:
            await _get(CrmSettings(base_url=crm.url))
    assert info.value.status == status  # type: ignore[attr-defined]


async def test_accepted_status_is_returned() -> None:
    """A status the caller expects (404 for unknown) is returned even with an HTML body."""
    def not_found(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 404, "<html>not found</html>", {}

    async with scripted_server(not_found) as server:
        http = CrmHttp(CrmSettings(base_url=server.url))
        resp = await http.request("lookup", "GET", "/c/1", accept_status=[404])
        await http.aclose()
    assert (resp.status, resp.body) == (404, None)


async def test_rate_limited_with_seconds_and_date() -> None:
    """429 carries retry_after from Retry-After as delta-seconds or as an HTTP-date, and
    the configured default pause (crm.limits.default_retry_s) when it names none."""
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    async with running_crm() as crm:
        crm.faults.add("status", status=429, retry_after="7", count=1)
        with pytest.raises(CrmRateLimited) as seconds:
            await _get(CrmSettings(base_url=crm.url))
        crm.faults.add("status", status=429, retry_after=when, count=1)
        with pytest.raises(CrmRateLimited) as date:
            await _get(CrmSettings(base_url=crm.url))
        crm.faults.add("status", status=429, count=1)
        with pytest.raises(CrmRateLimited) as absent:
            await _get(CrmSettings(base_url=crm.url))
    assert seconds.value.retry_after == 7.0
    assert date.value.retry_after is not None
    assert 27 <= date.value.retry_after <= 30
    assert absent.value.retry_after == 1.0


def test_parse_retry_after_edge_cases() -> None:
    """Past dates give 0, garbage gives None."""
    now = datetime(2025, 1, 1, tzinfo=UTC)
    assert parse_retry_after("Wed, 01 Jan 2020 00:00:00 GMT", now) == 0.0
    assert parse_retry_after("Wed, 01 Jan 2025 00:01:00 GMT", now) == 60.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after("-5", now) == 0.0


async def test_bad_json_and_oversized_body() -> None:
    """A broken JSON body or one over max_response_bytes raises CrmBadResponse."""
    async with running_crm() as crm:
        crm.faults.add("bad_json")
        with pytest.raises(CrmBadResponse, match="not valid JSON"):
            await _get(CrmSettings(base_url=crm.url))

    def huge(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 200, {"results": ["x" * 5000]}, {}

    async with scripted_server(huge) as server:
        with pytest.raises(CrmBadResponse, match="over 1024"):
            await _get(CrmSettings(base_url=server.url, max_response_bytes=1024))


@pytest.mark.parametrize(("body", "said"), [
    ("[" * 50_000 + "]" * 50_000, "nested too deeply"),
    ('{"id": ' + "9" * 5000 + "}", "not valid JSON"),
], ids=["nested", "huge-integer"])
async def test_an_unparseable_answer_is_a_bad_response_not_a_crash(body: str, said: str) -> None:
    """An answer nested deeper than Python's recursion limit, or holding an integer of more
    digits than Python converts (4300): a 2xx is CrmBadResponse, a 4xx still
    CrmClientError with what it said, never the RecursionError or ValueError json.loads
    raises (which the lookup would count as a connector bug, and delivery retry as an
    internal error)."""

    def answer(info: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return (200 if info["path"] == "/ok" else 400), body, {}

    async with scripted_server(answer) as server:
        http = CrmHttp(CrmSettings(base_url=server.url))
        http.trace = []
        try:
            with pytest.raises(CrmBadResponse, match=said):
                await http.request("test", "GET", "/ok")
            with pytest.raises(CrmClientError) as refused:
                await http.request("test", "GET", "/refused")
        finally:
            await http.aclose()
    assert refused.value.status == 400
    assert refused.value.detail.startswith(body[:3])
    assert [ex.status for ex in http.trace] == [200, 400]


async def test_metrics_counted() -> None:
    """Each request counts in CRM_REQUESTS{op}; each failure in CRM_ERRORS{op,kind}."""
    op = "metrics-test"
    requests = _value("callroute_crm_requests_total", {"op": op})
    errors = _value("callroute_crm_errors_total", {"op": op, "kind": "5xx"})
    async with running_crm() as crm:
        await _get(CrmSettings(base_url=crm.url), op)
        crm.faults.add("status", status=502, count=1)
        with pytest.raises(CrmServerError):
            await _get(CrmSettings(base_url=crm.url), op)
    assert _value("callroute_crm_requests_total", {"op": op}) == requests + 2
    assert _value("callroute_crm_errors_total", {"op": op, "kind": "5xx"}) == errors + 1


async def test_session_reopens_after_close() -> None:
    """After aclose() a new request opens a fresh session."""
    async with running_crm() as crm:
        http = CrmHttp(CrmSettings(base_url=crm.url))
        await http.request("t", "GET", "/_health")
        await http.aclose()
        resp = await http.request("t", "GET", "/_health")
        await http.aclose()
    assert resp.body["ok"] is True
