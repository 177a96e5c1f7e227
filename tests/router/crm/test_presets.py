"""Every shipped preset against its vendor-shaped fake (tests/crm_fakes): real HTTP on
loopback, each request checked by the fake against the vendor's documented shapes.

The same scenarios run for every vendor: the seed (tests/crm_fakes/base.py PEOPLE)
stores numbers as people type them, so an exact E.164 search finds Li Lei, Sarah
Connor's "(415) 555-0100" needs the digits fallback and number matching (a decoy has the
same last seven digits), Wang Fang is on the secondary object, and one number is unknown.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from ami.records import CallRecord, record_key_for
from router.crm.base import StepResult, step_key
from router.crm.config import CrmSettings
from router.crm.presets import merge
from router.crm.rest import RestConnector
from router.errors import CrmClientError, CrmError, CrmRateLimited
from router.models import CallerNumber
from router.phone import normalize
from tests.crm_fakes.base import LI, PEOPLE, SARAH, UNKNOWN, WANG, FakeCrm

VENDORS = ["hubspot", "salesforce", "zoho", "odoo", "pipedrive", "espocrm"]


class Vendor:
    """A running fake and a connector configured by its preset."""

    def __init__(self, name: str, fake: FakeCrm, module: Any) -> None:
        self.name = name
        self.fake = fake
        self.module = module
        self.conn: RestConnector | None = None

    def settings(self, **overrides: Any) -> CrmSettings:
        """The preset pointed at the fake, with ``overrides`` merged in."""
        return CrmSettings.model_validate(merge(self.module.config(self.fake), overrides))

    def connector(self, **overrides: Any) -> RestConnector:
        """A connector for :meth:`settings` (closed by the fixture)."""
        self.conn = RestConnector(self.settings(**overrides), region="CN")
        return self.conn


@pytest.fixture(params=VENDORS)
async def vendor(request: pytest.FixtureRequest) -> AsyncIterator[Vendor]:
    """Each vendor's fake, running, and a holder for the connector under test."""
    module = importlib.import_module(f"tests.crm_fakes.{request.param}")
    fake = module.make()
    await fake.start()
    holder = Vendor(request.param, fake, module)
    try:
        yield holder
    finally:
        if holder.conn is not None:
            await holder.conn.aclose()
        await fake.stop()


def caller(e164: str) -> CallerNumber:
    """A normalised caller number."""
    return normalize(e164, "CN")


def person(key: str) -> Any:
    """A seeded person by key."""
    return next(p for p in PEOPLE if p.key == key)


def record(linkedid: str, *, caller_e164: str | None, outcome: str = "answered",
           customer_id: str | None = None, owner: str | None = None,
           kind: str | None = None, talk_s: float | None = 42.0) -> dict[str, Any]:
    """A finished call's record as the outbox holds it (JSON)."""
    start = datetime(2025, 3, 3, 2, 30, tzinfo=UTC)
    rec = CallRecord(
        record_key=record_key_for(linkedid), linkedid=linkedid, caller=caller_e164,
        caller_name=None, did="4008001000", customer_id=customer_id, customer_tier=None,
        customer_owner=owner, customer_kind=kind, queue="support",
        answered_by_agent="7001" if outcome == "answered" else None, start=start,
        answer=start if outcome == "answered" else None, end=start, wait_s=3.2,
        talk_s=talk_s if outcome == "answered" else None, outcome=outcome,  # type: ignore[arg-type]
    )
    return rec.model_dump(mode="json")


async def deliver(conn: RestConnector, rec: dict[str, Any], plan: list[str]
                  ) -> dict[str, StepResult]:
    """Run every record step in order the way the delivery worker does."""
    done: dict[str, StepResult] = {}
    for step in conn.step_names():
        if conn.wants(step, rec, done, plan):
            key = step_key(rec["record_key"], step)
            done[step] = await conn.run_step(step, rec, key, done, plan)
    return done


