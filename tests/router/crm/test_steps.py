"""The connector's steps: lookups made of requests, number matching, reference tables,
and the records pipeline (alone and driven by the delivery worker on a real Redis),
against scripted servers and the sample CRM on loopback."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from router.crm.base import StepResult
from router.crm.config import CrmSettings
from router.crm.numbers import forms, stored_e164, stored_matches
from router.crm.rest import RestConnector
from router.errors import CrmClientError, CrmError, CrmMappingError
from router.phone import normalize
from tests.crm_server import running_crm, scripted_server, serving

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def caller(raw: str) -> Any:
    """A caller number normalised for region CN."""
    return normalize(raw, "CN")


def test_number_forms() -> None:
    """Every form a template may search by, for a London number."""
    assert forms("+442071838751") == {
        "e164": "+442071838751", "digits": "442071838751", "national": "2071838751",
        "local": "02071838751", "national_format": "020 7183 8751",
        "international": "+44 20 7183 8751", "country": "GB"}


@pytest.mark.parametrize(("stored", "matches"), [
    (["020 7183 8751"], True),        # national, read in the caller's country
    (["+44 (0)20 7183 8751"], True),
    (["0044 20 7183 8751"], True),
    (["442071838751"], True),
    (["020 7183 8752", None, ""], False),
    (["+1 (202) 718-3875"], False),
    ([], False),
])
def test_stored_numbers_match_when_they_normalise_to_the_caller(
        stored: list[Any], matches: bool) -> None:
    """Stored numbers typed any way match the caller's E.164, and only that."""
    values = [s for s in stored if isinstance(s, str)]
    assert stored_matches(values, "+442071838751", "GB") is matches


def test_a_stored_value_longer_than_any_number_is_neither_parsed_nor_remembered() -> None:
    """Text a CRM keeps in a phone field that is far longer than a number (a note pasted
    there) is skipped: no phonenumbers parse, no entry in the per-process cache."""
    before = stored_e164.cache_info().currsize
    note = "call me on 020 7183 8751 " + "x" * 100_000
    assert stored_matches([note], "+442071838751", "GB") is False
    assert stored_matches([note[:24]], "+442071838751", "GB") is True
    assert stored_e164.cache_info().currsize == before + 1


def settings(url: str, **section: Any) -> CrmSettings:
    """A crm section pointed at ``url``."""
    return CrmSettings.model_validate({"base_url": url, **section})


async def test_search_then_fetch_each_record_and_keep_the_callers() -> None:
    """Two steps: the search returns ids and numbers only; records whose numbers are not
    the caller's are dropped before the fetch; the fetch fills tier and owner; a fetch
    answering 404 drops its candidate."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, {"hits": [{"id": "1", "phone": "(415) 555-0100"},
                                  {"id": "2", "phone": "(212) 555-0100"},
                                  {"id": "3", "phone": "415.555.0100"}]}, {}
        if req["path"] == "/people/1":
            return 200, {"id": "1", "name": "Sarah", "tier": "gold", "owner": {"id": "o7"}}, {}
        return 404, {"error": "gone"}, {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, lookups=[{
            "kind": "contact",
            "steps": [
                {"url": "/search", "params": {"digits": "{last:7}"}, "results": "hits",
                 "numbers": ["phone"]},
                {"url": "/people/{item.id}"},
            ],
            "fields": {"id": "id", "name": "name", "tier": "tier", "owner": "owner.id"},
        }]))
        try:
            customer = await conn.find_by_number(caller("+14155550100"))
        finally:
            await conn.aclose()
    assert customer is not None
    assert (customer.id, customer.tier, customer.owner, customer.kind) == (
        "1", "gold", "o7", "contact")
    assert [s["path"] for s in server.seen] == ["/search", "/people/1", "/people/3"]
    assert server.seen[0]["query"] == {"digits": "5550100"}


async def test_later_steps_run_for_at_most_max_candidates_in_parallel() -> None:
    """A broad search with many hits fetches only the first max_candidates records."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, [{"id": str(i)} for i in range(10)], {}
        return 200, {"id": req["path"].rsplit("/", 1)[1], "phone": "+8613800138000"}, {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, lookups=[{
            "max_candidates": 3, "multiple": "first",
            "steps": [{"url": "/search", "results": ""},
                      {"url": "/r/{item.id}", "numbers": ["phone"]}]}]))
        try:
            found = await conn.find_all(caller("13800138000"))
        finally:
            await conn.aclose()
    assert [c.id for c in found] == ["0", "1", "2"]
    assert len(server.seen) == 4


