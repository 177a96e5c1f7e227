"""The generic REST connector against the sample CRM and scripted CRMs on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from router.crm.config import CrmSettings, sample_crm_section
from router.crm.rest import RestConnector
from router.errors import CrmMappingError, CrmServerError, CrmTimeout
from router.metrics import REGISTRY
from router.models import CallerNumber, NumberKind
from router.phone import normalize
from tests.crm_server import connector, running_crm, scripted_server

TOKEN = "demo-token"


def number(raw: str) -> CallerNumber:
    """A caller number normalised for region CN."""
    return normalize(raw, "CN")


def sample(url: str, **changes: Any) -> CrmSettings:
    """The sample CRM's settings with top-level or ``lookup`` changes."""
    data = sample_crm_section(url)
    lookup = changes.pop("lookup", None)
    if lookup:
        data["lookup"] = {**data["lookup"], **lookup}
    return CrmSettings.model_validate({**data, **changes})


def reply_with(status: int, body: Any) -> Any:
    """A scripted reply: always ``status`` with ``body``."""
    def reply(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return status, body, {}

    return reply


async def test_lookup_found_maps_every_field() -> None:
    """A known caller is mapped into a Customer with every configured field."""
    async with running_crm(token=TOKEN) as crm, connector(sample(crm.url)) as conn:
        customer = await conn.find_by_number(number("138 0013 8000"))
    assert customer is not None
    assert (customer.id, customer.name, customer.tier, customer.owner) == (
        "C-1001", "Li Lei", "gold", "7001")
    assert customer.value == 52_000.0
    assert customer.tags == ("repeat-buyer",)
    assert (customer.open_tickets, customer.language) == (1, "zh")
    assert customer.updated_at is not None
    assert customer.updated_at.year == 2025
    assert crm.state.requests[-1].query == {"phone": "+8613800138000"}


async def test_lookup_unknown_caller_is_none() -> None:
    """A number the CRM does not know (empty results) gives None."""
    async with running_crm(token=TOKEN) as crm, connector(sample(crm.url)) as conn:
        assert await conn.find_by_number(number("02150501234")) is None
        assert crm.state.requests[-1].query == {"phone": "+862150501234"}


@pytest.mark.parametrize(
    ("status", "body"),
    [(404, {"error": "not found"}), (204, ""), (200, {"results": None}),
     (200, {"results": []})],
)
async def test_lookup_not_found_shapes(status: int, body: Any) -> None:
    """404, 204, a null or empty result are all "unknown caller" (None)."""
    async with (
        scripted_server(reply_with(status, body)) as server,
        connector(CrmSettings(base_url=server.url)) as conn,
    ):
        result = await conn.find_by_number(number("13800138000"))
    assert result is None


async def test_lookup_empty_object_is_a_mapping_error() -> None:
    """A single record without the id path is a CrmMappingError naming the path."""
    async with (
        scripted_server(reply_with(200, {"results": {}})) as server,
        connector(CrmSettings(base_url=server.url)) as conn,
    ):
        with pytest.raises(CrmMappingError, match=r"crm.lookups \(lookup\).fields.*id: path 'id'"):
            await conn.find_by_number(number("13800138000"))


async def test_anonymous_number_never_asked() -> None:
    """A number that is not lookup-able returns None without any request."""
    async with running_crm() as crm, connector(sample(crm.url)) as conn:
        assert await conn.find_by_number(normalize("anonymous")) is None
        assert await conn.find_by_number(CallerNumber(raw="7001", kind=NumberKind.INTERNAL)) \
            is None
    assert len(crm.state.requests) == 0


@pytest.mark.parametrize(
    ("url", "params", "expected_path", "expected_query"),
    [
        ("/contacts/{e164}", {}, "/contacts/+8613800138000", {}),
        ("/contacts/{national}", {}, "/contacts/13800138000", {}),
        ("/contacts/{digits}", {}, "/contacts/8613800138000", {}),
        ("/search", {"q": "phone:{e164}", "cc": "{country}"}, "/search",
         {"q": "phone:+8613800138000", "cc": "CN"}),
        ("/a/{e164}/b", {"d": "{digits}"}, "/a/+8613800138000/b", {"d": "8613800138000"}),
    ],
)
async def test_url_placeholders(
    url: str, params: dict[str, str], expected_path: str, expected_query: dict[str, str]
) -> None:
    """{e164}, {national}, {digits} and {country} fill URL and query, percent-encoded."""
    async with scripted_server(reply_with(200, {"results": []})) as server:
        settings = CrmSettings.model_validate(
            {"base_url": server.url, "lookup": {"url": url, "params": params}})
        async with connector(settings) as conn:
            await conn.find_by_number(number("+86 138 0013 8000"))
    seen = server.seen[0]
    assert seen["path"] == expected_path
    assert seen["query"] == expected_query
    if "{e164}" in url:
        assert "%2B8613800138000" in seen["raw_path"]


async def test_lookup_post_body_template_and_nested_mapping() -> None:
    """A HubSpot-style search: JSON body with the number, nested properties mapped."""
    answer = {"total": 1, "results": [{
        "id": "51", "updatedAt": "2025-03-01T10:00:00.000Z",
        "properties": {"firstname": "Li", "hs_lead_status": "IN_PROGRESS",
                       "hubspot_owner_id": 7001, "tier": "Gold Partner", "value": "12.5",
                       "tags": "vip;churn-risk", "open_tickets": "2"}}]}
    async with scripted_server(reply_with(200, answer)) as server:
        settings = CrmSettings.model_validate({
            "base_url": server.url,
            "lookup": {
                "method": "POST", "url": "/crm/v3/objects/contacts/search", "params": {},
                "body": {"filterGroups": [{"filters": [
                    {"propertyName": "phone", "operator": "EQ", "value": "{e164}"}]}],
                    "limit": 5},
                "results": "results",
                "fields": {"id": "id", "name": "properties.firstname",
                           "owner": "properties.hubspot_owner_id", "tier": "properties.tier",
                           "value": "properties.value", "tags": "properties.tags",
                           "open_tickets": "properties.open_tickets",
                           "updated_at": "updatedAt"},
                "tier_map": {"gold partner": "gold"},
            },
        })
        async with connector(settings) as conn:
            customer = await conn.find_by_number(number("13800138000"))
    assert server.seen[0]["body"]["filterGroups"][0]["filters"][0]["value"] == "+8613800138000"
    assert server.seen[0]["body"]["limit"] == 5
    assert customer is not None
    assert (customer.id, customer.name, customer.owner, customer.tier) == (
        "51", "Li", "7001", "gold")
    assert customer.value == 12.5
    assert customer.tags == ("vip", "churn-risk")
    assert customer.open_tickets == 2


@pytest.mark.parametrize(
    ("fields", "record", "message"),
    [
        ({"id": "data.0.id"}, {"name": "x"}, "id: path 'data.0.id' not found"),
        ({"id": "id"}, {"id": {"nested": 1}}, "id: path 'id' is a dict"),
        ({"id": "id", "value": "amount"}, {"id": 1, "amount": "lots"}, "value: path 'amount'"),
        ({"id": "id", "tags": "t"}, {"id": 1, "t": {"a": 1}}, "tags: path 't'"),
        ({"id": "id", "updated_at": "u"}, {"id": 1, "u": "yesterday"},
         "updated_at: path 'u' is not a date-time"),
        ({"id": "id", "name": "n"}, {"id": 1, "n": ["a"]}, "name: path 'n' is a list"),
        ({"id": "id", "name": "{record.first ~ ' ' ~ record.last | upper + 1}"},
         {"id": 1, "first": "Ada", "last": "Lovelace"},
         r"template crm\.lookups\[0\] \(lookup\)\.fields failed: TypeError"),
    ],
)
async def test_mapping_mismatch_names_the_path(
    fields: dict[str, str], record: dict[str, Any], message: str
) -> None:
    """A record that does not fit the mapping raises CrmMappingError naming field and path."""
    before = REGISTRY.get_sample_value(
        "callroute_crm_errors_total", {"op": "lookup", "kind": "mapping"}) or 0.0
    async with scripted_server(reply_with(200, {"results": [record]})) as server:
        settings = CrmSettings.model_validate(
            {"base_url": server.url, "lookup": {"fields": fields}})
        async with connector(settings) as conn:
            with pytest.raises(CrmMappingError, match=message):
                await conn.find_by_number(number("13800138000"))
    after = REGISTRY.get_sample_value(
        "callroute_crm_errors_total", {"op": "lookup", "kind": "mapping"})
    assert after == before + 1


async def test_results_path_missing_or_wrong_type() -> None:
    """A wrong-shaped answer names the lookup's results setting and the path."""
    async with running_crm() as crm, connector(sample(crm.url)) as conn:
        crm.faults.add("wrong_shape", count=1)
        with pytest.raises(CrmMappingError,
                           match=r"crm\.lookups \(lookup\)\.steps \(search\)\.results: "
                                 r"path .results."):
            await conn.find_by_number(number("13800138000"))
    async with (
        scripted_server(reply_with(200, {"results": "nope"})) as server,
        connector(CrmSettings(base_url=server.url)) as conn,
    ):
        with pytest.raises(CrmMappingError, match="is a str, not a list"):
            await conn.find_by_number(number("13800138000"))


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("highest_tier", "C-1006"), ("most_recent", "C-1008"), ("highest_value", "C-1007"),
     ("first", "C-1005")],
)
async def test_multiple_records_resolved_by_rule(rule: str, expected: str) -> None:
    """Four records share a number: each rule picks its one customer."""
    async with running_crm() as crm:
        settings = sample(crm.url, lookup={"multiple": rule})
        async with connector(settings) as conn:
            assert len(await conn.find_all(number("13500135000"))) == 4
            chosen = await conn.find_by_number(number("13500135000"))
    assert chosen is not None
    assert chosen.id == expected