async def test_exact_number_maps_every_field(vendor: Vendor) -> None:
    """A caller stored with their E.164 number is found by the first lookup and every
    field the vendor has is mapped (tier through the tier map, owner id, tags...)."""
    conn = vendor.connector()
    customer = await conn.find_by_number(caller(LI))
    li = person("li")
    assert customer is not None
    assert customer.id == vendor.fake.ids["li"]
    assert li.first in (customer.name or "")
    assert li.last in (customer.name or "")
    assert customer.tier == "gold"
    assert customer.value == li.value
    assert customer.owner == vendor.fake.owner_ids["o1"]
    assert customer.kind == "contact"
    assert customer.updated_at is not None
    if vendor.module.HAS_TAGS:
        assert customer.tags == li.tags
    assert vendor.fake.violations == []


async def test_number_typed_nationally_is_found_and_not_the_decoy(vendor: Vendor) -> None:
    """Sarah's number is stored as "(415) 555-0100": a search by E.164 alone misses it;
    the preset searches the other forms (or the last digits, which also return a decoy
    with the same last seven digits), and the stored numbers decide."""
    conn = vendor.connector()
    customer = await conn.find_by_number(caller(SARAH))
    assert customer is not None
    assert customer.id == vendor.fake.ids["sarah"]
    assert customer.tier == "platinum"
    assert vendor.fake.violations == []


async def test_secondary_object_says_its_kind(vendor: Vendor) -> None:
    """A caller known only on the secondary object is found there, with its kind."""
    conn = vendor.connector()
    customer = await conn.find_by_number(caller(WANG))
    assert customer is not None
    assert customer.id == vendor.fake.ids["wang"]
    assert customer.kind == vendor.fake.SECONDARY_KIND
    assert vendor.fake.violations == []


async def test_unknown_number_is_none_after_every_lookup(vendor: Vendor) -> None:
    """An unknown caller is None once every configured lookup has been tried."""
    conn = vendor.connector()
    assert await conn.find_by_number(caller(UNKNOWN)) is None
    assert len(vendor.fake.seen) >= len(conn.plan.lookups)
    assert vendor.fake.violations == []


async def test_unknown_caller_missed_call_creates_lead_then_call_and_task_on_it(
        vendor: Vendor) -> None:
    """An unknown caller's missed call: the lead is created first, the call and the
    follow-up task are posted on the id the CRM returned for it."""
    conn = vendor.connector(vars={"default_owner": vendor.fake.owner_ids["o2"]})
    rec = record("1700000000.1", caller_e164=UNKNOWN, outcome="missed")
    done = await deliver(conn, rec, ["call", "lead", "task"])
    ran = [s for s, r in done.items() if r.status == "done"]
    creates = next(s for s in ran if s not in ("call", "task"))  # the lead/contact step
    assert ran.index(creates) < ran.index("call") < ran.index("task")
    leads = vendor.fake.created("lead")
    assert len(leads) == 1
    assert UNKNOWN[-8:] in vendor.module.digits(leads[0]["phone"])
    calls, tasks = vendor.fake.created("call"), vendor.fake.created("task")
    assert [c["on"] for c in calls] == [leads[0]["id"]]
    assert calls[0]["outcome"] == vendor.fake.outcome("missed")
    assert [t["on"] for t in tasks] == [leads[0]["id"]]
    assert tasks[0]["owner"] == vendor.fake.owner_ids["o2"]
    assert vendor.fake.violations == []


async def test_known_caller_answered_call_only_with_duration(vendor: Vendor) -> None:
    """A known customer's answered call is one call on their record (no lead, no task),
    with the outcome mapped to the vendor's value and the talk time."""
    conn = vendor.connector()
    rec = record("1700000000.2", caller_e164=LI, customer_id=vendor.fake.ids["li"],
                 owner=vendor.fake.owner_ids["o1"], kind="contact", talk_s=42.0)
    done = await deliver(conn, rec, ["call"])
    assert {s: r.status for s, r in done.items()} == {"call": "done"}
    calls = vendor.fake.created("call")
    assert [c["on"] for c in calls] == [vendor.fake.ids["li"]]
    assert calls[0]["outcome"] == vendor.fake.outcome("answered")
    resolution = getattr(vendor.module, "DURATION_RESOLUTION_S", 1)
    assert abs(calls[0]["duration_s"] - 42.0) < resolution
    assert vendor.fake.created("lead") == []
    assert vendor.fake.created("task") == []
    assert vendor.fake.violations == []