async def test_a_candidate_that_does_not_fit_is_skipped_and_the_next_one_tried() -> None:
    """A broad search with six hits, two candidates at a time: the first one's fetch
    is refused (403: that record is not readable), the second has no record (404), the
    third's record holds another
    number, the fourth's does not fit the field map (no id); each is skipped and the
    next one fetched instead, so the fifth and sixth are the customers (not a failed
    lookup, not a record that is not the caller's), and nothing more is fetched."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, [{"id": str(i)} for i in range(1, 8)], {}
        rid = req["path"].rsplit("/", 1)[1]
        if rid == "1":
            return 403, {"error": "forbidden"}, {}
        if rid == "2":
            return 404, {"error": "gone"}, {}
        phone = "+8613900139000" if rid == "3" else "+8613800138000"
        return 200, {"rid": rid, "phone": phone, "name": f"N{rid}"}, {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, lookups=[{
            "max_candidates": 2, "multiple": "first",
            "steps": [{"url": "/search", "results": ""},
                      {"url": "/r/{item.id}", "numbers": ["phone"]}],
            "fields": {"id": "{record.rid if record.rid != '4' else none}",
                       "name": "name"}}]))
        try:
            found = await conn.find_all(caller("13800138000"))
        finally:
            await conn.aclose()
    assert [c.id for c in found] == ["5", "6"]
    fetched = sorted(s["path"] for s in server.seen if s["path"] != "/search")
    assert fetched == [f"/r/{i}" for i in range(1, 7)]


async def test_a_lookup_whose_every_candidate_failed_fails() -> None:
    """When no candidate is kept and one of them failed (the CRM refuses every fetch:
    403), the lookup fails with that error: "unknown caller" would be cached for a
    caller the CRM knows. The candidates tried are bounded (4 x max_candidates)."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, [{"id": str(i)} for i in range(50)], {}
        return 403, {"error": "forbidden"}, {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, lookups=[{
            "max_candidates": 2,
            "steps": [{"url": "/search", "results": ""}, {"url": "/r/{item.id}"}]}]))
        try:
            with pytest.raises(CrmClientError):
                await conn.find_all(caller("13800138000"))
        finally:
            await conn.aclose()
    assert len(server.seen) == 1 + 8


@pytest.mark.parametrize("failure", ["500", "timeout", "ref"])
async def test_a_transient_failure_of_one_candidate_fails_the_lookup(failure: str) -> None:
    """Two records have the caller's number: the VIP's fetch fails for a while (500, no
    answer in time, or its owner's reference read answers 500), the other's works. The
    lookup fails (nothing cached, retried by the next call) instead of answering the
    other, standard, record as the caller: a failure that may pass must not choose the
    customer."""
    async def fetch(request: web.Request) -> web.Response:
        rid = request.match_info["rid"]
        if rid == "vip" and failure == "500":
            return web.json_response({"error": "boom"}, status=500)
        if rid == "vip" and failure == "timeout":
            await asyncio.sleep(2)
        return web.json_response({"id": rid, "phone": "+8613800138000", "owner": rid,
                                  "tier": "vip" if rid == "vip" else "standard"})

    async def search(_: web.Request) -> web.Response:
        return web.json_response([{"id": "vip"}, {"id": "std"}])

    async def owner(request: web.Request) -> web.Response:
        if request.match_info["oid"] == "vip" and failure == "ref":
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response({"name": "Owner " + request.match_info["oid"]})

    app = web.Application()
    app.router.add_get("/search", search)
    app.router.add_get("/r/{rid}", fetch)
    app.router.add_get("/owners/{oid}", owner)
    fields = {"id": "id", "tier": "tier"}
    if failure == "ref":
        fields["owner"] = "{record.owner | ref('owners')}"
    async with serving(app) as url:
        conn = RestConnector(settings(
            url, timeout_s=0.5,
            refs={"owners": {"url": "/owners/{key}", "value": "name"}},
            lookups=[{"steps": [{"url": "/search", "results": ""},
                                {"url": "/r/{item.id}", "numbers": ["phone"]}],
                      "fields": fields}]))
        try:
            with pytest.raises(CrmError) as failed:
                await conn.find_by_number(caller("13800138000"))
        finally:
            await conn.aclose()
    assert failed.value.retryable