async def test_highest_tier_uses_configured_order() -> None:
    """A custom tier order (bronze first) changes the highest_tier choice."""
    async with running_crm() as crm:
        settings = sample(crm.url, lookup={"multiple": {
            "rule": "highest_tier", "tier_order": ["bronze", "silver"]}})
        async with connector(settings) as conn:
            chosen = await conn.find_by_number(number("13500135000"))
    assert chosen is not None
    assert chosen.id == "C-1008"


async def test_slow_case_times_out() -> None:
    """The seeded Slow Case customer answers after the timeout: CrmTimeout."""
    async with (
        running_crm(delays={"C-1003": 1.0}) as crm,
        connector(sample(crm.url, timeout_s=0.2)) as conn,
    ):
        with pytest.raises(CrmTimeout):
            await conn.find_by_number(number("13700137000"))


async def test_changed_since_pages_through_everything() -> None:
    """changed_since follows next_cursor over pages; numbers come back as E.164."""
    async with running_crm() as crm:
        settings = sample(crm.url)
        assert settings.changed is not None
        settings.changed.params["limit"] = "3"
        async with connector(settings) as conn:
            seen: list[str] = []
            numbers: dict[str, list[str]] = {}
            cursor: str | None = None
            pages = 0
            for _ in range(20):
                page = await conn.changed_since(cursor)
                pages += 1
                for customer, nums in page.entries:
                    seen.append(customer.id)
                    numbers[customer.id] = nums
                cursor = page.next_cursor
                if cursor is None:
                    break
    assert pages == 4
    assert sorted(seen) == sorted(crm.state.customers)
    assert numbers["C-1002"] == ["+8613900139000", "+8613900139001"]
    assert "cursor" not in crm.state.requests[0].query  # empty on the first page: left out
    assert crm.state.requests[1].query["cursor"] == "3"