async def test_secondary_object_customers_call_is_posted_on_that_object(
        vendor: Vendor) -> None:
    """A caller found on the secondary object (a lead): the route sets CRM_KIND from the
    lookup's kind, the record carries it as customer_kind, and the call is posted on
    that object (Salesforce WhoId, Zoho What_Id with $se_module Leads, Odoo the lead's
    chatter, EspoCRM parentType Lead, HubSpot the company association)."""
    from router.rules.compiler import Plan, Terminal
    from router.rules.decide import build_variables

    conn = vendor.connector()
    customer = await conn.find_by_number(caller(WANG))
    assert customer is not None
    variables = build_variables(Plan(dials=(), terminal=Terminal("queue", "support")),
                                "default", "default", customer)
    assert variables["CRM_KIND"] == vendor.fake.SECONDARY_KIND
    rec = record("1700000000.5", caller_e164=WANG, customer_id=variables["CRM_CUSTOMER_ID"],
                 kind=variables["CRM_KIND"])
    await deliver(conn, rec, ["call"])
    assert [c["on"] for c in vendor.fake.created("call")] == [vendor.fake.ids["wang"]]
    assert vendor.fake.violations == []


async def test_missed_call_task_goes_to_the_customers_owner(vendor: Vendor) -> None:
    """A known customer's missed call: the task is assigned to the owner the record
    carries (chosen at routing time), on the customer's record."""
    conn = vendor.connector()
    rec = record("1700000000.3", caller_e164=LI, outcome="missed",
                 customer_id=vendor.fake.ids["li"], owner=vendor.fake.owner_ids["o1"],
                 kind="contact")
    await deliver(conn, rec, ["call", "task"])
    tasks = vendor.fake.created("task")
    assert [(t["on"], t["owner"]) for t in tasks] == [
        (vendor.fake.ids["li"], vendor.fake.owner_ids["o1"])]
    assert vendor.fake.violations == []


async def test_vendor_error_is_a_client_error(vendor: Vendor) -> None:
    """The vendor's 4xx (field errors) fails the lookup as a client error."""
    conn = vendor.connector()
    vendor.fake.fail_next("error")
    with pytest.raises(CrmClientError):
        await conn.find_by_number(caller(LI))


async def test_vendor_rate_limit_is_recognised(vendor: Vendor) -> None:
    """The vendor's rate-limit answer raises the rate-limited error with its Retry-After
    (vendors whose limit is not a 429 say so in RATE_LIMIT_STATUS) and pauses the CRM's
    rate gate (lookups are not queued here: lookup_queue_s 0)."""
    conn = vendor.connector(limits={"lookup_queue_s": 0})
    vendor.fake.fail_next("rate_limit")
    with pytest.raises(CrmError) as info:
        await conn.find_by_number(caller(LI))
    if vendor.module.RATE_LIMIT_STATUS == 429:
        assert isinstance(info.value, CrmRateLimited)
        assert info.value.retry_after == vendor.fake.RETRY_AFTER
        assert conn.http.gate.pause_left > vendor.fake.RETRY_AFTER - 0.5
    else:
        assert getattr(info.value, "status", None) == vendor.module.RATE_LIMIT_STATUS


async def test_a_wrong_shape_is_refused_by_the_fake(vendor: Vendor) -> None:
    """A config that sends what the vendor does not document is refused: the fakes
    check every request, so a broken preset cannot pass."""
    conn = vendor.connector(**vendor.module.BROKEN)
    rec = record("1700000000.4", caller_e164=LI, customer_id=vendor.fake.ids["li"],
                 owner=vendor.fake.owner_ids["o1"], kind="contact")
    with pytest.raises(CrmClientError):
        await deliver(conn, rec, ["call"])
    assert vendor.fake.violations