async def test_candidates_are_followed_in_a_bounded_number_of_rounds() -> None:
    """Twenty hits, five at a time, the first four the caller's and the others not: the
    later candidates are fetched a full batch at a time (at most four rounds of one
    fetch's latency, not one round per place left: sixteen), and the customers are
    still the first five that fit, in the CRM's order."""
    async def fetch(request: web.Request) -> web.Response:
        rid = int(request.match_info["rid"])
        await asyncio.sleep(0.25)
        phone = "+8613800138000" if rid < 4 or rid == 17 else "+8613900139000"
        return web.json_response({"id": str(rid), "phone": phone})

    async def search(_: web.Request) -> web.Response:
        return web.json_response([{"id": str(i)} for i in range(20)])

    app = web.Application()
    app.router.add_get("/search", search)
    app.router.add_get("/r/{rid}", fetch)
    async with serving(app) as url:
        conn = RestConnector(settings(url, lookups=[{
            "max_candidates": 5, "multiple": "first",
            "steps": [{"url": "/search", "results": ""},
                      {"url": "/r/{item.id}", "numbers": ["phone"]}]}]))
        try:
            started = time.monotonic()
            found = await conn.find_all(caller("13800138000"))
            elapsed = time.monotonic() - started
        finally:
            await conn.aclose()
    assert [c.id for c in found] == ["0", "1", "2", "3", "17"]
    assert elapsed < 2.5, f"{elapsed:.2f} s: one round per place left"


@pytest.mark.parametrize(("field", "raw"), [
    pytest.param("value", "1" + "0" * 400, id="value-10**400"),
    pytest.param("open_tickets", '"1e999"', id="tickets-1e999"),
    pytest.param("open_tickets", "1" + "0" * 400, id="tickets-10**400"),
    pytest.param("updated_at", "1" + "0" * 20, id="updated-10**20"),
    pytest.param("updated_at", "1" + "0" * 400, id="updated-10**400"),
    pytest.param("updated_at", '"1' + "0" * 20 + '"', id="updated-text-10**20"),
])
async def test_a_number_out_of_range_in_a_record_is_a_mapping_error(field: str, raw: str
                                                                    ) -> None:
    """A record whose number is out of any range (an integer of hundreds of digits, a
    count of 1e999, a date-time 10**20 seconds away) does not fit the field map: a
    CrmMappingError naming the field, not an OverflowError or OSError out of the
    connector (counted as a connector bug, the changes feed stopped)."""
    body = '{"results": [{"id": "1", "%s": %s}]}' % (field, raw)  # noqa: UP031

    async with scripted_server(lambda _r: (200, body, {})) as server:
        conn = RestConnector(settings(server.url, lookups=[{
            "steps": [{"url": "/search"}],
            "fields": {"id": "id", field: field}}]))
        try:
            with pytest.raises(CrmMappingError, match=field):
                await conn.find_by_number(caller("13800138000"))
        finally:
            await conn.aclose()


