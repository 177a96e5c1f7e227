"""What a CRM said, kept safe: error bodies compacted, truncated, secrets and personal data
masked; and a duplicate without an id is not reported as a mapping mismatch."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from router.crm.config import CrmSettings
from router.crm.redact import mask_text, summarize_body
from router.crm.rest import RestConnector
from tests.crm_server import scripted_server


def test_vendor_error_bodies_keep_their_field_errors() -> None:
    """HubSpot's, Salesforce's and Zoho's error bodies keep the fields and codes that say
    why, compacted to one line."""
    hubspot = (b'{"status": "error", "message": "Property values were not valid",\n'
               b'  "errors": [{"message": "hs_call_duration must be a number",\n'
               b'   "code": "INVALID_INTEGER",'
               b' "context": {"propertyName": ["hs_call_duration"]}}],'
               b' "category": "VALIDATION_ERROR"}')
    assert summarize_body(hubspot) == (
        '{"status":"error","message":"Property values were not valid","errors":[{"message":'
        '"hs_call_duration must be a number","code":"INVALID_INTEGER","context":'
        '{"propertyName":["hs_call_duration"]}}],"category":"VALIDATION_ERROR"}')
    salesforce = b'[{"message":"Required fields are missing: [Subject]",' \
                 b'"errorCode":"REQUIRED_FIELD_MISSING","fields":["Subject"]}]'
    assert "REQUIRED_FIELD_MISSING" in summarize_body(salesforce)
    zoho = b'{"data":[{"code":"MANDATORY_NOT_FOUND","details":{"api_name":"Subject"},' \
           b'"message":"required field not found","status":"error"}]}'
    assert '"api_name":"Subject"' in summarize_body(zoho)


def test_secrets_and_personal_data_are_masked_ids_kept() -> None:
    """Configured secrets, bearer values, secret-named keys, contact-data keys, e-mail
    addresses and phone numbers in free text are masked; record ids stay."""
    body = ('{"message": "duplicate: +1 (415) 555-0199 and 020 7183 8751 and 13800138000 '
            'of ada@example.com, sent with Bearer eyJhbGciOi.abc and key k-SECRET-1",'
            ' "id": "51234567890", "contactId": "003000000000001", "phone": "+14155550199",'
            ' "email": "ada@example.com", "access_token": "tok", "firstname": "Ada"}')
    out = summarize_body(body, ["k-SECRET-1"])
    for leaked in ("555-0199", "7183 8751", "13800138000", "ada@", "eyJhbGciOi",
                   "k-SECRET-1", '"tok"', "Ada"):
        assert leaked not in out, leaked
    assert "***99" in out
    assert "***@example.com" in out
    assert '"id":"51234567890"' in out
    assert '"contactId":"003000000000001"' in out
    assert '"phone":"***"' in out
    assert mask_text("call 51 and ticket 4711") == "call 51 and ticket 4711"


def test_html_pages_and_long_bodies_are_cut_to_their_words() -> None:
    """An HTML error page keeps its text without tags; anything is cut at the limit."""
    page = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502</h1></body></html>"
    assert summarize_body(page) == "502 Bad Gateway 502"
    long = summarize_body("x" * 1000, limit=50)
    assert len(long) == 50
    assert long.endswith("…")
    assert summarize_body(b"") == ""
    assert summarize_body(b"  \n") == ""


@pytest.mark.parametrize(("status", "logged"), [(200, False), (201, True)])
async def test_no_id_is_a_mismatch_only_when_something_was_created(
    caplog: pytest.LogCaptureFixture, status: int, logged: bool
) -> None:
    """An answer treated as a duplicate (duplicate_status) without an id logs nothing;
    a 201 without the id at id_path logs "created, but no id"."""
    caplog.set_level(logging.WARNING)

    def reply(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return status, {"result": "ok"}, {}

    async with scripted_server(reply) as server:
        connector = RestConnector(CrmSettings.model_validate({
            "base_url": server.url,
            "activity": {"url": "/api/activities", "duplicate_status": [200],
                         "id_path": "id"}}))
        try:
            result = await connector.post_call({"record_key": "k1"}, "k1")
        finally:
            await connector.aclose()
    assert result.remote_id is None
    assert result.duplicate is (status == 200)
    assert ("created, but no id" in caplog.text) is logged