#: An agent's disposition given after the wrap-up time (what web.wrapup adds to a record).
LATE = {"disposition": "wrong-number", "disposition_note": "Wanted the shop next door",
        "disposition_by": "7001"}


def updates(vendor: Vendor) -> list[Any]:
    """The update requests the vendor's fake received (its UPDATE: method, path, body)."""
    method, path, when = vendor.module.UPDATE
    return [s for s in vendor.fake.requests(method, path) if when is None or when(s.body)]


async def test_a_late_disposition_updates_the_call_and_keeps_its_key(vendor: Vendor) -> None:
    """The call step's update changes the one call the create made, by the id the create
    returned, the way the vendor documents (HubSpot PATCH of the call's properties,
    Salesforce PATCH of the Task (204), Zoho PUT of the Call in data[], Odoo write on the
    chatter message, Pipedrive v2 PATCH of the activity, EspoCRM PUT of the Call): the
    disposition in the vendor's field where it has one (HubSpot's call outcome through
    maps.dispositions, Salesforce's CallDisposition), the code and the note in the call's
    text, which still carries the key its find looks for. Sent twice (a retry after a
    lost answer), it leaves the call as once."""
    conn = vendor.connector()
    rec = record("1700000000.6", caller_e164=LI, customer_id=vendor.fake.ids["li"],
                 owner=vendor.fake.owner_ids["o1"], kind="contact")
    done = await deliver(conn, rec, ["call"])
    oid = done["call"].remote_id
    assert oid is not None
    before = vendor.fake.disposition(oid)
    assert "wrong-number" not in str(before["text"])
    late = {**rec, **LATE}
    result = await conn.run_update("call", late, oid, f"{rec['record_key']}:disposition")
    assert (result.status, result.remote_id) == ("done", oid)
    after = vendor.fake.disposition(oid)
    assert after["value"] == vendor.fake.disposition_value("wrong-number")
    assert "disposition wrong-number" in after["text"] or \
        "Disposition: wrong-number" in after["text"]
    assert "Wanted the shop next door" in after["text"]
    assert "queue support" in after["text"]  # the call's own text is kept
    assert ":disposition" not in after["text"]  # the step's key, not the update's
    assert len(updates(vendor)) == 1
    assert [c.id for c in vendor.fake.changes] == [oid]
    found = await conn.find_created("call", rec, rec["record_key"], {}, ["call"])
    assert found is not None
    assert found.remote_id == oid
    await conn.run_update("call", late, oid, f"{rec['record_key']}:disposition")
    first, second = vendor.fake.changes
    assert second.id == oid
    assert second.after == first.after
    assert vendor.fake.disposition(oid) == after
    assert len(vendor.fake.created("call")) == 1
    assert vendor.fake.violations == []


def test_a_step_key_is_the_record_key_for_the_call_and_suffixed_for_the_others() -> None:
    """router.crm.base.step_key, the one rule the delivery worker sends each step with
    and an update's templates see: the record's key for the call, ``<key>:<step>`` for
    every other step."""
    assert step_key("call:1700000000.1", "call") == "call:1700000000.1"
    assert step_key("call:1700000000.1", "task") == "call:1700000000.1:task"
    assert step_key("call:1700000000.1", "person") == "call:1700000000.1:person"


async def test_a_disposition_given_in_time_is_on_the_call_as_posted(vendor: Vendor) -> None:
    """A disposition the agent gave within the wrap-up time travels on the record: the
    call is created with it (the same fields the late update writes), and no update is
    sent."""
    conn = vendor.connector()
    rec = {**record("1700000000.7", caller_e164=LI, customer_id=vendor.fake.ids["li"],
                    owner=vendor.fake.owner_ids["o1"], kind="contact"), **LATE}
    done = await deliver(conn, rec, ["call"])
    call = vendor.fake.disposition(str(done["call"].remote_id))
    assert call["value"] == vendor.fake.disposition_value("wrong-number")
    assert "wrong-number" in call["text"]
    assert "Wanted the shop next door" in call["text"]
    assert updates(vendor) == []
    assert vendor.fake.violations == []