async def test_ordered_lookups_stop_at_the_first_that_keeps_a_record() -> None:
    """Lookups run in order; the secondary object's kind is the customer's kind; an
    error in a lookup fails the whole lookup (never "unknown" by mistake)."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/contacts":
            return 200, {"results": []}, {}
        if req["path"] == "/leads":
            return 200, {"results": [{"id": "L1", "name": "Lead"}]}, {}
        return 500, {"error": "boom"}, {}

    lookups = [{"name": "contacts", "kind": "contact", "steps": [{"url": "/contacts"}]},
               {"name": "leads", "kind": "lead", "steps": [{"url": "/leads"}]},
               {"name": "never", "steps": [{"url": "/broken"}]}]
    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, lookups=lookups))
        failing = RestConnector(settings(server.url, lookups=[lookups[0], lookups[2]]))
        try:
            customer = await conn.find_by_number(caller("13800138000"))
            with pytest.raises(CrmError):
                await failing.find_by_number(caller("13800138000"))
        finally:
            await conn.aclose()
            await failing.aclose()
    assert customer is not None
    assert (customer.id, customer.kind) == ("L1", "lead")


async def test_reference_tables_are_fetched_once_and_cached() -> None:
    """A table ref is read once for many lookups; a per-key ref once per key; both feed
    field maps (tag ids to names, owner id to the owner's extension)."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, [{"id": "C1", "tag_ids": [1, 3], "owner": "u9"}], {}
        if req["path"] == "/tags":
            return 200, {"data": [{"id": 1, "name": "vip"}, {"id": 3, "name": "churn"}]}, {}
        if req["path"] == "/users/u9":
            return 200, {"user": {"ext": "7009"}}, {}
        return 404, {}, {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(
            server.url,
            refs={"tags": {"url": "/tags", "results": "data", "key": "id", "value": "name"},
                  "extension": {"url": "/users/{key}", "value": "user.ext"}},
            lookups=[{"steps": [{"url": "/search", "results": ""}],
                      "fields": {"id": "id", "tags": "{record.tag_ids | ref('tags')}",
                                 "owner": "{record.owner | ref('extension')}"}}]))
        try:
            for _ in range(3):
                customer = await conn.find_by_number(caller("13800138000"))
                assert customer is not None
                assert (customer.tags, customer.owner) == (("vip", "churn"), "7009")
        finally:
            await conn.aclose()
    paths = [s["path"] for s in server.seen]
    assert paths.count("/tags") == 1
    assert paths.count("/users/u9") == 1
    assert paths.count("/search") == 3


async def test_a_failing_reference_fails_the_lookup_when_nothing_is_cached() -> None:
    """A reference the CRM cannot answer fails the lookup (a customer with silently wrong
    tags would be cached and routed)."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, [{"id": "C1", "tag_ids": [1]}], {}
        return 503, {"error": "down"}, {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(
            server.url, refs={"tags": {"url": "/tags", "key": "id", "value": "name"}},
            lookups=[{"steps": [{"url": "/search", "results": ""}],
                      "fields": {"id": "id", "tags": "{record.tag_ids | ref('tags')}"}}]))
        try:
            with pytest.raises(CrmError):
                await conn.find_by_number(caller("13800138000"))
        finally:
            await conn.aclose()


async def test_error_template_turns_a_200_answer_into_a_client_error() -> None:
    """An answer the error template calls an error (JSON-RPC style) fails with its text."""
    async with scripted_server(lambda _r: (200, {"error": {"message": "Access Denied"}}, {})) \
            as server:
        conn = RestConnector(settings(server.url, lookups=[{"steps": [{
            "url": "/rpc", "error": "{response.error.message if response.error else ''}"}]}]))
        try:
            with pytest.raises(CrmClientError, match="Access Denied"):
                await conn.find_by_number(caller("13800138000"))
        finally:
            await conn.aclose()


async def test_a_reference_answer_its_error_template_calls_an_error_is_not_cached() -> None:
    """A per-key reference answered with an error in a 200 (JSON-RPC) fails the lookup
    with the CRM's own words, and nothing is cached: once the CRM answers, the owner is
    there (not a none remembered for ttl_s)."""
    answers = [{"jsonrpc": "2.0", "id": 1, "error": {"message": "Access Denied"}},
               {"jsonrpc": "2.0", "id": 1, "result": [{"id": 7, "ext": "7007"}]}]

    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, [{"id": "C1", "owner": 7}], {}
        return 200, answers.pop(0), {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(
            server.url,
            refs={"owner_ext": {"method": "POST", "url": "/rpc", "body": {"id": "{key}"},
                                "error": "{response.error.message if response.error else ''}",
                                "value": "result.0.ext"}},
            lookups=[{"steps": [{"url": "/search", "results": ""}],
                      "fields": {"id": "id", "owner": "{record.owner | ref('owner_ext')}"}}]))
        try:
            with pytest.raises(CrmClientError, match="Access Denied"):
                await conn.find_by_number(caller("13800138000"))
            customer = await conn.find_by_number(caller("13800138000"))
        finally:
            await conn.aclose()
    assert customer is not None
    assert customer.owner == "7007"


async def test_reference_and_webhook_fetch_templates_see_the_crms_maps_and_time_zone() -> None:
    """The templates of a reference (its request and value) and of a webhook's fetch are
    evaluated with crm.maps and crm.timezone, as every other template is."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, [{"id": "C1", "owner": "u9"}], {}
        if req["path"] == "/users/u9":
            return 200, {"team": "Sales", "since": "2026-01-01T23:30:00Z"}, {}
        return 200, {"id": req["query"]["id"], "name": "Fetched"}, {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(
            server.url, timezone="Asia/Shanghai", maps={"teams": {"Sales": "queue-sales"}},
            refs={"owner_team": {
                "url": "/users/{key}", "params": {"day": "{'2026-01-01T20:00:00Z' | date}"},
                "value": "{response.team | translate('teams')}:{response.since | date}"}},
            lookups=[{"steps": [{"url": "/search", "results": ""}],
                      "fields": {"id": "id", "owner": "{record.owner | ref('owner_team')}"}}],
            webhooks=[{"name": "hook", "signature": {"scheme": "token", "token": "t",
                                                       "header": "X-T"},
                       "fetch": {"url": "/fetch", "params": {
                           "id": "{id}", "team": "{'Sales' | translate('teams')}",
                           "day": "{'2026-01-01T20:00:00Z' | date}"}}}]))
        try:
            customer = await conn.find_by_number(caller("13800138000"))
            assert conn.settings.webhooks[0].fetch is not None
            fetched = await conn.fetch_by_id(conn.settings.webhooks[0].fetch, "C2")
        finally:
            await conn.aclose()
    assert customer is not None
    assert customer.owner == "queue-sales:2026-01-02"
    assert fetched is not None
    assert fetched[0].id == "C2"
    (ref_request,) = [s for s in server.seen if s["path"] == "/users/u9"]
    (fetch_request,) = [s for s in server.seen if s["path"] == "/fetch"]
    assert ref_request["query"] == {"day": "2026-01-02"}
    assert fetch_request["query"] == {"id": "C2", "team": "queue-sales", "day": "2026-01-02"}


async def test_a_not_found_answer_is_not_checked_by_the_error_template() -> None:
    """A later step's 404 in not_found_status drops its candidate even when the error
    template would call its body an error (HubSpot's 404 says status: error): the other
    candidate is the customer, as a find or the changed feed treat a not-found too."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/search":
            return 200, {"results": [{"id": "1"}, {"id": "2"}]}, {}
        if req["path"] == "/contacts/1":
            return 404, {"status": "error", "message": "resource not found"}, {}
        return 200, {"id": "2", "name": "Grace"}, {}

    error = "{response.message if response.status == 'error' else ''}"
    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, lookups=[{"steps": [
            {"url": "/search", "error": error},
            {"url": "/contacts/{item.id}", "error": error}]}]))
        try:
            customer = await conn.find_by_number(caller("13800138000"))
        finally:
            await conn.aclose()
    assert customer is not None
    assert (customer.id, customer.name) == ("2", "Grace")


async def test_a_find_and_a_fetch_resolve_the_references_their_templates_use() -> None:
    """A step's find and fetch go through the same sending as the step itself: a ref in
    their templates is read (the owner's queue here), not sent as an empty value."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/owners/o7":
            return 200, {"queue": "q-7"}, {}
        if req["path"] == "/calls/search":
            hits = [{"id": "A1", "key": "call:9"}] if req["query"].get("queue") == "q-7" else []
            return 200, {"results": hits}, {}
        return 200, {"id": req["path"].rsplit("/", 1)[1], "queue": req["query"].get("queue")}, {}

    queue = "{customer.owner | ref('owner_queue')}"
    async with scripted_server(reply) as server:
        conn = RestConnector(settings(
            server.url, refs={"owner_queue": {"url": "/owners/{key}", "value": "queue"}},
            records=[{"name": "call", "url": "/calls",
                      "body": {"key": "{idempotency_key}", "queue": queue},
                      "find": {"url": "/calls/search", "params": {"queue": queue},
                               "match": {"path": "key", "equals": "{idempotency_key}"}},
                      "fetch": {"url": "/calls/{id}", "params": {"queue": queue}}}]))
        record = {**missed("call:9", "C1"), "customer_owner": "o7"}
        try:
            found = await conn.find_created("call", record, "call:9", {}, ["call"])
            assert found is not None
            read = await conn.records.fetch("call", record, "call:9", {}, ["call"], found)
        finally:
            await conn.aclose()
    assert found.remote_id == "A1"
    assert read.body == {"id": "A1", "queue": "q-7"}


async def test_what_an_error_template_reads_is_masked_like_an_error_body() -> None:
    """The CRM's words an error template picks out go into the log line and the dead
    letter masked as an HTTP error's body is: secrets and phone numbers hidden."""
    said = "Access Denied for +1 415 555 0199 (key s3cr3t-KEY-77)"
    async with scripted_server(lambda _r: (200, {"error": {"message": said}}, {})) as server:
        conn = RestConnector(settings(
            server.url, auth={"type": "bearer", "token": "s3cr3t-KEY-77"},
            lookups=[{"steps": [{"url": "/rpc", "error": "{response.error.message or ''}"}]}]))
        try:
            with pytest.raises(CrmClientError) as refused:
                await conn.find_by_number(caller("13800138000"))
        finally:
            await conn.aclose()
    assert refused.value.detail == "Access Denied for ***99 (key ***)"
    assert str(refused.value).endswith("the CRM answered an error: " + refused.value.detail)


async def test_a_find_answer_it_cannot_read_is_an_error_not_a_miss() -> None:
    """A find whose results path holds no list or object (here the CRM's text) fails as
    a mapping error naming it: taken for "not there", the step would be posted again."""
    async with scripted_server(lambda _r: (200, {"results": "no index"}, {})) as server:
        conn = RestConnector(settings(server.url, records=[{
            "name": "call", "url": "/calls", "body": {"key": "{idempotency_key}"},
            "find": {"url": "/calls/search", "params": {"key": "{idempotency_key}"},
                     "match": {"path": "key", "equals": "{idempotency_key}"}}}]))
        try:
            with pytest.raises(CrmMappingError, match=r"call\.find\.results: path 'results' "
                                                      "is a str, not a list or object"):
                await conn.find_created("call", missed("call:5"), "call:5", {}, ["call"])
        finally:
            await conn.aclose()


@pytest.mark.parametrize("match", [False, True])
async def test_a_find_whose_results_do_not_carry_the_key_finds_nothing(match: bool) -> None:
    """A find's search answers objects (a search that ignored its filter, a neighbour's
    call) none of which carries the step's key: "not found", never the first result taken
    for the step's object (the step would be counted done without being posted). With or
    without a match: without one, any value of the object must contain the key. Once an
    object carrying it is among the results, that one is found."""
    hits: list[dict[str, Any]] = [{"id": "X1", "note": "callroute call:7"},
                                  {"id": "X2", "note": "other"}]

    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 200, {"results": hits}, {}

    find: dict[str, Any] = {"url": "/calls/search", "params": {"q": "{idempotency_key}"}}
    if match:
        find["match"] = {"path": "note", "contains": "callroute {idempotency_key}"}
    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, records=[{
            "name": "call", "url": "/calls",
            "body": {"note": "callroute {idempotency_key}"}, "find": find}]))
        try:
            assert await conn.find_created("call", missed("call:5"), "call:5", {},
                                           ["call"]) is None
            hits.append({"id": "X3", "meta": {"notes": ["a", "callroute call:5"]}}
                        if not match else {"id": "X3", "note": "callroute call:5"})
            found = await conn.find_created("call", missed("call:5"), "call:5", {}, ["call"])
        finally:
            await conn.aclose()
    assert found is not None
    assert found.remote_id == "X3"
    assert [r["query"] for r in server.seen] == [{"q": "call:5"}] * 2