async def test_changed_since_time_cursor_and_updated_at_mode() -> None:
    """An ISO cursor starts at that time; ``updated_at`` mode advances by the newest time."""
    async with running_crm() as crm:
        async with connector(sample(crm.url)) as conn:
            page = await conn.changed_since("2025-02-01T00:00:00Z")
        assert {c.id for c, _ in page.entries} == {"C-1002", "C-1008", "C-1009", "C-1010"}
        section = sample_crm_section(crm.url)
        section["changed"]["cursor"] = {"type": "updated_at"}
        section["changed"]["params"] = {"updated_since": "{updated_since}", "limit": "4"}
        section["changed"]["page_size"] = 4
        async with connector(CrmSettings.model_validate(section)) as conn:
            first = await conn.changed_since(None)
            second = await conn.changed_since(first.next_cursor)
            third = await conn.changed_since(second.next_cursor)
    assert first.next_cursor == "2025-01-10T09:00:00Z"
    assert [c.id for c, _ in second.entries] == ["C-1007", "C-1004", "C-1002", "C-1009"]
    assert third.next_cursor is None
    assert len(third.entries) == 2


async def test_changed_next_url_cursor() -> None:
    """``next_url`` mode (Salesforce nextRecordsUrl) requests the URL the CRM gave."""
    def reply(info: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if info["path"].endswith("/query"):
            return 200, {"records": [{"Id": "003A", "Phone": "13800138000"}],
                         "nextRecordsUrl": "/services/data/v59.0/query/01g-2000"}, {}
        return 200, {"records": [{"Id": "003B", "MobilePhone": "+14155550100"}],
                     "done": True}, {}

    async with scripted_server(reply) as server:
        settings = CrmSettings.model_validate({
            "base_url": server.url,
            "lookup": {"fields": {"id": "Id", "name": None}},
            "changed": {"url": "/services/data/v59.0/query",
                        "params": {"q": "SELECT Id FROM Contact WHERE "
                                        "LastModifiedDate > {updated_since}"},
                        "results": "records", "numbers": ["Phone", "MobilePhone"],
                        "cursor": {"type": "next_url", "path": "nextRecordsUrl"}},
        })
        async with connector(settings) as conn:
            first = await conn.changed_since("2025-01-01T00:00:00Z")
            second = await conn.changed_since(first.next_cursor)
    assert first.entries[0][1] == ["+8613800138000"]
    assert second.entries[0][1] == ["+14155550100"]
    assert second.next_cursor is None
    assert server.seen[0]["query"]["q"].endswith("> 2025-01-01T00:00:00Z")
    assert server.seen[1]["path"] == "/services/data/v59.0/query/01g-2000"


CALL = {
    "record_key": "call:1700000000.1", "linkedid": "1700000000.1", "caller": "+8613800138000",
    "caller_name": "Li Lei", "did": "4008001000", "customer_id": "C-1001",
    "answered_by_agent": "7001", "queue": "vip", "outcome": "answered",
    "start": "2025-03-01T10:00:00+00:00", "talk_s": 42.5, "wait_s": 3.0,
    "recording": "/var/spool/asterisk/monitor/1700000000.1 in.wav",
}


async def test_post_call_twice_creates_one_activity() -> None:
    """The same idempotency key twice: one activity, the second post is a duplicate."""
    async with running_crm(token=TOKEN) as crm, connector(sample(crm.url)) as conn:
        first = await conn.post_call(CALL, "call:1700000000.1")
        second = await conn.post_call(CALL, "call:1700000000.1")
    activities = list(crm.state.objects["activities"].values())
    assert len(activities) == 1
    assert (first.remote_id, first.duplicate) == (activities[0]["id"], False)
    assert (second.remote_id, second.duplicate) == (activities[0]["id"], True)
    posted = [r for r in crm.state.requests if r.path == "/api/activities"]
    assert [r.idempotency_key for r in posted] == ["call:1700000000.1"] * 2
    body = posted[0].body
    assert body["talk_s"] == 42.5  # a lone placeholder keeps the number type
    assert body["agent"] == "7001"
    assert body["call_id"] == "1700000000.1"
    assert body["answered_at"] is None  # missing in the record → null
    assert body["recording_url"] == f"{crm.url}/recordings/1700000000.1%20in.wav"


async def test_post_lead_and_task() -> None:
    """Leads and tasks are created with their own keys; the task gets the owner."""
    unknown = {**CALL, "customer_id": None, "caller": "+862150501234", "outcome": "missed"}
    async with running_crm(token=TOKEN) as crm, connector(sample(crm.url)) as conn:
        lead = await conn.create_lead(unknown, "call:2:lead")
        task = await conn.create_task({**CALL, "outcome": "abandoned"}, "call:1:task")
        again = await conn.create_task({**CALL, "outcome": "abandoned"}, "call:1:task")
    assert lead.remote_id == "LEAD-000001"
    assert not lead.duplicate
    assert crm.state.objects["leads"]["LEAD-000001"]["phone"] == "+862150501234"
    stored = crm.state.objects["tasks"][str(task.remote_id)]
    assert stored["owner"] == "7001"
    assert stored["subject"] == "Call back +8613800138000 (abandoned call)"
    assert again.duplicate
    assert len(crm.state.objects["tasks"]) == 1


async def test_post_disabled_and_fields_mapping() -> None:
    """Unconfigured posts are off; ``fields`` builds nested bodies with filters."""
    def created(_: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 201, {"data": [{"code": "SUCCESS", "details": {"id": 987}}]}, {}

    async with scripted_server(created) as server:
        settings = CrmSettings.model_validate({
            "base_url": server.url,
            "activity": {
                "url": "/crm/v3/objects/calls", "idempotency_header": None,
                "id_path": "data.0.details.id",
                "fields": {"properties.hs_call_duration": "{record.talk_s|ms}",
                           "properties.hs_timestamp": "{record.start|epoch_ms}",
                           "properties.hs_call_title": "Call from {record.caller_name}",
                           "properties.day": "{record.start|date}",
                           "properties.len": "{record.talk_s|mmss}"},
            },
        })
        async with connector(settings) as conn:
            assert not conn.enabled("task")
            off = await conn.create_task(CALL, "k")
            result = await conn.post_call(CALL, "call:9")
    assert off.extra == {"disabled": True}
    assert off.remote_id is None
    assert result.remote_id == "987"
    sent = server.seen[0]
    assert sent["body"] == {"properties": {
        "hs_call_duration": 42500, "hs_timestamp": 1740823200000,
        "hs_call_title": "Call from Li Lei", "day": "2025-03-01", "len": "00:42"}}
    assert "Idempotency-Key" not in sent["headers"]


async def test_post_duplicate_status_409_and_missing_id() -> None:
    """A configured 409 is a duplicate, not an error; a missing id is counted, not fatal."""
    async with scripted_server(reply_with(409, {"message": "exists"})) as server:
        settings = CrmSettings.model_validate({"base_url": server.url, "activity": {
            "url": "/calls", "duplicate_status": [409], "id_path": "id"}})
        async with connector(settings) as conn:
            result = await conn.post_call(CALL, "call:1")
    assert result.duplicate
    assert result.remote_id is None
    assert server.seen[0]["headers"]["Idempotency-Key"] == "call:1"
    assert server.seen[0]["body"]["caller"] == "+8613800138000"  # no template: the record


async def test_post_server_error_raises() -> None:
    """A 503 on a post raises CrmServerError (the outbox retries it)."""
    async with running_crm() as crm, connector(sample(crm.url)) as conn:
        crm.faults.add("status", status=503, path="/api/activities", count=1)
        with pytest.raises(CrmServerError):
            await conn.post_call(CALL, "call:x")
        ok = await conn.post_call(CALL, "call:x")
    assert not ok.duplicate
    assert len(crm.state.objects["activities"]) == 1


async def test_recording_upload(tmp_path: Path) -> None:
    """``upload`` mode posts the file as multipart and uses the returned URL."""
    recording = tmp_path / "rec.wav"
    recording.write_bytes(b"RIFF....WAVE")

    def reply(info: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if info["path"] == "/files":
            return 201, {"url": "https://files.example.com/rec.wav"}, {}
        return 201, {"id": "A1"}, {}

    async with scripted_server(reply) as server:
        settings = CrmSettings.model_validate({
            "base_url": server.url,
            "activity": {"url": "/calls", "body": {"rec": "{record.recording_url}"}},
            "recordings": {"mode": "upload", "url": "/files"},
        })
        async with connector(settings) as conn:
            await conn.post_call({**CALL, "recording": str(recording)}, "call:5")
            await conn.post_call({**CALL, "recording": str(tmp_path / "gone.wav")}, "call:6")
    assert server.seen[0]["headers"]["Idempotency-Key"] == "call:5:recording"
    assert "multipart/form-data" in server.seen[0]["headers"]["Content-Type"]
    assert server.seen[1]["body"] == {"rec": "https://files.example.com/rec.wav"}
    assert server.seen[2]["body"] == {"rec": None}  # unreadable file: no link, still posted


def deleting_uploads(url: str, activity: dict[str, Any]) -> CrmSettings:
    """``activity`` and a task that link the recording, uploaded to /files and deleted
    once confirmed."""
    return CrmSettings.model_validate({
        "base_url": url, "activity": activity,
        "task": {"url": "/tasks", "body": {"rec": "{record.recording_url}"}},
        "recordings": {"mode": "upload", "url": "/files", "delete_after_upload": True},
    })


async def test_recording_deleted_only_after_the_crm_confirmed(tmp_path: Path) -> None:
    """With ``delete_after_upload``, the local file stays while the activity that links
    the upload fails (the retry uploads it again), is deleted once the CRM confirmed the
    activity, and the record's later steps reuse the link instead of the gone file."""
    recording = tmp_path / "rec.wav"
    recording.write_bytes(b"RIFF....WAVE")
    fail = [True]

    def reply(info: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if info["path"] == "/files":
            return 201, {"url": "https://files.example.com/rec.wav"}, {}
        if info["path"] == "/calls" and fail[0]:
            fail[0] = False
            return 503, {"error": "busy"}, {}
        return 201, {"id": "A1"}, {}

    async with scripted_server(reply) as server:
        settings = deleting_uploads(server.url, {"url": "/calls",
                                                 "body": {"rec": "{record.recording_url}"}})
        record = {**CALL, "recording": str(recording)}
        async with connector(settings) as conn:
            with pytest.raises(CrmServerError):
                await conn.post_call(record, "call:7")
            assert recording.exists()
            await conn.post_call(record, "call:7")
            assert not recording.exists()
            await conn.create_task(record, "call:7")
    assert [s["path"] for s in server.seen] == ["/files", "/calls", "/files", "/calls",
                                                "/tasks"]
    assert server.seen[-1]["body"] == {"rec": "https://files.example.com/rec.wav"}


@pytest.mark.parametrize("case", ["found", "found_without_link", "other_process"])
async def test_recording_of_a_step_recovered_by_find_is_deleted_like_a_confirmed_one(
        tmp_path: Path, case: str) -> None:
    """The call's answer is lost after the CRM stored it (here a 503 after storing); the
    retry's find recovers the object. When it holds the link of this record's upload,
    delete_after_upload deletes the local file as for a confirmed step, and the record's
    later steps reuse the link; an object without the link, or a connector that did not
    upload it (another worker), keeps the file."""
    recording = tmp_path / "rec.wav"
    recording.write_bytes(b"RIFF....WAVE")
    stored: list[dict[str, Any]] = []

    def reply(info: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if info["path"] == "/files":
            return 201, {"url": "https://files.example.com/rec.wav?a=1&b=2"}, {}
        if info["path"] == "/calls":
            stored.append({"id": "A1", **info["body"]})
            return 503, {"error": "busy"}, {}
        if info["path"] == "/calls/search":
            found = [o if case != "found_without_link" else {"id": o["id"], "key": o["key"]}
                     for o in stored if o["key"] == info["body"]["key"]]
            return 200, {"results": found}, {}
        return 201, {"id": "T1"}, {}

    async with scripted_server(reply) as server:
        settings = deleting_uploads(server.url, {
            "url": "/calls", "idempotency_header": None,
            "body": {"rec": "{record.recording_url}", "key": "{idempotency_key}"},
            "find": {"method": "POST", "url": "/calls/search", "body": {"key": "{idempotency_key}"},
                     "match": {"path": "key", "equals": "{idempotency_key}"}}})
        record = {**CALL, "recording": str(recording)}
        async with connector(settings) as conn:
            with pytest.raises(CrmServerError):
                await conn.post_call(record, "call:8")
            assert recording.exists()
            if case == "other_process":
                async with connector(settings) as other:
                    found = await other.find_created("call", record, "call:8", {}, ["call"])
            else:
                found = await conn.find_created("call", record, "call:8", {}, ["call"])
            assert found is not None
            assert found.remote_id == "A1"
            assert recording.exists() == (case != "found")
            if case == "found":
                await conn.create_task(record, "call:8")
    if case == "found":
        assert server.seen[-1]["body"] == {"rec": "https://files.example.com/rec.wav?a=1&b=2"}
    assert [s["path"] for s in server.seen].count("/files") == 1


def test_recording_url_template() -> None:
    """``url`` mode turns a recording path into the configured link."""
    settings = CrmSettings.model_validate({"recordings": {
        "url": "https://pbx.example.com/rec/{name}/{basename}"}})
    conn = RestConnector(settings)
    assert conn.recording_url("/var/spool/asterisk/monitor/17000.1-in.wav") == (
        "https://pbx.example.com/rec/17000.1-in/17000.1-in.wav")
    assert conn.recording_url("") is None