async def test_a_wrong_update_is_refused_like_the_vendor(vendor: Vendor) -> None:
    """An update that sends what the vendor does not take (HubSpot: a code where a call
    outcome's id goes; Salesforce: a field the org lacks; Zoho: a field outside data[];
    Odoo: a field a message lacks; Pipedrive v2: done as 0/1; EspoCRM: an unknown
    attribute) is refused with the vendor's 4xx, and the call is left as it was."""
    conn = vendor.connector(**vendor.module.BROKEN_UPDATE)
    rec = record("1700000000.8", caller_e164=LI, customer_id=vendor.fake.ids["li"],
                 owner=vendor.fake.owner_ids["o1"], kind="contact")
    done = await deliver(conn, rec, ["call"])
    oid = str(done["call"].remote_id)
    before = vendor.fake.disposition(oid)
    with pytest.raises(CrmClientError):
        await conn.run_update("call", {**rec, **LATE}, oid, "k:disposition")
    assert vendor.fake.violations
    assert vendor.fake.changes == []
    assert vendor.fake.disposition(oid) == before


async def test_an_update_of_a_call_the_crm_lost_is_a_client_error(vendor: Vendor) -> None:
    """An update of a call the CRM no longer has (deleted there) fails as a client error
    (dead-lettered, not retried forever): 404, or the vendor's own way of saying it."""
    conn = vendor.connector()
    unknown = {"hubspot": "999999", "salesforce": "00T000000009999AAA",
               "zoho": "3477061000099999999", "odoo": "99999", "pipedrive": "99999",
               "espocrm": "00000000000099999"}[vendor.name]
    rec = record("1700000000.9", caller_e164=LI, customer_id=vendor.fake.ids["li"])
    with pytest.raises(CrmClientError):
        await conn.run_update("call", {**rec, **LATE}, unknown, "k:disposition")
    assert vendor.fake.changes == []


async def test_an_update_writes_the_recording_link_again_in_url_mode() -> None:
    """With recordings linked by URL, the update's text (the call's text written again)
    carries the recording's link as the create's did: the link is the file's, found
    again for the update (no upload is made)."""
    from tests.crm_fakes.espocrm import config, make

    fake = make()
    await fake.start()
    settings = CrmSettings.model_validate(merge(config(fake), {"recordings": {
        "mode": "url", "url": "https://pbx.example.com/rec/{basename}"}}))
    conn = RestConnector(settings, region="CN")
    try:
        rec = {**record("1700000000.10", caller_e164=LI, customer_id=fake.ids["li"]),
               "recording": "/var/spool/asterisk/monitor/1700000000.10.wav"}
        done = await deliver(conn, rec, ["call"])
        oid = str(done["call"].remote_id)
        link = "recording https://pbx.example.com/rec/1700000000.10.wav"
        assert link in fake.disposition(oid)["text"]
        await conn.run_update("call", {**rec, **LATE}, oid, "k:disposition")
        text = fake.disposition(oid)["text"]
        assert link in text
        assert "disposition wrong-number" in text
        assert fake.violations == []
    finally:
        await conn.aclose()
        await fake.stop()


@pytest.mark.parametrize(("phone", "dialled", "lookup"), [
    ("+86 21 6234 5678", "+8613912345678", "partner_exact"),   # the mobile (sanitized)
    ("+86 21 6234 5678", "+862162345678", "partner_exact"),    # the phone, international
    ("021 6234 5678", "+862162345678", "partner_digits"),      # the phone, national
])
async def test_odoo_finds_a_partner_by_mobile_as_well_as_by_phone(
        phone: str, dialled: str, lookup: str) -> None:
    """An Odoo partner with a mobile and a phone is found from either: Odoo's
    phone_sanitized is the mobile's E.164 (it is tried first), so the exact lookup also
    searches phone_mobile_search, and every lookup keeps a record whose mobile or phone
    is the caller's (numbers: [phone, mobile]); the sync reads both numbers."""
    module = importlib.import_module("tests.crm_fakes.odoo")
    fake = module.make()
    await fake.start()
    pid = fake.add_partner("Mo Bile", phone=phone, mobile="+86 139 1234 5678", country="CN")
    conn = RestConnector(CrmSettings.model_validate(module.config(fake)), region="CN")
    try:
        found, customers = await conn.lookups.find(caller(dialled))
        assert found is not None
        assert (found.name, [c.id for c in customers]) == (lookup, [pid])
        assert (await conn.find_by_number(caller(LI))) is not None
        page = await conn.changed_since(None)
        while page.next_cursor is not None:
            entries = page.entries
            page = await conn.changed_since(page.next_cursor)
            page.entries[:0] = entries
        numbers = {c.id: n for c, n in page.entries}
        assert sorted(numbers[pid]) == ["+8613912345678", "+862162345678"]
        assert fake.violations == []
    finally:
        await conn.aclose()
        await fake.stop()