@pytest.mark.parametrize("match", [False, True])
async def test_a_find_does_not_take_a_neighbour_whose_key_extends_the_steps(match: bool
                                                                            ) -> None:
    """The call of Linkedid 1700000000.12 is looked for among the calls of its second; a
    neighbour's, 1700000000.123 (or this call's lead, key ...12:lead), holds the key as
    the start of its own: it is not this step's object (the call would never be posted),
    with or without a match; the step's own object, the key followed by ')' or by
    nothing, is found."""
    hits: list[dict[str, Any]] = [
        {"id": "N1", "note": "callroute call:1700000000.123)"},
        {"id": "N2", "note": "callroute call:1700000000.12:lead)"},
        {"id": "N3", "note": "callroute call:1700000000.12-b"}]

    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 200, {"results": hits}, {}

    find: dict[str, Any] = {"url": "/calls/search"}
    if match:
        find["match"] = {"path": "note", "contains": "callroute {idempotency_key}"}
    key = "call:1700000000.12"
    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, records=[{
            "name": "call", "url": "/calls",
            "body": {"note": "callroute {idempotency_key})"}, "find": find}]))
        try:
            assert await conn.find_created("call", missed(key), key, {}, ["call"]) is None
            hits.append({"id": "X1", "note": "<p>callroute call:1700000000.12</p>"})
            found = await conn.find_created("call", missed(key), key, {}, ["call"])
        finally:
            await conn.aclose()
    assert found is not None
    assert found.remote_id == "X1"


