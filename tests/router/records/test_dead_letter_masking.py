"""The last error kept with a record (its dead letter, its retry) holds the caller's
number and name only masked, even when the CRM's error body echoes them back; read raw
from Redis, and as ``outbox list`` shows it."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from router.crm.base import PostResult
from router.crm.rest import RestConnector
from router.errors import CrmClientError, CrmServerError
from router.keys import Keys
from router.records.delivery import DeliveryWorker
from router.records.outbox import Outbox, ensure_group
from router.records.outbox_cli import list_entries
from router.records.spool import Spool
from tests.crm_server import scripted_server
from tests.router.records.noidem_crm import hubspot_settings
from tests.router.records.outbox_crm import call_record, outbox_settings

KEYS = Keys(prefix="t:")
NUMBER, NAME = "+8613800138000", "Li Lei"


def clear_of_personal_data(text: str) -> bool:
    """No spelling of the caller's number, nor the name, in ``text``."""
    digits = "".join(c for c in text if c.isdigit() or c in "*")
    return "13800138000" not in digits and "li lei" not in text.lower()


async def dead_errors(redis: Redis) -> list[str]:
    """The error field of every dead letter, read raw from the stream."""
    return [fields["error"] for _id, fields in await redis.xrange(KEYS.outbox_dead)]


@pytest.fixture(name="redis")
async def redis_fixture(redis_url: str) -> Any:
    """A client of the test Redis (text answers)."""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def make_outbox(redis: Redis, tmp_path: Path) -> Outbox:
    return Outbox(redis, KEYS, outbox_settings(create_leads=False),
                  Spool(tmp_path / "spool", max_records=10, max_bytes=1 << 20))


@pytest.mark.parametrize("body", [
    {"errors": {"phone": f"{NUMBER} already exists for {NAME}"}},
    {"errors": [{"message": f"{NUMBER} already exists for {NAME}"}]},
    {"message": f"Contact 13800138000 ({NAME.upper()}) already exists"},
    f"phone 138 0013 8000 is taken by {NAME}",
], ids=["phone-field", "message", "national-number", "plain-text"])
async def test_a_4xx_echoing_the_caller_is_dead_lettered_masked(
    redis: Redis, tmp_path: Path, body: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A CRM (REST connector) refusing the call activity with a 422 whose body repeats
    the caller's number and name (in a field, in a message, as a national number, in
    plain text): the dead letter's error, read raw from outbox:dead, outbox list and
    the log lines (the connector's own among them) still say what the CRM answered, with
    neither the number nor the name in clear."""
    caplog.set_level(logging.DEBUG)
    outbox = make_outbox(redis, tmp_path)
    await outbox.enqueue(call_record(1, caller=NUMBER, caller_name=NAME))
    async with scripted_server(lambda _info: (422, body, {})) as crm:
        sink = RestConnector(hubspot_settings(crm.url))
        worker = DeliveryWorker(redis, sink, keys=KEYS, settings=outbox.settings,
                                consumer="w1")
        try:
            await ensure_group(redis, KEYS, outbox.settings.group)
            (entry,) = await worker.read(1, None)
            assert await worker.deliver(entry) == "dead"
        finally:
            await sink.aclose()
    (error,) = await dead_errors(redis)
    assert error.startswith("4xx: ")
    assert "422" in error
    assert clear_of_personal_data(error), error
    if isinstance(body, str) or "message" in json.dumps(body):
        assert "L.L." in error
    listed = json.dumps(await list_entries(redis, KEYS, outbox.settings.group))
    assert clear_of_personal_data(listed), listed
    assert "HTTP 422" in caplog.text
    assert clear_of_personal_data(caplog.text), caplog.text


class EchoingSink:
    """A RecordSink whose errors quote what it sent, unmasked: first a 503, then a 409."""

    def __init__(self) -> None:
        self.errors: list[Exception] = [
            CrmServerError(f"HTTP 503: busy with {NUMBER} ({NAME})", status=503),
            CrmClientError(f"HTTP 409: caller +86 138 0013 8000 is {NAME.lower()}",
                           status=409),
        ]

    async def post_call(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        raise self.errors.pop(0)

    async def create_lead(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        raise AssertionError("no lead wanted")

    async def create_task(self, record: Mapping[str, Any], idempotency_key: str) -> PostResult:
        raise AssertionError("no task wanted")


async def test_a_connector_quoting_the_record_leaves_it_masked_in_retry_and_dead_letter(
    redis: Redis, tmp_path: Path
) -> None:
    """Errors that quote the caller unmasked (a connector of one's own, not the REST
    connector's masked bodies) are kept masked: the retry set's member after the 503,
    the dead letter after the 409, both read raw from Redis."""
    outbox = make_outbox(redis, tmp_path)
    await outbox.enqueue(call_record(1, caller=NUMBER, caller_name=NAME))
    worker = DeliveryWorker(redis, EchoingSink(), keys=KEYS,  # type: ignore[arg-type]
                            settings=outbox.settings, consumer="w1")
    await ensure_group(redis, KEYS, outbox.settings.group)
    (entry,) = await worker.read(1, None)
    assert await worker.deliver(entry) == "retry"
    (member,) = await redis.zrange(KEYS.outbox_retry, 0, -1)
    error = json.loads(member)["error"]
    assert error == "5xx: HTTP 503: busy with +86138****8000 (L.L.)"
    await redis.zadd(KEYS.outbox_retry, {member: 0})  # due now
    assert await worker.promote_due() == 1
    (entry,) = await worker.read(1, None)
    assert await worker.deliver(entry) == "dead"
    (error,) = await dead_errors(redis)
    assert error == "4xx: HTTP 409: caller +86 138 **** 8000 is l.l."


async def test_outbox_list_masks_numbers_of_dead_letters_stored_before(
    redis: Redis
) -> None:
    """A dead letter stored in clear before errors were masked shows its numbers masked
    in outbox list."""
    await redis.xadd(KEYS.outbox_dead, {"key": "call-1", "record": "{}", "attempt": "1",
                                        "enq": "1", "reason": "rejected",
                                        "error": f"4xx: {NUMBER} exists"})
    (row,) = await list_entries(redis, KEYS, "delivery")
    assert row["last_error"] == "4xx: +86138****8000 exists"