async def test_odoo_preset_works_on_an_odoo_without_mobile_fields() -> None:
    """Odoo 19 (and Odoo Online since saas-18.2) dropped the ``mobile`` field of
    res.partner and crm.lead, and a read naming it fails ("Invalid field"): the preset
    reads no such field, so its lookups (partner and lead) and its changed feed work
    there as on Odoo 16-18, where a partner's mobile is still matched (through
    phone_sanitized, the mobile's E.164)."""
    module = importlib.import_module("tests.crm_fakes.odoo")
    fake = module.make()
    fake.mobile_field = False
    await fake.start()
    conn = RestConnector(CrmSettings.model_validate(module.config(fake)), region="CN")
    try:
        assert (await conn.find_by_number(caller(LI))) is not None
        lead = await conn.find_by_number(caller(WANG))
        assert lead is not None
        assert lead.kind == "lead"
        page = await conn.changed_since(None)
        assert page.entries
        assert fake.violations == []
    finally:
        await conn.aclose()
        await fake.stop()


SYNC_VENDORS = [v for v in VENDORS if v != "pipedrive"]  # its preset has no changed feed


@pytest.mark.parametrize("name", SYNC_VENDORS)
async def test_sync_reads_changed_contacts_with_their_numbers(name: str) -> None:
    """The preset's changed feed (``callroute sync``) pages through the vendor's changed
    contacts until it says there is no more, mapping each with its numbers in E.164."""
    module = importlib.import_module(f"tests.crm_fakes.{name}")
    fake = module.make()
    await fake.start()
    conn = RestConnector(CrmSettings.model_validate(module.config(fake)), region="CN")
    try:
        cursor: str | None = None
        entries = []
        for _ in range(5):
            page = await conn.changed_since(cursor)
            entries += page.entries
            cursor = page.next_cursor
            if cursor is None:
                break
        assert cursor is None
        numbers = {c.id: n for c, n in entries}
        assert numbers[fake.ids["li"]] == [LI]
        assert {fake.ids["li"], fake.ids["sarah"], fake.ids["decoy"]} <= set(numbers)
        assert fake.violations == []
    finally:
        await conn.aclose()
        await fake.stop()


def test_every_preset_has_a_guide_a_fake_and_a_column_in_the_field_table() -> None:
    """Each shipped preset has docs/crm/<name>.md, a fake under tests/crm_fakes and a
    column of docs/crm/field-mapping.md, whose rows cover every customer field and every
    call-record field."""
    from pathlib import Path

    from ami.records import CallRecord
    from router.crm.presets import available
    from router.models import Customer

    docs = Path(__file__).resolve().parents[3] / "docs" / "crm"
    table = (docs / "field-mapping.md").read_text(encoding="utf-8")
    assert sorted(VENDORS) == available()
    header = next(line for line in table.splitlines() if line.startswith("| field |"))
    for name in available():
        assert (docs / f"{name}.md").is_file()
        assert f" {name} |" in header
    rows = {line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| `")}
    cells = " ".join(rows)
    for name in Customer.model_fields:
        assert f"`{name}`" in cells, name
    for name in CallRecord.model_fields:
        assert f"`{name}`" in cells, name