async def test_a_find_without_match_of_a_posted_record_looks_for_the_record_key() -> None:
    """A step that posts the record itself (no body) writes its record_key: a find
    without a match takes only an object holding that key."""
    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 200, {"results": [{"id": "R1", "record_key": "call:4"},
                                 {"id": "R2", "record_key": "call:8"}]}, {}

    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, records=[{
            "name": "call", "url": "/calls", "find": {"url": "/calls/search"}}]))
        try:
            found = await conn.find_created("call", missed("call:8"), "call:8", {}, ["call"])
            missing = await conn.find_created("call", missed("call:9"), "call:9", {}, ["call"])
        finally:
            await conn.aclose()
    assert found is not None
    assert found.remote_id == "R2"
    assert missing is None


async def test_a_step_that_fails_before_its_request_leaves_says_the_crm_did_not_act(
        tmp_path: Path) -> None:
    """A failure before the step's request is sent (its body's template, the recording's
    upload) is may_have_acted False, so the delivery's ledger does not hold the step as
    possibly created (a retry posts it, never asks a person); one after the CRM answered
    (an output read from the answer) is may_have_acted True."""
    recording = tmp_path / "rec.wav"
    recording.write_bytes(b"RIFF....WAVE")

    def reply(req: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if req["path"] == "/files":
            return 503, {"error": "busy"}, {}
        return 201, {"id": "A1", "size": "big"}, {}

    steps = [
        {"name": "body", "url": "/calls", "body": {"n": "{record.caller + 1}"}},
        {"name": "upload", "url": "/calls", "body": {"rec": "{record.recording_url}"}},
        {"name": "answer", "url": "/calls", "outputs": {"half": "{response.size / 2}"}},
    ]
    async with scripted_server(reply) as server:
        conn = RestConnector(settings(server.url, records=steps, recordings={
            "mode": "upload", "url": "/files"}))
        record = {**missed("call:6"), "recording": str(recording)}
        acted = {}
        try:
            for step in ("body", "upload", "answer"):
                with pytest.raises(CrmError) as failed:
                    await conn.run_step(step, record, "call:6", {}, ["call"])
                acted[step] = (failed.value.kind, failed.value.may_have_acted)
        finally:
            await conn.aclose()
    assert acted == {"body": ("mapping", False), "upload": ("5xx", False),
                     "answer": ("mapping", True)}
    assert [s["path"] for s in server.seen] == ["/files", "/calls"]


def sample_steps(url: str) -> CrmSettings:
    """examples/crm-sample.yaml (the steps form) pointed at ``url``."""
    data = yaml.safe_load((EXAMPLES / "crm-sample.yaml").read_text(encoding="utf-8"))["crm"]
    data["base_url"] = url
    data["auth"] = {"type": "bearer", "token": "demo-token"}
    return CrmSettings.model_validate(data)


def missed(key: str, customer_id: str | None = None) -> dict[str, Any]:
    """A missed call's record."""
    return {"record_key": key, "linkedid": key, "caller": "+8613999999999",
            "customer_id": customer_id, "outcome": "missed", "start": "2025-03-03T02:30:00Z",
            "talk_s": None, "did": "4008001000"}


async def test_pipeline_hangs_the_call_and_task_on_the_new_lead_and_skips_what_is_not_wanted(
        ) -> None:
    """An unknown caller: lead first, then the call and the task on the lead's id (the
    lead step's customer output); a known caller's call skips the lead step."""
    async with running_crm(token="demo-token") as crm:
        conn = RestConnector(sample_steps(crm.url))
        try:
            done: dict[str, StepResult] = {}
            rec = missed("call:1")
            for step in conn.step_names():
                result = await conn.run_step(step, rec, f"call:1:{step}", done,
                                             ["call", "lead", "task"])
                done[step] = result
            known = await conn.run_step("lead", missed("call:2", "C-1001"), "k", {},
                                        ["call", "task"])
        finally:
            await conn.aclose()
    lead_id = done["lead"].remote_id
    assert lead_id is not None
    assert done["lead"].customer == {"id": lead_id, "kind": "lead"}
    activity = next(iter(crm.state.objects["activities"].values()))
    assert (activity["customer_id"], activity["customer_kind"]) == (lead_id, "lead")
    assert activity["outcome"] == "no_answer"  # through crm.maps
    assert "recording_url" not in activity  # omitted, not null
    task = next(iter(crm.state.objects["tasks"].values()))
    assert task["customer_id"] == lead_id
    assert known.status == "skipped"
    assert len(crm.state.objects["leads"]) == 1


async def test_worker_retry_resumes_with_the_lead_created_before_the_failure(
        redis_url: str, tmp_path: Path) -> None:
    """The delivery worker keeps each step's result in its marker: when the call step
    fails after the lead was created, the retry posts the call on that lead without
    creating a second one."""
    from redis.asyncio import Redis

    from router.keys import Keys
    from router.records.delivery import DeliveryWorker
    from router.records.outbox import Outbox
    from router.records.spool import Spool
    from tests.router.records.outbox_crm import outbox_settings

    async with running_crm(token="demo-token") as crm:
        crm.faults.add("status", path="/api/activities", status=503, count=1)
        redis = Redis.from_url(redis_url, decode_responses=True)
        keys = Keys(prefix="steps:")
        settings_ = outbox_settings()
        conn = RestConnector(sample_steps(crm.url))
        outbox = Outbox(redis, keys, settings_, Spool(tmp_path, max_records=10,
                                                      max_bytes=100_000))
        worker = DeliveryWorker(redis, conn, keys=keys, settings=settings_)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop, grace_s=1.0))
        try:
            await outbox.enqueue(missed("call:77"))
            for _ in range(500):
                if crm.state.objects["tasks"]:
                    break
                await asyncio.sleep(0.01)
        finally:
            stop.set()
            await task
            await conn.aclose()
            await redis.aclose()
    leads = list(crm.state.objects["leads"].values())
    assert len(leads) == 1
    activities = list(crm.state.objects["activities"].values())
    assert [a["customer_id"] for a in activities] == [leads[0]["id"]]
    assert [r.path for r in crm.state.requests].count("/api/leads") == 1
    assert [r.path for r in crm.state.requests].count("/api/activities") == 2
